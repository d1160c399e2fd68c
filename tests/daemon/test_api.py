"""Operator HTTP API on real SQLite and PostgreSQL: filters, sorting, cursor pages under concurrent inserts,
roles, artifact serving (and path traversal attempts), labels with mask upload, stats, models, live events."""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from adapters.db import (
    Inspection,
    Label,
    ModelVersion,
    RejectedFrame,
    make_engine,
    make_session_factory,
    upgrade,
)
from adapters.storage import ArtifactStore
from daemon.api import routers
from daemon.api.app import AppState, create_app
from daemon.config.settings import load_config
from daemon.telemetry.metrics import Metrics
from tests.adapters.test_db import create_pg_database

TOKENS = {"viewer": "view-secret", "operator": "op-secret", "admin": "admin-secret"}
T0 = datetime(2024, 5, 1, 8, 0, tzinfo=timezone.utc)


def auth(role: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[role]}"}


def make_settings(**api):
    tokens = [
        {"name": "viewer-1", "role": "viewer", "token": TOKENS["viewer"]},
        # stored hashed: the plain operator token is not in the configuration
        {"name": "operator-1", "role": "operator",
         "token_sha256": hashlib.sha256(TOKENS["operator"].encode()).hexdigest()},
        {"name": "admin-1", "role": "admin", "token": TOKENS["admin"]},
    ]
    return load_config(None, environ={}, overrides={"api": {"tokens": tokens, **api}})


class Env:
    """A seeded database, artifact store and API client."""

    def __init__(self, url: str, root: Path, **api) -> None:
        self.engine = make_engine(url)
        upgrade(self.engine)
        self.sessions = make_session_factory(self.engine)
        self.store = ArtifactStore(root / "artifacts")
        self.state = AppState(settings=make_settings(**api), metrics=Metrics(), readiness=lambda: (True, {}),
                              sessions=self.sessions, store=self.store, extra={"events_poll_s": 0.05})
        self.app = create_app(self.state, routers())
        self.client = TestClient(self.app)

    def add(self, *, source="cam1", line="l1", minutes=0, score=0.5, anomalous=False, artifacts=False,
            **fields) -> int:
        when = T0 + timedelta(minutes=minutes)
        key = uuid.uuid4().hex
        row = Inspection(uuid=key, frame_id=f"f-{key}", source=source, line=line, captured_at=when,
                         model_version="v1", score=score, threshold=0.5, is_anomalous=anomalous,
                         regions=[{"x": 2, "y": 3, "w": 5, "h": 4, "area": 20, "peak": score}] if anomalous else [],
                         width=16, height=16, **fields)
        if artifacts:
            rgb = np.full((16, 16, 3), 100, np.uint8)
            mask = np.zeros((16, 16), np.uint8)
            mask[3:7, 2:7] = 1
            paths = self.store.write(key, when, rgb=rgb, anomaly_map=mask.astype(np.float32), mask=mask)
            row.mask_path, row.heatmap_path, row.frame_path = paths.mask, paths.heatmap, paths.frame
        with self.sessions() as session, session.begin():
            session.add(row)
        return row.id

    def label(self, inspection_id: int, label: str) -> None:
        with self.sessions() as session, session.begin():
            session.add(Label(inspection_id=inspection_id, label=label, author="seed"))

    def close(self) -> None:
        self.client.close()
        self.engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.services)])
