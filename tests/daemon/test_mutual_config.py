"""`[mutual]`: the window of mutual scoring as a config key (daemon/config/mutual.py), checked like every section."""

from __future__ import annotations

import pytest

from daemon.config.settings import ConfigError, load_config


def test_mutual_window_keys_reach_the_window_limits_and_bad_ones_are_named(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text("[mutual]\nwindow_frames = 12\nwindow_max_mb = 8\nwindow_max_age_s = 600\n")
    limits = load_config(config, environ={}).mutual.limits()
    assert (limits.max_frames, limits.max_bytes, limits.max_age_s) == (12, 8 << 20, 600.0)
    defaults = load_config(None, environ={}).mutual.limits()
    assert (defaults.max_frames, defaults.max_bytes, defaults.max_age_s) == (32, 64 << 20, 3600.0)
    assert load_config(None, environ={"ANOMALYD_MUTUAL__WINDOW_FRAMES": "20"}).mutual.window_frames == 20
    config.write_text("[mutual]\nwindow_frames = 1\n")
    with pytest.raises(ConfigError, match=r"window_frames"):
        load_config(config, environ={})
    config.write_text("[mutual]\nwindow = 12\n")
    with pytest.raises(ConfigError, match=r"unknown key \[mutual\]\.window"):
        load_config(config, environ={})


def test_a_configured_family_that_scores_its_own_frames_forks_with_its_own_window_limits(tmp_path):
    """`[model].name` a family that scores its own frames: each source forks the configured detector with `[mutual]`'s
    bounds as that family's `window_limits` hook makes them (daemon/zero_label/start.py)."""
    from daemon.zero_label.start import zero_label_detector
    from model.mutual.window import WindowLimits

    config = tmp_path / "config.toml"
    config.write_text('[model]\nname = "mutual"\n[mutual]\nwindow_frames = 12\nwindow_max_mb = 8\n')
    settings = load_config(config, environ={})
    forked = []

    class Configured:  # stands in for the built mutual detector (its family is read by name)
        name = "mutual"

        def fork(self, limits):
            forked.append(limits)
            return type("Forked", (), {"name": "mutual"})()

    detector = zero_label_detector(settings, Configured(), {}, "line-1")
    assert forked == [WindowLimits(max_frames=12, max_bytes=8 << 20, max_age_s=3600.0)]
    assert detector.label == "source line-1"


def test_reading_the_mutual_section_loads_no_model_code():
    """The config stays torch-free: the window limits reach the family only when asked for (`limits()`)."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys; from daemon.config.settings import load_config; m = load_config(None, environ={}).mutual; "
            "assert m.window_frames == 32; print(sorted(n for n in ('torch', 'model.mutual') if n in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2]).stdout
    assert out.strip() == "[]"
