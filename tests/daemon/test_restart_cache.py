"""Fast restarts (issue 19): a restart with unchanged references reads the calibration views' known-good scores back
(daemon/references/known_good_cache.py) and keeps the stored calibration instead of recomputing them; changed references
recompute. PatchCore on real EfficientNet-Lite0 weights at 64 px, synthetic textures, SQLite; the start times are
logged, not asserted (a loaded 2-core box)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from sqlalchemy import select

from adapters.db import Inspection
from daemon.config.settings import load_config
from daemon.process.service import Service
from tests.waiting import wait_until

log = logging.getLogger(__name__)


def _texture(seed: int) -> np.ndarray:
    base = cv2.resize(np.random.default_rng(7).integers(0, 256, (12, 12, 3)).astype(np.uint8), (128, 128),
                      interpolation=cv2.INTER_CUBIC).astype(np.int16)
    return np.clip(base + np.random.default_rng(seed).integers(-4, 5, base.shape), 0, 255).astype(np.uint8)


def _start(tmp_path: Path, refs: Path) -> tuple[Service, float]:
    settings = load_config(None, environ={}, overrides={
        "model": {"name": "patchcore", "image_size": 64},
        "runtime": {"device": "cpu", "max_batch_size": 4, "max_batch_delay_ms": 5, "shutdown_grace_s": 10},
        "sources": [{"id": "cam", "kind": "folder", "uri": str(tmp_path / "cam"), "settle_s": 0.02,
                     "poll_interval_s": 0.05, "references": str(refs)}],
        "mqtt": {"enabled": False}, "database": {"url": f"sqlite:///{tmp_path}/anomalyd.db"},
        "storage": {"dir": str(tmp_path / "artifacts")}, "api": {"enabled": False},
    })
    service = Service(settings, serve_http=False)
    started = time.monotonic()
    service.start()
    return service, time.monotonic() - started


def _inspected(service: Service, tmp_path: Path, name: str, seed: int) -> Inspection:
    assert cv2.imwrite(str(tmp_path / "cam" / name), _texture(seed))

    def row() -> Inspection | None:
        with service.sessions() as session:
            return session.scalars(select(Inspection).where(Inspection.frame_name.like(f"%{name}"))).first()

    assert wait_until(lambda: row() is not None, timeout=60)
    return row()


def test_a_restart_with_unchanged_references_reads_the_known_good_scores_back(tmp_path, caplog):
    refs = tmp_path / "refs"
    refs.mkdir()
    for index in range(4):
        assert cv2.imwrite(str(refs / f"ref{index}.png"), _texture(100 + index))
    (tmp_path / "cam").mkdir()
    caplog.set_level(logging.INFO, logger="anomalyd.references")
    service, first_s = _start(tmp_path, refs)
    try:
        known = service.references.states["cam"].detector.known_good
        threshold = _inspected(service, tmp_path, "a.png", 1).threshold
    finally:
        service.stop()
    assert any("computed in" in r.getMessage() for r in caplog.records)
    caplog.clear()

    service, second_s = _start(tmp_path, refs)
    try:
        again = service.references.states["cam"].detector.known_good
        row = _inspected(service, tmp_path, "b.png", 2)
    finally:
        service.stop()
    log.warning("start with references: first %.2f s, restart %.2f s (known-good scores cached)", first_s, second_s)
    assert any("read from cam.known-good.json" in r.getMessage() for r in caplog.records)
    assert not any("computed in" in r.getMessage() for r in caplog.records)
    assert again.scores == pytest.approx(known.scores) and again.distance_scale == pytest.approx(known.distance_scale)
    assert row.threshold == pytest.approx(threshold)  # the same calibration, kept, not recomputed

    caplog.clear()  # another reference: recomputed
    assert cv2.imwrite(str(refs / "ref9.png"), _texture(109))
    service, _ = _start(tmp_path, refs)
    service.stop()
    assert any("computed in" in r.getMessage() for r in caplog.records)


def test_plain_calibrate_works_for_patchcore_and_its_write_applies(tmp_path, capsys):
    """`anomalyd calibrate` without --false-reject-rate on a patchcore source (references from the config): the
    threshold is stored for the version the source runs (so it applies, whatever the stored calibration was) and
    `--write` puts the same value into the config file."""
    import json

    from daemon.cli import main

    refs, good = tmp_path / "refs", tmp_path / "good"
    refs.mkdir()
    good.mkdir()
    for index in range(3):
        assert cv2.imwrite(str(refs / f"ref{index}.png"), _texture(100 + index))
    for index in range(5):
        assert cv2.imwrite(str(good / f"good{index}.png"), _texture(200 + index))
    config = tmp_path / "config.toml"
    config.write_text(f"""[model]
name = "patchcore"
image_size = 64
[[sources]]
id = "cam"
kind = "folder"
uri = "{tmp_path / 'cam'}"
references = "{refs}"
[database]
url = "sqlite:///{tmp_path}/anomalyd.db"
[storage]
dir = "{tmp_path / 'artifacts'}"
""")
    assert main(["db", "upgrade", "--config", str(config)]) == 0
    capsys.readouterr()
    assert main(["calibrate", "--source", "cam", "--good", str(good), "--method", "max", "--margin", "0.01",
                 "--write", "--json", "--config", str(config)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 5 and result["stored"] and "+ref-" in result["model_version"]
    assert 0 < result["threshold"] < 1 and result["written"] == str(config)
    assert f"threshold = {result['threshold']}" in config.read_text()
    assert main(["thresholds", "show", "--source", "cam", "--json", "--config", str(config)]) == 0
    shown = json.loads(capsys.readouterr().out)[0]
    assert shown["origin"] == "calibrated" and shown["threshold"] == pytest.approx(result["threshold"], abs=1e-6)
    assert shown["model_version"] == result["model_version"]
