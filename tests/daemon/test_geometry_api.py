"""`/api/sources/{id}/geometry` (issue 20): a source's ROI, ignore polygons and resize set at runtime, checked
against its frame (422 with the reason), recorded with who and when, kept across a restart of the app, and seen by
what builds the bank; the reference manager rebuilds a source's bank when its geometry changes."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient

from adapters.db import Inspection, make_engine, make_session_factory, upgrade
from daemon.api import routers
from daemon.api.app import AppState, create_app
from daemon.config.settings import load_config
from daemon.references import geometry_overrides as overrides
from daemon.references.manager import ReferenceManager
from daemon.telemetry.metrics import Metrics
from tests.daemon.test_api import TOKENS, auth

FRAME_W, FRAME_H = 640, 480


def _settings(tmp_path: Path, model: str = "patchcore", **source):
    tokens = [{"name": "viewer-1", "role": "viewer", "token": TOKENS["viewer"]},
              {"name": "operator-1", "role": "operator", "token": TOKENS["operator"]}]
    return load_config(None, environ={}, overrides={
        "api": {"tokens": tokens}, "storage": {"dir": str(tmp_path / "artifacts")},
        "model": {"name": model},
        "database": {"url": f"sqlite:///{tmp_path}/geo.db"},
        "sources": [{"id": "cam1", "kind": "folder", "uri": str(tmp_path / "in1"), **source},
                    {"id": "cam2", "kind": "folder", "uri": str(tmp_path / "in2")}]})


class App:
    """The API over a SQLite file (one inspection of cam1 with a 640x480 frame); `restart()` makes a new app from
    freshly loaded settings on the same files, as a restarted daemon would."""

    def __init__(self, tmp_path: Path, **settings) -> None:
        self.tmp_path, self.options = tmp_path, settings
        self.engine = make_engine(f"sqlite:///{tmp_path}/geo.db")
        upgrade(self.engine)
        self.sessions = make_session_factory(self.engine)
        with self.sessions() as session, session.begin():
            session.add(Inspection(uuid="u1", frame_id="f1", source="cam1", line="default", frame_name="f1.png",
                                   captured_at=datetime.now(timezone.utc), model_version="v", score=0.1,
                                   threshold=0.5, is_anomalous=False, regions=[], width=FRAME_W, height=FRAME_H))
        self.restart()

    def restart(self) -> None:
        self.settings = _settings(self.tmp_path, **self.options)
        state = AppState(settings=self.settings, metrics=Metrics(), readiness=lambda: (True, {}),
                         sessions=self.sessions)
        self.client = TestClient(create_app(state, routers()))

    def put(self, body: dict, role: str = "operator", source: str = "cam1"):
        return self.client.put(f"/api/sources/{source}/geometry", json=body, headers=auth(role))

    def get(self, source: str = "cam1") -> dict:
        response = self.client.get(f"/api/sources/{source}/geometry", headers=auth("viewer"))
        assert response.status_code == 200, response.text
        return response.json()


@pytest.fixture
def app(tmp_path):
    made = App(tmp_path, resize="fit")
    yield made
    made.engine.dispose()


ROI = [40, 30, 400, 300]
POLYGON = [[100.0, 100.0], [200.0, 100.0], [150.0, 180.0]]


def test_get_shows_values_with_their_origin_and_the_frame(app):
    shown = app.get()
    assert shown["geometry"] == {"resize": "fit", "roi": None, "ignore_polygons": [], "tile_overlap": 0.25,
                                 "tile_size": None}
    assert shown["origins"] == {"resize": "[[sources]] cam1", "roi": "default", "ignore_polygons": "default",
                                "tile_overlap": "default", "tile_size": "default"}
    assert shown["override"] is None and shown["last_change"] is None
    assert shown["frame"]["width"] == FRAME_W and shown["frame"]["height"] == FRAME_H
    assert app.get("cam2")["origins"]["resize"] == "default"
    assert app.client.get("/api/sources/nope/geometry", headers=auth("viewer")).status_code == 404
    assert app.client.get("/api/sources/cam1/geometry").status_code == 401
    listed = app.client.get("/api/geometry", headers=auth("viewer")).json()["items"]
    assert [(item["source"], item["overridden"]) for item in listed] == [("cam1", False), ("cam2", False)]


def test_put_sets_records_and_survives_a_restart(app):
    assert app.put({"roi": ROI}, role="viewer").status_code == 403
    response = app.put({"roi": ROI, "ignore_polygons": [POLYGON], "resize": "tile"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["geometry"] == {"resize": "tile", "roi": ROI, "ignore_polygons": [POLYGON], "tile_overlap": 0.25,
                                 "tile_size": None}
    assert body["origins"] == {"resize": "override", "roi": "override", "ignore_polygons": "override",
                               "tile_overlap": "default", "tile_size": "default"}
    assert body["override"]["set_by"] == "api:operator-1" and body["override"]["set_at"].endswith("Z")
    assert body["change"]["before"]["resize"] == "fit" and body["change"]["after"]["roi"] == ROI

    # a second PUT changes one key and keeps the others
    assert app.put({"roi": None}).status_code == 200
    app.restart()
    shown = app.get()
    assert shown["geometry"] == {"resize": "tile", "roi": None, "ignore_polygons": [POLYGON], "tile_overlap": 0.25,
                                 "tile_size": None}
    assert shown["last_change"]["action"] == "set" and shown["last_change"]["after"]["roi"] is None
    history = app.client.get("/api/sources/cam1/geometry/history", headers=auth("viewer")).json()["items"]
    assert [(e["action"], e["after"]["roi"], e["set_by"]) for e in history] == [
        ("set", None, "api:operator-1"), ("set", ROI, "api:operator-1")]
    # what builds the bank sees it (daemon/references/manager.py default_builder)
    geometry = overrides.effective_geometry(app.settings, "cam1")
    assert geometry.resize == "tile" and geometry.roi is None and len(geometry.ignore) == 1
    assert overrides.effective_geometry(app.settings, "cam2").resize == "squash"  # the other source is untouched

    # DELETE goes back to the configuration, recorded too
    response = app.client.delete("/api/sources/cam1/geometry", headers=auth("operator"))
    assert response.status_code == 200, response.text
    assert response.json()["geometry"]["resize"] == "fit" and response.json()["override"] is None
    again = app.client.delete("/api/sources/cam1/geometry", headers=auth("operator"))
    assert again.status_code == 404 and "no geometry override" in again.json()["detail"]
    app.restart()
    assert app.get()["last_change"]["action"] == "reset"
    assert app.get()["geometry"]["resize"] == "fit"


@pytest.mark.parametrize(("body", "reason"), [
    ({"roi": [10, 10, 4, 100]}, "degenerate"),
    ({"roi": [-5, 10, 100, 100]}, "degenerate"),
    ({"roi": [600, 10, 100, 100]}, "reaches outside the 640x480 frame"),
    ({"ignore_polygons": [[[10, 10], [700, 10], [10, 50]]]}, "point [700.0, 10.0] is outside the 640x480 frame"),
    ({"ignore_polygons": [[[10, 10], [20, 20], [30, 30]]]}, "ignore polygon 1 [[10.0, 10.0], [20.0, 20.0], [30.0, 30.0]]: degenerate"),
    ({"ignore_polygons": [[[10, 10], [20, 20]]]}, "needs at least 3"),
    ({}, "nothing to set"),
])
def test_bad_geometry_is_422_with_the_reason_and_changes_nothing(app, body, reason):
    response = app.put(body)
    assert response.status_code == 422, response.text
    assert reason in response.json()["detail"], response.json()["detail"]
    assert app.get()["override"] is None
    assert not overrides.override_path(app.settings, "cam1").exists()


def test_malformed_body_is_422(app):
    for body in ({"roi": [1, 2, 3]}, {"resize": "stretch"}, {"tile_overlap": 0.95}, {"colour": "red"}, {"tile_size": 8},
                 {"ignore_polygons": [[[1, 2, 3], [4, 5], [6, 7]]]}):
        assert app.put(body).status_code == 422, body


def test_tile_size_is_set_and_reset_to_native_resolution(app):
    """Coarser tiles for a long part: what builds the bank sees them (its tag changes), and null goes back."""
    response = app.put({"resize": "tile", "tile_size": 500})
    assert response.status_code == 200, response.text
    assert response.json()["geometry"]["tile_size"] == 500 and response.json()["origins"]["tile_size"] == "override"
    assert overrides.effective_geometry(app.settings, "cam1").bank_tag == "tile-o25-t500"
    assert app.put({"tile_size": None}).status_code == 200
    assert app.get()["geometry"]["tile_size"] is None
    assert overrides.effective_geometry(app.settings, "cam1").bank_tag == "tile-o25"


def test_a_family_that_runs_whole_frames_refuses_a_geometry(tmp_path):
    app = App(tmp_path, model="anomalyclip")
    try:
        response = app.put({"resize": "fit"})
        assert response.status_code == 422
        assert "need model patchcore or patchcore-head; model 'anomalyclip' takes whole frames squashed" in response.json()["detail"]
        assert "need model patchcore" in app.put({"roi": ROI}).json()["detail"]
        assert app.put({"resize": "squash"}).status_code == 200  # what it runs anyway is fine
        assert app.get()["supported"] is False
    finally:
        app.engine.dispose()


class _Detector:
    def __init__(self, geometry) -> None:
        self.geometry = geometry
        self.version = f"fake-{geometry.tag or 'squash'}"


class _Base:
    name, version, image_size, device = "fake", "fake", 64, "cpu"


def test_a_geometry_change_rebuilds_the_sources_bank_and_a_reset_rebuilds_it_again(tmp_path):
    settings = _settings(tmp_path, resize="fit", references=str(tmp_path / "refs"))
    (tmp_path / "refs").mkdir()
    for index in range(2):
        assert cv2.imwrite(str(tmp_path / "refs" / f"r{index}.png"), np.full((FRAME_H, FRAME_W, 3), 100 + index,
                                                                             np.uint8))
    built: list[str] = []

    def builder(base, files, cache):
        built.append(cache.stem)
        return _Detector(overrides.effective_geometry(settings, cache.stem))

    manager = ReferenceManager(settings, builder=builder, source_ids=["cam1"], auto_calibrate=False)
    routed = manager.route(_Base())
    assert routed.version_for("cam1") == "fake-fit" and built == ["cam1"]
    assert manager.check() is False  # nothing changed: no rebuild
    overrides.check_override(settings, "cam1", {"roi": ROI}, (FRAME_H, FRAME_W))
    overrides.save_override(settings, "cam1", {"roi": ROI}, set_by="test")
    assert manager.check() is True
    assert manager.states["cam1"].version == "fake-fit-roi40x30x400x300" and built == ["cam1", "cam1"]
    overrides.clear_override(settings, "cam1", set_by="test")
    assert manager.check() is True and manager.states["cam1"].version == "fake-fit"


def test_an_unreadable_override_file_is_named_and_can_be_removed(app):
    path = overrides.override_path(app.settings, "cam1")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{not json", encoding="utf-8")
    response = app.client.get("/api/sources/cam1/geometry", headers=auth("viewer"))
    assert response.status_code == 500 and f"geometry override {path}: cannot read it" in response.json()["detail"]
    assert "cannot read it" in app.put({"roi": ROI}).json()["detail"]
    with pytest.raises(overrides.GeometryError, match="cannot read it"):  # the bank build fails naming the file
        overrides.effective_geometry(app.settings, "cam1")
    response = app.client.delete("/api/sources/cam1/geometry", headers=auth("operator"))
    assert response.status_code == 200, response.text
    assert "cannot read it" in response.json()["change"]["before"]["error"]
    assert app.get()["geometry"]["resize"] == "fit"


def test_each_change_through_the_api_is_a_retained_outbox_message_and_a_refused_one_none(app):
    from sqlalchemy import select

    from adapters.db import OutboxMessage
    from adapters.db.outbox import as_event
    from adapters.mqtt import mqtt_message

    def messages() -> list[OutboxMessage]:
        with app.sessions() as session:
            return list(session.scalars(select(OutboxMessage).order_by(OutboxMessage.seq)))

    assert app.put({"roi": [600, 0, 100, 100]}).status_code == 422  # outside the 640x480 frame
    assert messages() == []
    assert app.put({"roi": ROI, "ignore_polygons": [POLYGON]}).status_code == 200
    assert app.client.delete("/api/sources/cam1/geometry", headers=auth("operator")).status_code == 200
    set_row, reset_row = messages()
    assert set_row.event_type == reset_row.event_type == "geometry"
    # what MQTT makes of them (adapters.mqtt.mqtt_message): a retained state on the source's geometry topic
    set_message, reset_message = (mqtt_message(as_event(row), "anomalyd", 0) for row in (set_row, reset_row))
    assert set_message.topic == reset_message.topic == "anomalyd/default/cam1/geometry"
    assert set_message.retain and reset_message.retain and set_message.qos == 1
    payload = json.loads(set_message.payload)
    assert (payload["event"], payload["action"], payload["set_by"], payload["line"]) == (
        "geometry", "set", "api:operator-1", "default")
    assert payload["geometry"]["roi"] == ROI and payload["id"] == set_row.id
    assert json.loads(reset_message.payload)["geometry"]["roi"] is None
