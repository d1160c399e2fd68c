"""`GET /api/sources/{id}/calibration` (the UI's references and calibration page) on a real database: the histogram
of recent frames by newest label, the false-reject/miss curve of the labelled frames, the threshold in effect with
the history row that set it (calibrated, pinned through the API, unpinned), reference thumbnails and leave-one-out
scores, and its errors."""

from __future__ import annotations

import hashlib
import io
import math
import uuid
from datetime import timedelta
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from adapters.db import Inspection, Label, SourceThreshold, make_engine, make_session_factory, upgrade
from adapters.storage import ArtifactStore
from daemon.api import routers
from daemon.api.app import AppState, create_app
from daemon.config.settings import load_config
from daemon.references import thresholds
from daemon.references.files import own_reference_dir
from daemon.telemetry.metrics import Metrics
from model.known_good import KnownGoodScores
from tests.adapters.test_db import create_pg_database
from tests.daemon.test_api import T0, TOKENS, auth

# cam1's frames: (score, labels oldest first); the newest label counts
FRAMES = [(0.10, ["normal"]), (0.20, ["anomalous", "normal"]), (0.30, ["normal"]), (0.55, ["normal"]),
          (0.50, ["anomalous"]), (0.70, ["anomalous"]), (0.90, ["anomalous"]), (0.40, []), (0.95, [])]


class StubReferences:
    """What the endpoints read of the daemon's ReferenceManager: a running PatchCore bank of cam1 that held out
    ref-a.png (raw leave-one-out distance 1.0 at distance scale 2.0)."""

    def __init__(self) -> None:
        known = KnownGoodScores([1.0], [1.0], 2.0, 1, 0, own=[1.0], own_files=["ref-a.png"])
        detector = SimpleNamespace(name="patchcore", distance_scale=2.0, known_good=known)
        self.states = {"cam1": SimpleNamespace(detector=detector, files=[],
                                               as_dict=lambda: {"source": "cam1", "references": 2, "ready": True})}
        self.thresholds = SimpleNamespace(pins={})
        self.refreshed = 0

    def refresh_thresholds(self) -> None:
        self.refreshed += 1

    def wake(self) -> None:
        pass


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.services)])
def page_env(request, tmp_path):
    url = f"sqlite:///{tmp_path}/cal.db" if request.param == "sqlite" else \
        create_pg_database(request.getfixturevalue("postgres").url)
    tokens = [{"name": "viewer-1", "role": "viewer", "token": TOKENS["viewer"]},
              {"name": "operator-1", "role": "operator",
               "token_sha256": hashlib.sha256(TOKENS["operator"].encode()).hexdigest()}]
    settings = load_config(None, environ={}, overrides={
        "api": {"tokens": tokens}, "storage": {"dir": str(tmp_path / "artifacts")},
        "sources": [{"id": "cam1", "kind": "folder", "uri": str(tmp_path / "in1"), "threshold": 0.5},
                    {"id": "cam2", "kind": "folder", "uri": str(tmp_path / "in2")}]})
    engine = make_engine(url)
    upgrade(engine)
    sessions = make_session_factory(engine)
    store = ArtifactStore(tmp_path / "artifacts")
    ids = []
    for index, (score, labels) in enumerate([*FRAMES, (0.05, ["anomalous"])]):
        source = "cam2" if index == len(FRAMES) else "cam1"  # another source's label must not count
        key = uuid.uuid4().hex
        when = T0 + timedelta(minutes=index)
        paths = store.write(key, when, rgb=np.full((16, 16, 3), 40 + 10 * index, np.uint8),
                            anomaly_map=np.zeros((16, 16), np.float32), mask=np.zeros((16, 16), np.uint8))
        row = Inspection(uuid=key, frame_id=f"f-{index}", source=source, line="l1", captured_at=when,
                         model_version="v1", score=score, threshold=0.5, is_anomalous=score >= 0.5, regions=[],
                         width=16, height=16, frame_path=paths.frame)
        with sessions() as session, session.begin():
            session.add(row)
        for label in labels:
            with sessions() as session, session.begin():
                session.add(Label(inspection_id=row.id, label=label, author="seed"))
        ids.append(row.id)
    folder = own_reference_dir(settings, "cam1")
    folder.mkdir(parents=True)
    for name, shade in (("ref-a.png", 60), ("ref-b.png", 200)):
        cv2.imwrite(str(folder / name), np.full((300, 400, 3), shade, np.uint8))
    stub = StubReferences()
    state = AppState(settings=settings, metrics=Metrics(), readiness=lambda: (True, {}), sessions=sessions,
                     store=store, references=stub)
    client = TestClient(create_app(state, routers()))
    yield SimpleNamespace(client=client, sessions=sessions, ids=ids, stub=stub, folder=folder)
    client.close()
    engine.dispose()


