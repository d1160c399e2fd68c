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