def env(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/api.db"
    else:
        url = create_pg_database(request.getfixturevalue("postgres").url)
    environment = Env(url, tmp_path)
    yield environment
    environment.close()


@pytest.fixture
def sqlite_env(tmp_path):
    environment = Env(f"sqlite:///{tmp_path}/api.db", tmp_path)
    yield environment
    environment.close()


def ids(response) -> list[int]:
    assert response.status_code == 200, response.text
    return [item["id"] for item in response.json()["items"]]


# --- auth ----------------------------------------------------------------------------------------------------------


def test_roles_and_tokens(sqlite_env):
    env = sqlite_env
    row = env.add()
    client = env.client
    assert client.get("/api/inspections").status_code == 401
    assert client.get("/api/inspections", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.get("/api/inspections", headers={"Authorization": f"Basic {TOKENS['viewer']}"}).status_code == 401
    assert client.get("/api/inspections", headers=auth("viewer")).status_code == 200
    # the operator token is configured only as its SHA-256
    assert client.get("/api/inspections", headers=auth("operator")).status_code == 200

    denied = client.post(f"/api/inspections/{row}/label", json={"label": "normal"}, headers=auth("viewer"))
    assert denied.status_code == 403
    assert client.post(f"/api/inspections/{row}/label", json={"label": "normal"}).status_code == 401
    ok = client.post(f"/api/inspections/{row}/label", json={"label": "anomalous"}, headers=auth("operator"))
    assert ok.status_code == 201, ok.text
    assert ok.json()["author"] == "operator-1"
    with env.sessions() as session:
        labels = session.scalars(select(Label).where(Label.inspection_id == row)).all()
    assert [(label.label, label.author) for label in labels] == [("anomalous", "operator-1")]

    for role in ("viewer", "operator"):
        assert client.post("/api/models/v2/activate", headers=auth(role)).status_code == 403
        assert client.post("/api/retrain", headers=auth(role)).status_code == 403


def test_admin_activates_model_version(sqlite_env):
    env = sqlite_env
    with env.sessions() as session, session.begin():
        session.add_all([ModelVersion(version="v1", kind="anomalyclip", status="active", activated_at=T0),
                         ModelVersion(version="v2", kind="anomalyclip", status="candidate",
                                      metrics={"image_auroc": 0.91})])
    listed = env.client.get("/api/models", headers=auth("viewer")).json()["items"]
    assert {item["version"]: item["status"] for item in listed} == {"v1": "active", "v2": "candidate"}
    assert next(item for item in listed if item["version"] == "v2")["metrics"] == {"image_auroc": 0.91}

    response = env.client.post("/api/models/v2/activate", headers=auth("admin"))
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "active"
    with env.sessions() as session:
        status = dict(session.execute(select(ModelVersion.version, ModelVersion.status)).all())
    assert status == {"v1": "retired", "v2": "active"}
    assert env.client.post("/api/models/nope/activate", headers=auth("admin")).status_code == 404


def test_health_open_metrics_protected_by_config(tmp_path):
    env = Env(f"sqlite:///{tmp_path}/h.db", tmp_path, auth_metrics=True)
    try:
        assert env.client.get("/api/health/live").status_code == 200
        assert env.client.get("/metrics").status_code == 401
        assert env.client.get("/metrics", headers=auth("viewer")).status_code == 200
    finally:
        env.close()


def test_openapi_docs_and_ui_published(sqlite_env):
    client = sqlite_env.client
    schema = client.get("/openapi.json").json()
    for path in ("/api/inspections", "/api/inspections/{inspection_id}", "/api/inspections/{inspection_id}/label",
                 "/api/models", "/api/models/{version}/activate", "/api/retrain", "/api/stats", "/api/events"):
        assert path in schema["paths"], path
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    label_body = schema["paths"]["/api/inspections/{inspection_id}/label"]["post"]["requestBody"]["content"]
    assert set(label_body) == {"application/json", "multipart/form-data"}
    assert client.get("/api/openapi.json").json()["paths"].keys() == schema["paths"].keys()
    assert client.get("/docs").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    assert client.get("/static/app.js").status_code == 200


# --- listing -------------------------------------------------------------------------------------------------------


def test_filters(env):
    a = env.add(source="cam1", line="l1", minutes=0, score=0.2)
    b = env.add(source="cam1", line="l1", minutes=10, score=0.9, anomalous=True)
    c = env.add(source="cam2", line="l2", minutes=20, score=0.7, anomalous=True)
    d = env.add(source="cam2", line="l1", minutes=30, score=0.4)
    env.label(b, "normal")
    env.label(b, "anomalous")  # the latest label wins
    env.label(c, "normal")
    get = lambda **params: ids(env.client.get("/api/inspections", params=params, headers=auth("viewer")))  # noqa: E731

    assert get() == [d, c, b, a]
    assert get(source="cam2") == [d, c]
    assert get(line="l1") == [d, b, a]
    assert get(after=(T0 + timedelta(minutes=10)).isoformat(), before=(T0 + timedelta(minutes=30)).isoformat()) == [c, b]
    assert get(after="2024-05-01T08:15:00") == [d, c]  # naive = UTC
    assert get(min_score=0.4, max_score=0.8) == [d, c]
    assert get(anomalous="true") == [c, b]
    assert get(anomalous="false") == [d, a]
    assert get(label="anomalous") == [b]
    assert get(label="normal") == [c]
    assert get(label="none") == [d, a]
    assert get(source="cam1", anomalous="true", label="anomalous") == [b]

    item = env.client.get("/api/inspections", params={"label": "anomalous"}, headers=auth("viewer")).json()["items"][0]
    assert item["label"]["label"] == "anomalous" and item["score"] == 0.9 and item["regions"][0]["w"] == 5
    bad = env.client.get("/api/inspections", params={"label": "maybe"}, headers=auth("viewer"))
    assert bad.status_code == 422


def test_sorting(env):
    scores = [0.3, 0.9, 0.1, 0.9, 0.5]
    rows = [env.add(minutes=i, score=s) for i, s in enumerate(scores)]
    get = lambda sort: ids(env.client.get("/api/inspections", params={"sort": sort}, headers=auth("viewer")))  # noqa: E731
    assert get("time_desc") == rows[::-1]
    assert get("time_asc") == rows
    # ties on the score are broken by id in the same direction
    assert get("score_desc") == [rows[3], rows[1], rows[4], rows[0], rows[2]]
    assert get("score_asc") == [rows[2], rows[0], rows[4], rows[1], rows[3]]


def page_through(client, sort: str, limit: int, between=None, **params) -> list[int]:
    seen, cursor = [], None
    while True:
        query = {"sort": sort, "limit": limit, **params}
        if cursor:
            query["cursor"] = cursor
        body = client.get("/api/inspections", params=query, headers=auth("viewer")).json()
        seen += [item["id"] for item in body["items"]]
        cursor = body["next_cursor"]
        if between is not None:
            between()
        if cursor is None:
            return seen


@pytest.mark.parametrize("sort", ["time_desc", "score_desc", "time_asc"])
def test_pagination_stable_under_concurrent_inserts(env, sort):
    original = [env.add(minutes=i, score=round((i * 7 % 11) / 11, 3)) for i in range(11)]
    stop = threading.Event()
    inserted: list[int] = []

    def writer():
        # new frames keep arriving at the head (newer captures, any score) while the client pages
        n = 100
        while not stop.is_set() and n < 160:
            inserted.append(env.add(minutes=n, score=0.99 if sort == "score_desc" else 0.5))
            n += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        # A row inserted between pages too (the writer thread alone may not run while a busy machine pages):
        # the newest capture, after `before` in ascending order.
        between = lambda: inserted.append(env.add(minutes=1000 + len(inserted), score=0.999))  # noqa: E731
        seen = page_through(env.client, sort, 3, between=between, before=(T0 + timedelta(minutes=99)).isoformat()) \
            if sort == "time_asc" else page_through(env.client, sort, 3, between=between)
    finally:
        stop.set()
        thread.join()
    assert inserted, "the writer inserted nothing while paging"
    assert len(seen) == len(set(seen)), "a row appeared on two pages"
    if sort == "time_asc":
        assert seen == original
    else:
        # every row present at the start is seen exactly once, in order; rows arriving at the head are not
        assert [i for i in seen if i in original] == (original[::-1] if sort == "time_desc" else sorted(
            original, key=lambda i: (-score_of(env, i), -i)))
        assert set(original) <= set(seen)


def score_of(env, inspection_id: int) -> float:
    with env.sessions() as session:
        return session.get(Inspection, inspection_id).score


def test_bad_cursor_and_cursor_of_another_sort(sqlite_env):
    env = sqlite_env
    for i in range(3):
        env.add(minutes=i)
    body = env.client.get("/api/inspections", params={"limit": 1}, headers=auth("viewer")).json()
    assert body["next_cursor"]
    other = env.client.get("/api/inspections", params={"cursor": body["next_cursor"], "sort": "score_desc"},
                           headers=auth("viewer"))
    assert other.status_code == 400 and "sort" in other.json()["detail"]
    garbage = env.client.get("/api/inspections", params={"cursor": "!!!not-a-cursor"}, headers=auth("viewer"))
    assert garbage.status_code == 400


def test_detail(env):
    row = env.add(anomalous=True, score=0.8, artifacts=True)
    env.label(row, "normal")
    item = env.client.get(f"/api/inspections/{row}", headers=auth("viewer")).json()
    assert item["id"] == row and item["is_anomalous"] is True and item["score"] == 0.8
    assert item["mask_url"] == f"/api/inspections/{row}/mask.png"
    assert item["heatmap_url"] == f"/api/inspections/{row}/heatmap.jpg"
    assert item["frame_url"] == f"/api/inspections/{row}/frame.jpg"
    assert [label["label"] for label in item["labels"]] == ["normal"]
    assert "mask_path" not in json.dumps(item)  # filesystem paths never leave the server
    assert env.client.get("/api/inspections/999999", headers=auth("viewer")).status_code == 404


# --- artifacts -----------------------------------------------------------------------------------------------------


def asgi_get(app, raw_path: str, headers: dict[str, str]) -> int:
    """The status for a request line exactly as a client sent it (no client-side normalisation of `..`)."""
    from urllib.parse import unquote

    messages: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        messages.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": unquote(raw_path), "raw_path": raw_path.encode(), "query_string": b"", "root_path": "",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
             "client": ("127.0.0.1", 1), "server": ("testserver", 80), "app": app}
    asyncio.run(app(scope, receive, send))
    return next(m["status"] for m in messages if m["type"] == "http.response.start")


def test_artifacts_served_only_from_rows(sqlite_env, tmp_path):
    env = sqlite_env
    row = env.add(anomalous=True, artifacts=True)
    with env.sessions() as session:
        stored = session.get(Inspection, row)
    mask = env.client.get(f"/api/inspections/{row}/mask.png", headers=auth("viewer"))
    assert mask.status_code == 200 and mask.headers["content-type"] == "image/png"
    assert mask.content == env.store.path(stored.mask_path).read_bytes()
    heat = env.client.get(f"/api/inspections/{row}/heatmap.jpg", headers=auth("viewer"))
    assert heat.status_code == 200 and heat.content[:3] == b"\xff\xd8\xff"
    assert env.client.get(f"/api/inspections/{row}/frame.jpg", headers=auth("viewer")).status_code == 200
    assert env.client.get(f"/api/inspections/{row}/mask.png").status_code == 401

    secret = tmp_path / "secret.txt"
    secret.write_text("top secret")
    for raw in (f"/api/inspections/{row}/..%2F..%2Fetc%2Fpasswd", f"/api/inspections/{row}/mask.png/../../x",
                f"/api/inspections/{row}/..%2F..%2F..%2Fsecret.txt", f"/api/inspections/{row}/%2e%2e",
                f"/api/inspections/{row}/passwd", f"/api/inspections/{row}/mask.jpg",
                f"/api/inspections/{row}/label_mask.png", "/api/inspections/999/mask.png"):
        assert asgi_get(env.app, raw, auth("viewer")) == 404, raw

    # a row whose stored path escapes the store (a tampered row) or points through a symlink is refused too
    evil = env.add(mask_path="../secret.txt", heatmap_path=str(secret))
    link = env.store.root / "2024" / "link_frame.jpg"
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(secret)
    with env.sessions() as session, session.begin():
        session.get(Inspection, evil).frame_path = "2024/link_frame.jpg"
    for name in ("mask.png", "heatmap.jpg", "frame.jpg"):
        response = env.client.get(f"/api/inspections/{evil}/{name}", headers=auth("viewer"))
        assert response.status_code == 404 and b"top secret" not in response.content

    # a file removed from disk (retention) is a 404, not a 500
    env.store.path(stored.mask_path).unlink()
    assert env.client.get(f"/api/inspections/{row}/mask.png", headers=auth("viewer")).status_code == 404


# --- labels --------------------------------------------------------------------------------------------------------


def png_bytes(size=(16, 16)) -> bytes:
    mask = np.zeros(size, np.uint8)
    mask[4:9, 4:9] = 255
    return cv2.imencode(".png", mask)[1].tobytes()


def test_label_with_mask_upload(env):
    row = env.add(anomalous=True)
    data = png_bytes()
    response = env.client.post(f"/api/inspections/{row}/label", data={"label": "anomalous"},
                               files={"mask": ("../../../../etc/evil.png", data, "image/png")},
                               headers=auth("operator"))
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["label"] == "anomalous" and body["mask_url"] == f"/api/inspections/{row}/label_mask.png"
    with env.sessions() as session:
        label = session.scalars(select(Label).where(Label.inspection_id == row)).one()
    assert label.mask_path.startswith("labels/") and label.mask_path.endswith("_label.png")
    assert "evil" not in label.mask_path  # the server chose the name
    stored = env.store.path(label.mask_path)
    assert stored.read_bytes() == data
    served = env.client.get(f"/api/inspections/{row}/label_mask.png", headers=auth("viewer"))
    assert served.status_code == 200 and served.content == data

    # multipart without a mask, and JSON
    plain = env.client.post(f"/api/inspections/{row}/label", data={"label": "normal"}, headers=auth("operator"))
    assert plain.status_code == 201 and plain.json()["mask_url"] is None
    listed = env.client.get("/api/inspections", params={"label": "normal"}, headers=auth("viewer"))
    assert ids(listed) == [row]


def test_label_rejects_bad_input(sqlite_env):
    env = sqlite_env
    row = env.add()
    jpeg = cv2.imencode(".jpg", np.zeros((16, 16, 3), np.uint8))[1].tobytes()
    truncated = png_bytes()[:40]
    for name, data in (("mask.png", jpeg), ("m.png", b"hello"), ("t.png", truncated)):
        response = env.client.post(f"/api/inspections/{row}/label", data={"label": "anomalous"},
                                   files={"mask": (name, data, "image/png")}, headers=auth("operator"))
        assert response.status_code == 422, (name, response.text)
        assert "PNG" in response.json()["detail"]
    for body in ({"label": "broken"}, {}, ["normal"]):
        assert env.client.post(f"/api/inspections/{row}/label", json=body,
                               headers=auth("operator")).status_code == 422
    assert env.client.post(f"/api/inspections/{row}/label", content=b"{not json",
                           headers={**auth("operator"), "Content-Type": "application/json"}).status_code == 400
    assert env.client.post("/api/inspections/424242/label", json={"label": "normal"},
                           headers=auth("operator")).status_code == 404
    with env.sessions() as session:
        assert session.scalars(select(Label)).all() == []
    assert not (env.store.root / "labels").exists() or not any((env.store.root / "labels").rglob("*.png"))


# --- stats and events ----------------------------------------------------------------------------------------------


def test_stats(env):
    now = datetime.now(timezone.utc)
    with env.sessions() as session, session.begin():
        for i, (source, anomalous) in enumerate([("cam1", True), ("cam1", False), ("cam1", False), ("cam2", True)]):
            session.add(Inspection(frame_id=f"s{i}", source=source, line="l1", captured_at=now - timedelta(hours=1),
                                   model_version="v1", score=0.5, threshold=0.5, is_anomalous=anomalous))
        session.add(Inspection(frame_id="old", source="cam1", line="l1", captured_at=now - timedelta(days=3),
                               model_version="v1", score=0.5, threshold=0.5, is_anomalous=True))
        session.add(RejectedFrame(source="cam2", frame_id="bad", reason="not an image"))
    first = env.add()  # 2024: outside the window
    env.label(first, "normal")
    stats = env.client.get("/api/stats", headers=auth("viewer")).json()
    by_source = {item["source"]: item for item in stats["sources"]}
    assert by_source["cam1"]["inspections"] == 3 and by_source["cam1"]["anomalous"] == 1
    assert by_source["cam1"]["anomalous_rate"] == pytest.approx(1 / 3)
    assert by_source["cam2"]["rejected"] == 1 and by_source["cam2"]["anomalous_rate"] == 1.0
    assert stats["total"] == {"inspections": 4, "anomalous": 2, "anomalous_rate": 0.5, "rejected": 1}
    assert stats["labels"] == {"normal": 1, "anomalous": 0}
    week = env.client.get("/api/stats", params={"after": (now - timedelta(days=7)).isoformat()},
                          headers=auth("viewer")).json()
    assert week["total"]["inspections"] == 5


def read_events(client, params, headers) -> list[tuple[str, dict]]:
    events, fields = [], {}
    with client.stream("GET", "/api/events", params=params, headers=headers) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if not line:
                if "data" in fields:
                    events.append((fields["event"], {**json.loads(fields["data"]), "_sse_id": fields["id"]}))
                fields = {}
                continue
            key, _, value = line.partition(": ")
            fields[key] = value
    return events


def test_events_stream_new_alerts(env):
    before = env.add(anomalous=True)
    first = env.add(anomalous=True, score=0.91)
    env.add(anomalous=False)
    second = env.add(anomalous=True, score=0.95)
    events = read_events(env.client, {"after_id": before, "max_events": 2}, auth("viewer"))
    assert [(name, item["id"]) for name, item in events] == [("alert", first), ("alert", second)]
    assert events[0][1]["score"] == 0.91 and events[0][1]["_sse_id"] == str(first)
    # resume after the first with Last-Event-ID; kind=all includes normal frames
    resumed = read_events(env.client, {"kind": "all", "max_events": 2},
                          {**auth("viewer"), "Last-Event-ID": str(first)})
    assert [name for name, _ in resumed] == ["inspection", "inspection"]
    assert [item["id"] for _, item in resumed] == [first + 1, second]
    assert env.client.get("/api/events").status_code == 401


def test_events_wait_for_rows_inserted_later(sqlite_env, monkeypatch):
    from daemon.api import events as events_api

    env = sqlite_env
    env.add()
    # The alert is inserted once the stream has taken "now" (a fixed delay raced a slow request on a busy machine:
    # inserted first, the alert was in the past and the stream waited for ever).
    now_taken = threading.Event()
    real_max_id = events_api._max_id

    def max_id(sessions):
        try:
            return real_max_id(sessions)
        finally:
            now_taken.set()

    monkeypatch.setattr(events_api, "_max_id", max_id)

    def insert_later() -> None:
        now_taken.wait(60)
        env.add(anomalous=True, score=0.77)  # after "now": the stream finds it, by its first query or a poll

    inserter = threading.Thread(target=insert_later)
    inserter.start()
    try:
        events = read_events(env.client, {"max_events": 1}, auth("viewer"))  # default: from now on
    finally:
        inserter.join()
    assert [item["score"] for _, item in events] == [0.77]


class FakeRetrainer:
    """Stands in for daemon.learning.retraining.Retrainer (a real run trains a model in a subprocess)."""

    def __init__(self) -> None:
        self.triggers: list[str] = []

    def start_in_background(self, trigger: str = "api") -> int:
        if self.triggers:
            from daemon.learning.retraining import RetrainBusyError

            raise RetrainBusyError("a retraining run is already in progress")
        self.triggers.append(trigger)
        return 7


def test_admin_requests_retrain(sqlite_env):
    env = sqlite_env
    retrainer = FakeRetrainer()
    env.state.retrainer = retrainer
    response = env.client.post("/api/retrain", headers=auth("admin"))
    assert response.status_code == 202, response.text
    assert response.json() == {"run_id": 7, "status": "running"} and retrainer.triggers == ["api"]
    assert env.client.post("/api/retrain", headers=auth("admin")).status_code == 409


def test_daemon_serves_api_and_ui(tmp_path):
    """The Service (what `anomalyd run` starts) serves the operator API and the UI on its HTTP port."""
    import httpx

    from daemon.process.service import Service
    from tests.daemon.test_pipeline import ConstantDetector

    settings = load_config(None, environ={}, overrides={
        "api": {"bind": "127.0.0.1:0", "tokens": [{"name": "v", "role": "viewer", "token": TOKENS["viewer"]}]},
        "mqtt": {"enabled": False}, "database": {"url": f"sqlite:///{tmp_path}/d.db"},
        "storage": {"dir": str(tmp_path / "artifacts")}})
    service = Service(settings, detector=ConstantDetector(), sources=[], routers=routers())
    service.start()
    try:
        base = f"http://127.0.0.1:{service.http_port}"
        assert httpx.get(f"{base}/api/inspections", timeout=30).status_code == 401
        listed = httpx.get(f"{base}/api/inspections", headers=auth("viewer"), timeout=30)
        assert listed.status_code == 200 and listed.json() == {"items": [], "next_cursor": None}
        assert "anomalyd" in httpx.get(f"{base}/", timeout=30).text
    finally:
        service.stop()
