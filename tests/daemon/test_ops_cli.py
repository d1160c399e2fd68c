"""Operator CLI on a real SQLite database: defects, label (with mask), models, calibrate (fake detector)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import cv2
import numpy as np
import pytest
from sqlalchemy import select

from adapters.db import Inspection, Label, ModelVersion, make_engine, make_session_factory, upgrade
from daemon.cli import main
from daemon.config.settings import load_config
from tests.daemon.test_pipeline import BrightnessDetector

T0 = datetime(2024, 5, 1, 8, 0, tzinfo=timezone.utc)


def brightness_factory(settings):
    return BrightnessDetector(image_size=32)


@pytest.fixture
def config(tmp_path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text("""# plant config
[[sources]]
id = "cam1"
kind = "folder"
uri = "inbox"
threshold = 0.5  # set by hand
[[sources]]
id = "cam2"
kind = "folder"
uri = "inbox2"
line = "l2"
[database]
url = "sqlite:///var/ops.db"
[storage]
dir = "var/artifacts"
""")
    return path


@pytest.fixture
def sessions(config):
    settings = load_config(config, environ={})
    engine = make_engine(settings.database_url)
    upgrade(engine)
    yield make_session_factory(engine)
    engine.dispose()


def seed(sessions) -> list[int]:
    rows = [
        Inspection(frame_id="a", source="cam1", line="l1", captured_at=T0, model_version="v1", score=0.2,
                   threshold=0.5, is_anomalous=False),
        Inspection(frame_id="b", source="cam1", line="l1", captured_at=T0 + timedelta(hours=1), model_version="v1",
                   score=0.8, threshold=0.5, is_anomalous=True, regions=[{"x": 1, "y": 1, "w": 2, "h": 2}]),
        Inspection(frame_id="c", source="cam2", line="l2", captured_at=T0 + timedelta(hours=2), model_version="v1",
                   score=0.95, threshold=0.5, is_anomalous=True),
    ]
    with sessions() as session, session.begin():
        session.add_all(rows)
    return [row.id for row in rows]


def run(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_defects_table_and_json(config, sessions, capsys):
    a, b, c = seed(sessions)
    code, out, _ = run(capsys, "defects", "--config", str(config), "--json")
    assert code == 0
    assert [item["id"] for item in json.loads(out)] == [c, b]  # anomalous ones, newest first
    code, out, _ = run(capsys, "defects", "--config", str(config), "--json", "--all", "--source", "cam1")
    assert [item["id"] for item in json.loads(out)] == [b, a]
    code, out, _ = run(capsys, "defects", "--config", str(config), "--json", "--min-score", "0.9")
    assert [item["id"] for item in json.loads(out)] == [c]
    code, out, _ = run(capsys, "defects", "--config", str(config), "--json", "--line", "l1",
                       "--since", "2024-05-01T08:30:00Z", "--until", "2024-05-01T10:00:00")
    assert [item["id"] for item in json.loads(out)] == [b]
    code, out, _ = run(capsys, "defects", "--config", str(config), "--json", "--limit", "1", "--sort", "score_asc")
    assert [item["id"] for item in json.loads(out)] == [b]

    code, out, _ = run(capsys, "defects", "--config", str(config))
    lines = out.splitlines()
    assert lines[0].split()[:5] == ["id", "captured_at", "source", "line", "score"]
    assert lines[1].split()[0] == str(c) and "0.950" in lines[1] and "cam2" in lines[1]
    assert len(lines) == 3

    code, _, err = run(capsys, "defects", "--config", str(config), "--since", "yesterday")
    assert code == 2 and "--since" in err


def test_label_with_mask_and_label_filter(config, sessions, capsys, tmp_path):
    _, b, c = seed(sessions)
    mask = tmp_path / "mask.png"
    cv2.imwrite(str(mask), np.full((8, 8), 255, np.uint8))
    code, out, _ = run(capsys, "label", str(b), "anomalous", "--mask", str(mask), "--author", "alice",
                       "--config", str(config))
    assert code == 0 and f"inspection {b} labelled anomalous by alice" in out
    code, _, _ = run(capsys, "label", str(c), "normal", "--config", str(config))
    assert code == 0
    with sessions() as session:
        labels = {row.inspection_id: row for row in session.scalars(select(Label))}
    assert labels[b].author == "alice" and labels[b].mask_path.endswith("_label.png")
    stored = config.parent / "var" / "artifacts" / labels[b].mask_path
    assert stored.read_bytes() == mask.read_bytes()
    assert labels[c].label == "normal" and labels[c].author.startswith("cli:") and labels[c].mask_path is None

    code, out, _ = run(capsys, "defects", "--config", str(config), "--json", "--label", "normal")
    assert [item["id"] for item in json.loads(out)] == [c]

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"GIF89a not a png")
    code, _, err = run(capsys, "label", str(b), "anomalous", "--mask", str(bad), "--config", str(config))
    assert code == 2 and "bad.png" in err and "PNG" in err
    code, _, err = run(capsys, "label", "9999", "normal", "--config", str(config))
    assert code == 1 and "9999" in err  # a runtime failure (no such inspection), not a usage error
    code, _, _ = run(capsys, "label", str(b), "maybe", "--config", str(config))
    assert code == 2
    with sessions() as session:
        assert len(session.scalars(select(Label)).all()) == 2


def test_models_list_and_activate(config, sessions, capsys):
    with sessions() as session, session.begin():
        session.add_all([ModelVersion(version="v1", kind="anomalyclip", status="active", activated_at=T0,
                                      created_at=T0),
                         ModelVersion(version="v2", kind="anomalyclip", status="candidate",
                                      metrics={"image_auroc": 0.912}, created_at=T0 + timedelta(days=1))])
    code, out, _ = run(capsys, "models", "list", "--config", str(config))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["v2", "candidate"] and "image_auroc=0.912" in lines[0]
    assert lines[1].split()[:2] == ["v1", "active"]
    code, out, _ = run(capsys, "models", "activate", "v2", "--config", str(config))
    assert code == 0 and "v2" in out
    code, out, _ = run(capsys, "models", "list", "--json", "--config", str(config))
    assert {item["version"]: item["status"] for item in json.loads(out)} == {"v1": "retired", "v2": "active"}
    code, _, err = run(capsys, "models", "activate", "nope", "--config", str(config))
    assert code == 2 and "nope" in err


def good_frames(directory: Path, values=(64, 128, 192)) -> Path:
    directory.mkdir()
    for value in values:
        cv2.imwrite(str(directory / f"good_{value}.png"), np.full((40, 40, 3), value, np.uint8))
    (directory / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return directory


def test_calibrate_prints_and_writes_threshold(config, capsys, tmp_path):
    good = good_frames(tmp_path / "good")
    factory = "tests.daemon.test_ops_cli:brightness_factory"
    code, out, err = run(capsys, "calibrate", "--source", "cam1", "--good", str(good), "--method", "max",
                         "--json", "--config", str(config), "--detector-factory", factory)
    assert code == 0, err
    result = json.loads(out)
    assert result["threshold"] == pytest.approx(192 / 255, abs=0.01)
    assert result["images"] == 3 and result["skipped"] == 1 and "broken.png" in err
    assert result["written"] is None

    code, out, _ = run(capsys, "calibrate", "--source", "cam1", "--good", str(good), "--quantile", "0.5",
                       "--margin", "0.05", "--config", str(config), "--detector-factory", factory)
    assert code == 0 and 'threshold = 0.55' in out  # median 128/255 = 0.502 + 0.05

    before = config.read_text()
    code, out, _ = run(capsys, "calibrate", "--source", "cam2", "--good", str(good), "--method", "max", "--write",
                       "--config", str(config), "--detector-factory", factory)
    assert code == 0 and "written to" in out
    code, out, _ = run(capsys, "calibrate", "--source", "cam1", "--good", str(good), "--quantile", "0.5", "--write",
                       "--config", str(config), "--detector-factory", factory)
    assert code == 0
    settings = load_config(config, environ={})
    assert settings.source("cam2").threshold == pytest.approx(192 / 255, abs=0.01)  # inserted
    assert settings.source("cam1").threshold == pytest.approx(128 / 255, abs=0.01)  # replaced
    after = config.read_text()
    assert "# plant config" in after and "# set by hand" in after
    assert len(after.splitlines()) == len(before.splitlines()) + 1

    code, _, err = run(capsys, "calibrate", "--source", "cam9", "--good", str(good), "--config", str(config),
                       "--detector-factory", factory)
    assert code == 2 and "cam9" in err
    code, _, err = run(capsys, "calibrate", "--source", "cam1", "--good", str(tmp_path / "none"),
                       "--config", str(config), "--detector-factory", factory)
    assert code == 2 and "none" in err
