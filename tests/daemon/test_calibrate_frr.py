"""`anomalyd calibrate --false-reject-rate`: both thresholds from known-good frames, stored in the database for the
source and the model version it runs (fake brightness detector, SQLite)."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from sqlalchemy import select

from adapters.db import SourceThreshold, make_engine, make_session_factory
from daemon.cli import main


def test_calibrate_sets_both_thresholds_per_source_and_version(tmp_path, capsys):
    good = tmp_path / "good"
    good.mkdir()
    values = [60, 70, 80, 90, 100, 110]
    for value in values:
        cv2.imwrite(str(good / f"g{value}.png"), np.full((40, 48, 3), value, np.uint8))
    config = tmp_path / "config.toml"
    config.write_text(f"""
[model]
false_reject_rate = 0.0
[[sources]]
id = "cam1"
kind = "folder"
uri = "in"
[database]
url = "sqlite:///{tmp_path}/anomalyd.db"
[storage]
dir = "{tmp_path / 'artifacts'}"
""")
    args = ["calibrate", "--source", "cam1", "--good", str(good), "--false-reject-rate", "0.01", "--json",
            "--config", str(config), "--detector-factory", "tests.daemon.test_e2e_folder:fake_detector_factory"]
    assert main(["db", "upgrade", "--config", str(config)]) == 0
    capsys.readouterr()
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    brightest = max(values) / 255
    assert result["model_version"] == "fake-v1" and result["images"] == len(values)
    # the bound lies above every known-good score (a t bound on 6 frames, not just their 99th percentile)
    assert brightest < result["threshold"] < 1 and brightest < result["pixel_threshold"] < 1
    engine = make_engine(f"sqlite:///{tmp_path}/anomalyd.db")
    with make_session_factory(engine)() as session:
        rows = session.scalars(select(SourceThreshold)).all()
    engine.dispose()
    assert [(r.source, r.model_version, r.false_reject_rate, r.n_frames) for r in rows] == [
        ("cam1", "fake-v1", 0.01, len(values))]
    assert rows[0].threshold == pytest.approx(result["threshold"], abs=1e-6)
    with pytest.raises(SystemExit) as exc:
        main([*args[:6], "1.5", *args[7:]])
    assert exc.value.code == 2 and "--false-reject-rate" in capsys.readouterr().err