def get(env, source="cam1", **params):
    response = env.client.get(f"/api/sources/{source}/calibration", params=params, headers=auth("viewer"))
    assert response.status_code == 200, response.text
    return response.json()


def test_histogram_and_curve_from_labelled_frames(page_env):
    data = get(page_env, bins=10)
    histogram = data["histogram"]
    assert histogram["frames"] == len(FRAMES) and histogram["bins"] == 10
    assert histogram["normal"] == [0, 1, 1, 1, 0, 1, 0, 0, 0, 0]  # 0.20 was relabelled normal
    assert histogram["anomalous"] == [0, 0, 0, 0, 0, 1, 0, 1, 0, 1]
    assert histogram["unlabelled"] == [0, 0, 0, 0, 1, 0, 0, 0, 0, 1]
    assert sorted(data["labelled"]["normal"]) == [0.10, 0.20, 0.30, 0.55]
    assert sorted(data["labelled"]["anomalous"]) == [0.50, 0.70, 0.90]  # cam2's 0.05 is not cam1's
    assert data["labelled"]["model_versions"] == {"v1": 7}
    got = [(round(p["threshold"], 4), p["false_rejects"], p["misses"]) for p in data["curve"]]
    assert got == [(0.10, 4, 0), (0.15, 3, 0), (0.25, 2, 0), (0.40, 1, 0), (0.525, 1, 1), (0.625, 0, 1),
                   (0.80, 0, 2), (0.95, 0, 3)]
    assert data["curve"][4]["false_reject_rate"] == 0.25 and data["curve"][4]["miss_rate"] == pytest.approx(1 / 3)
    # the configured 0.5: 0.55 is a false reject, the anomaly at exactly 0.50 alerts (score >= threshold)
    assert data["threshold"]["origin"] == "configured" and data["threshold"]["set_by_row"] is None
    assert data["at_threshold"] == {"threshold": 0.5, "false_rejects": 1, "misses": 0, "false_reject_rate": 0.25,
                                    "miss_rate": 0.0}
    assert data["sources"] == ["cam1", "cam2"]
    # a smaller window: only the 3 newest frames in the histogram, the curve still has every label
    small = get(page_env, bins=10, limit=3)
    assert small["histogram"]["frames"] == 3 and sum(small["histogram"]["unlabelled"]) == 2
    assert len(small["curve"]) == 8


def test_no_curve_without_both_kinds_of_labels(page_env):
    data = get(page_env, source="cam2")
    assert data["curve"] == []
    # its one labelled defect (0.05) is under its configured threshold: missed; no normals, no false-reject rate
    assert data["at_threshold"]["false_reject_rate"] is None and data["at_threshold"]["miss_rate"] == 1.0


