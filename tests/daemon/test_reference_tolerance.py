"""References never stop a source (issue 19), through the daemon, its API and `anomalyd config check` (tiny CLIP from
../shared, folder sources, SQLite): references a few pixels apart make one bank; a frame far off in size is refused
when added, with the bank unchanged; a failed rebuild keeps the last good bank and is retried with backoff; a source
without a bank is not ready, says why, and its frames wait in the inbox."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import cv2
import pytest
from fastapi.testclient import TestClient

from daemon.api import routers
from daemon.api.app import create_app
from tests.adapters.test_mqtt import Subscriber
from tests.daemon.test_api import auth
from tests.daemon.test_references import _rows, _service, _settings, _texture, _write
from tests.model.golden import tiny_backbone
from tests.waiting import wait_until


@pytest.fixture(scope="module")
def backbone(golden_dir):
    return tiny_backbone(golden_dir)


def test_references_a_few_pixels_apart_make_one_bank_and_a_far_off_frame_is_refused(tmp_path, backbone, capsys):
    refs = tmp_path / "refs"
    for index, (height, width) in enumerate([(160, 160), (161, 158), (163, 160), (157, 162)]):
        _write(refs / f"ref{index}.png", cv2.resize(_texture(100 + index), (width, height)))
    (tmp_path / "cam").mkdir()
    settings = _settings(tmp_path, [{"id": "cam", "references": str(refs)}])
    service = _service(settings, backbone)
    service.start()
    try:
        assert "cam" not in service.references.unavailable and service.references.states["cam"].detector is not None
        assert service.readiness()[0]
        _write(tmp_path / "cam" / "big.png", cv2.resize(_texture(7), (150, 170)))  # a frame of another size
        _write(tmp_path / "cam" / "small.png", cv2.resize(_texture(8), (80, 80)))
        assert wait_until(lambda: len(_rows(service)) == 2, timeout=60)
        rows = {Path(row.frame_name).name: row for row in _rows(service)}
        client = TestClient(create_app(service.app_state(), routers()))
        before = sorted(p.name for p in refs.iterdir())
        refused = client.post("/api/sources/cam/references", json={"inspection_ids": [rows["small.png"].id]},
                              headers=auth("operator"))
        assert refused.status_code == 422 and "80x80" in refused.json()["detail"]
        assert "10 %" in refused.json()["detail"] and sorted(p.name for p in refs.iterdir()) == before
        added = client.post("/api/sources/cam/references", json={"inspection_ids": [rows["big.png"].id]},
                            headers=auth("operator"))
        assert added.status_code == 201, added.text  # 150x170 is within 10 % of 160x160 per side
    finally:
        service.stop()


def test_failed_rebuild_keeps_the_last_good_bank_and_a_source_without_one_is_not_ready(tmp_path, backbone, caplog,
                                                                                       mosquitto):
    refs = tmp_path / "refs"
    for index in range(3):
        _write(refs / f"ref{index}.png", _texture(100 + index))
    empty = tmp_path / "refs-empty"
    empty.mkdir()
    for source in ("cam", "new"):
        (tmp_path / source).mkdir()
    settings = _settings(tmp_path, [{"id": "cam", "references": str(refs)},
                                    {"id": "new", "references": str(empty)}],
                         mqtt={"host": "127.0.0.1", "port": mosquitto.port, "client_id": f"tol-{tmp_path.name[-8:]}"})
    statuses = Subscriber(mosquitto.port, "anomalyd/default/+/status")
    service = _service(settings, backbone)
    service.start()
    try:
        manager = service.references
        manager.poll_s = 0.1  # retries come fast here; the backoff must still hold them back
        good_version = manager.states["cam"].version
        client = TestClient(create_app(service.app_state(), routers()))
        ready = client.get("/api/health/ready")
        assert ready.status_code == 503 and any("refs-empty" in c for c in ready.json()["details"]["causes"])
        # ... and says so everywhere else: the retained MQTT status and the metric
        assert statuses.wait_for(lambda: statuses.texts("anomalyd/default/new/status")[-1:] == ["unavailable"]
                                 and statuses.texts("anomalyd/default/cam/status")[-1:] == ["online"])
        metrics = service.metrics.render().decode()
        assert 'anomalyd_source_ready{source="new"} 0.0' in metrics
        assert 'anomalyd_source_ready{source="cam"} 1.0' in metrics
        _write(tmp_path / "new" / "waiting.png", _texture(9))
        # A broken file in cam's references: the rebuild fails, cam keeps its last good bank.
        caplog.set_level(logging.INFO, logger="anomalyd.references")
        (refs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
        manager.wake()
        assert wait_until(lambda: manager.states["cam"].error is not None, timeout=30)
        assert "broken.png" in manager.states["cam"].error and "cam" not in manager.unavailable
        _write(tmp_path / "cam" / "f0.png", _texture(7))
        assert wait_until(lambda: any(r.source == "cam" for r in _rows(service)), timeout=60)
        assert [r.model_version for r in _rows(service) if r.source == "cam"] == [good_version]
        for _ in range(20):  # polls and wakes: the failed build is not redone at each (no log flood)
            manager.wake()
            manager.check()
        builds = [r for r in caplog.records if "building the reference bank" in r.getMessage()
                  and "source cam" in r.getMessage()]
        assert len(builds) <= 2
        # The source without a bank: its frame waits in the inbox, nothing rejected; references arrive → inspected.
        assert (tmp_path / "new" / "waiting.png").is_file() and not any(r.source == "new" for r in _rows(service))
        for index in range(2):
            _write(empty / f"ref{index}.png", _texture(110 + index))
        manager.wake()
        assert wait_until(lambda: any(r.source == "new" for r in _rows(service)), timeout=60)
        assert client.get("/api/health/ready").status_code == 200
        assert statuses.wait_for(lambda: statuses.texts("anomalyd/default/new/status")[-1:] == ["online"])
        assert 'anomalyd_source_ready{source="new"} 1.0' in service.metrics.render().decode()
    finally:
        service.stop()
        statuses.close()


def test_config_check_checks_references_as_the_daemon_does(tmp_path, capsys):
    from daemon.cli import main

    refs = tmp_path / "refs"
    _write(refs / "a.png", _texture(1))
    _write(refs / "b.png", cv2.resize(_texture(2), (162, 159)))  # a few pixels apart: one camera setting
    config = tmp_path / "config.toml"
    config.write_text(f"""[model]
name = "patchcore"
[[sources]]
id = "cam"
kind = "folder"
uri = "inbox"
references = "{refs}"
[[sources]]
id = "bare"
kind = "folder"
uri = "inbox2"
[database]
url = "sqlite:///var/a.db"
""")

    def errors() -> list[str]:
        capsys.readouterr()
        with contextlib.suppress(SystemExit):
            main(["config", "check", "--json", "--config", str(config)])
        import json

        return [f["message"] for f in json.loads(capsys.readouterr().out)["findings"]
                if f["level"] == "error" and f["message"].startswith("source ")]  # weights: not this test's

    found = errors()
    assert len(found) == 1 and "source bare: patchcore needs references" in found[0]
    _write(refs / "c.png", cv2.resize(_texture(3), (120, 160)))  # 25 % narrower: the daemon refuses the set
    found = errors()
    assert any("source cam: reference c.png is 120x160" in e and "10 %" in e for e in found)