def test_threshold_origin_follows_calibration_pin_and_unpin(page_env):
    sessions = page_env.sessions
    with sessions() as session, session.begin():
        session.add(SourceThreshold(source="cam1", model_version="v1", threshold=0.6, pixel_threshold=0.7,
                                    false_reject_rate=0.005, n_frames=72, method="leave-one-out"))
    thresholds.record(sessions, source="cam1", model_version="v1", action="applied", threshold=0.6,
                      pixel_threshold=0.7, rule="order statistic", set_by="daemon", n_good=72)
    data = get(page_env)
    shown = data["threshold"]
    assert (shown["origin"], shown["threshold"], shown["pinned"]) == ("calibrated", 0.6, False)
    assert (shown["set_by_row"]["set_by"], shown["set_by_row"]["rule"]) == ("daemon", "order statistic")
    assert data["at_threshold"]["false_rejects"] == 0 and data["at_threshold"]["misses"] == 1

    # a curve point pinned the way the page does it: the existing pin endpoint, the pixel threshold kept
    point = data["curve"][5]
    response = page_env.client.put("/api/sources/cam1/thresholds/pin", headers=auth("operator"),
                                   json={"threshold": point["threshold"], "pixel_threshold": shown["pixel_threshold"]})
    assert response.status_code == 200, response.text
    assert page_env.stub.refreshed == 1
    shown = get(page_env)["threshold"]
    assert (shown["origin"], shown["pinned"], shown["pixel_threshold"]) == ("pinned", True, 0.7)
    assert math.isclose(shown["threshold"], 0.625)
    assert (shown["set_by_row"]["action"], shown["set_by_row"]["set_by"]) == ("pinned", "api:operator-1")
    assert [row["action"] for row in shown["history"]] == ["pinned", "applied"]

    response = page_env.client.delete("/api/sources/cam1/thresholds/pin", headers=auth("operator"))
    assert response.status_code == 200, response.text
    shown = get(page_env)["threshold"]
    assert (shown["origin"], shown["threshold"], shown["set_by_row"]["set_by"]) == ("calibrated", 0.6, "daemon")


def test_references_with_thumbnails_and_leave_one_out_scores(page_env):
    data = get(page_env, recent=3)
    refs = {item["name"]: item for item in data["references"]["items"]}
    assert sorted(refs) == ["ref-a.png", "ref-b.png"]
    assert refs["ref-a.png"]["leave_one_out_score"] == pytest.approx(1 - math.exp(-0.5))  # 1 - exp(-raw / d0)
    assert refs["ref-b.png"]["leave_one_out_score"] is None  # not held out when the bank was built
    assert refs["ref-a.png"]["removable"] is True and "path" not in refs["ref-a.png"]
    assert data["references"]["bank"]["references"] == 2
    response = page_env.client.get(refs["ref-b.png"]["thumbnail_url"], headers=auth("viewer"))
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    thumbnail = Image.open(io.BytesIO(response.content))
    assert thumbnail.size == (160, 120)
    assert abs(int(np.asarray(thumbnail)[60, 80, 0]) - 200) <= 3  # ref-b's shade, not ref-a's
    # the newest stored frames, to add as references (newest first, with their newest label)
    frames = data["recent_frames"]
    assert [f["id"] for f in frames] == page_env.ids[-4:-1][::-1]
    assert [(f["score"], f["label"]) for f in frames] == [(0.95, None), (0.40, None), (0.90, "anomalous")]
    assert frames[0]["frame_url"] == f"/api/inspections/{frames[0]['id']}/frame.jpg"


def test_errors_and_roles(page_env):
    client = page_env.client
    assert client.get("/api/sources/cam1/calibration").status_code == 401
    response = client.get("/api/sources/nope/calibration", headers=auth("viewer"))
    assert response.status_code == 404 and "no source 'nope'" in response.json()["detail"]
    assert client.get("/api/sources/cam1/calibration?bins=1", headers=auth("viewer")).status_code == 422
    for name in ("ref-zzz.png", "..%2Fcal.db", "proposal.png"):
        response = client.get(f"/api/sources/cam1/references/{name}/thumbnail", headers=auth("viewer"))
        assert response.status_code == 404, name
    listing = client.get("/api/sources", headers=auth("viewer"))
    assert listing.status_code == 200
    assert listing.json()["items"] == [{"id": "cam1", "configured": True}, {"id": "cam2", "configured": True}]
    # an unreadable reference file is named with the reason, not a crash
    (page_env.folder / "ref-c.png").write_bytes(b"not an image")
    response = client.get("/api/sources/cam1/references/ref-c.png/thumbnail", headers=auth("viewer"))
    assert response.status_code == 422 and "'ref-c.png' of source cam1 cannot be read" in response.json()["detail"]


def test_running_patchcore_daemon_gives_leave_one_out_scores_and_takes_a_pin(tmp_path):
    """A real daemon (PatchCore, EfficientNet-Lite0 weights at 64 px, 4 synthetic references): the page's answer
    carries each held-out reference's leave-one-out score on the 0–1 scale and the daemon's calibration as the
    origin; a pin made the page's way is what the next frame is judged with."""
    from daemon.process.service import Service
    from tests.daemon.test_restart_cache import _inspected, _texture

    refs = tmp_path / "refs"
    refs.mkdir()
    for index in range(4):
        assert cv2.imwrite(str(refs / f"ref{index}.png"), _texture(100 + index))
    (tmp_path / "cam").mkdir()
    settings = load_config(None, environ={}, overrides={
        "model": {"name": "patchcore", "image_size": 64},
        "runtime": {"device": "cpu", "max_batch_size": 4, "max_batch_delay_ms": 5, "shutdown_grace_s": 10},
        "sources": [{"id": "cam", "kind": "folder", "uri": str(tmp_path / "cam"), "settle_s": 0.02,
                     "poll_interval_s": 0.05, "references": str(refs)}],
        "mqtt": {"enabled": False}, "database": {"url": f"sqlite:///{tmp_path}/anomalyd.db"},
        "storage": {"dir": str(tmp_path / "artifacts")},
        "api": {"enabled": False, "tokens": [{"name": "operator-1", "role": "operator", "token": TOKENS["operator"]}]},
    })
    service = Service(settings, serve_http=False)
    service.start()
    try:
        first = _inspected(service, tmp_path, "a.png", 1)
        client = TestClient(create_app(service.app_state(), routers()))
        response = client.get("/api/sources/cam/calibration", headers=auth("operator"))
        assert response.status_code == 200, response.text
        data = response.json()
        known = service.references.states["cam"].detector.known_good
        assert known.own_files == ["ref0.png", "ref1.png", "ref2.png", "ref3.png"]
        scale = service.references.states["cam"].detector.distance_scale
        scores = {item["name"]: item["leave_one_out_score"] for item in data["references"]["items"]}
        assert scores == pytest.approx({name: 1 - math.exp(-raw / scale)
                                        for name, raw in zip(known.own_files, known.own, strict=True)})
        assert all(0 < value < 1 for value in scores.values())
        shown = data["threshold"]
        assert shown["origin"] == "calibrated" and shown["threshold"] == pytest.approx(first.threshold)
        assert shown["set_by_row"]["set_by"] == "daemon" and shown["set_by_row"]["action"] == "applied"
        assert data["histogram"]["frames"] == 1

        pin = round(first.threshold / 2, 4)
        response = client.put("/api/sources/cam/thresholds/pin", headers=auth("operator"),
                              json={"threshold": pin, "pixel_threshold": shown["pixel_threshold"]})
        assert response.status_code == 200, response.text
        assert _inspected(service, tmp_path, "b.png", 2).threshold == pytest.approx(pin)
        shown = client.get("/api/sources/cam/calibration", headers=auth("operator")).json()["threshold"]
        assert (shown["origin"], shown["set_by_row"]["set_by"]) == ("pinned", "api:operator-1")
        client.close()
    finally:
        service.stop()


def test_known_good_scores_read_back_from_the_cache_name_their_files(tmp_path, monkeypatch):
    """A restart reads the known-good scores back (daemon/references/known_good_cache.py): their held-out references are named
    from the files of that build, so the page's leave-one-out scores stay on the right thumbnails."""
    from daemon.references import known_good_cache
    from daemon.references.bank import cached_known_good

    stored = {"scores": [3.0, 3.5, 4.0], "maxima": [5.0, 5.5, 6.0], "distance_scale": 3.5, "held_out": 2, "views": 1,
              "own": [3.0, 4.0]}
    monkeypatch.setattr(known_good_cache, "load", lambda path, key: stored)
    settings = load_config(None, environ={}, overrides={})
    files = [tmp_path / "ref-b.png", tmp_path / "ref-a.png", tmp_path / "ref-c.png"]
    known = cached_known_good(settings, SimpleNamespace(version="v"), files, tmp_path / "cam.safetensors")
    assert (known.own, known.own_files) == ([3.0, 4.0], ["ref-b.png", "ref-a.png"])
