"""End to end on real frames and real weights, through what a user configures and sees: a `references = "auto"`
source under mutual scoring with `[mutual] window_frames` set, a real Mosquitto, a webhook receiver and the HTTP API.

- the frames that fill the window are recorded with no decision (no score, `is_anomalous` null, `verdict`
  `no_decision` on MQTT), never as good;
- the line changes (cubes → metal plates): one drift message, retained, on `anomalyd/<line>/<source>/drift` and to
  the webhook; the frames after it that would alert are recorded with no decision and raise no alert; the source
  is in drift in the API and the metrics; the message's proposal offers the new product's frames;
- the operator approves them (POST …/references): the source runs PatchCore on them and a second retained message
  says the drift is over;
- on PatchCore, the line changes back (metal plates → cubes): the reference drift watch makes it one drift event
  again, the frames after the signal held back; approving the cubes it offers ends it.
Frames: ../shared/data/inspection-samples (copied into tmp_path, never into the repo).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from adapters.db import OutboxMessage
from adapters.db.outbox import as_event
from adapters.mqtt import mqtt_message
from adapters.timeutil import rfc3339
from daemon.cli import main
from daemon.config.settings import load_config
from daemon.process.service import Service
from tests.adapters.test_mqtt import Subscriber
from tests.daemon.test_api import TOKENS, auth
from tests.daemon.test_e2e_mutual import _rows
from tests.waiting import wait_until
from tests.webhook_receiver import Receiver

pytestmark = [pytest.mark.services, pytest.mark.shared]

WINDOW = 16
N_CUBES, N_PLATES = 16, 10


def _feed(files: list[Path], inbox: Path, first: int) -> None:
    """Copied with modification times in this order: the folder source reads the oldest first."""
    for index, file in enumerate(files, start=first):
        staged = inbox.parent / f".{index:03d}{file.suffix}"
        shutil.copyfile(file, staged)
        os.utime(staged, (1_700_000_000 + index, 1_700_000_000 + index))
        staged.rename(inbox / f"{index:03d}-{file.parent.parent.parent.name}{file.suffix}")


def _config(tmp_path: Path, broker_port: int, hook_url: str) -> Path:
    tokens = "".join(f'[[api.tokens]]\nname = "{role}"\nrole = "{role}"\ntoken = "{token}"\n'
                     for role, token in TOKENS.items())
    config = tmp_path / "config.toml"
    config.write_text(f"""
[model]
name = "patchcore"
[runtime]
device = "cpu"
max_batch_size = 4
max_batch_delay_ms = 20
shutdown_grace_s = 20
[mutual]
window_frames = {WINDOW}
[[sources]]
id = "cubes"
kind = "folder"
uri = "inbox"
line = "line1"
references = "auto"
settle_s = 0.05
poll_interval_s = 0.05
[mqtt]
host = "127.0.0.1"
port = {broker_port}
client_id = "anomalyd-drift-{os.getpid()}-{tmp_path.name[-6:]}"
[[webhooks]]
url = "{hook_url}"
name = "hook"
allow_private = true
[database]
url = "sqlite:///var/anomalyd.db"
[storage]
dir = "var/artifacts"
[api]
enabled = false
{tokens}""")
    (tmp_path / "inbox").mkdir()
    return config


def test_window_filling_frames_have_no_decision_and_a_line_change_is_one_retained_drift_event(
        samples_dir, tmp_path, mosquitto, capsys):
    cubes = sorted((samples_dir / "cubes" / "test" / "good").glob("*.jpg"))[::5][:N_CUBES]
    plates = sorted((samples_dir / "metal_plate" / "test" / "good").glob("*.png"))[:N_PLATES + 2]
    cubes_again = sorted((samples_dir / "cubes" / "test" / "good").glob("*.jpg"))[1::5][:6]
    receiver = Receiver()
    subscriber = Subscriber(mosquitto.port, "anomalyd/line1/cubes/#")
    settings = load_config(_config(tmp_path, mosquitto.port, receiver.url), environ={})
    service = Service(settings, serve_http=False)
    service.start()
    try:
        from daemon.api import routers
        from daemon.api.app import create_app

        client = TestClient(create_app(service.app_state(), routers()))
        version = service.references.states["cubes"].version
        assert version.startswith("mutual-") and f"-w{WINDOW}-" in version, version  # [mutual] window_frames

        # 1. Cold start: the frames that fill the window get no decision, recorded and published as such.
        _feed(cubes, tmp_path / "inbox", 0)
        assert wait_until(lambda: len(_rows(service)) == N_CUBES, timeout=600)
        rows = _rows(service)
        undecided = [row for row in rows if row.is_anomalous is None]
        assert 8 <= len(undecided) < N_CUBES, [(r.score, r.is_anomalous) for r in rows]
        assert rows[:len(undecided)] == undecided  # the first frames, and only those
        assert all(row.score is None and row.meta["no_decision"] == "window filling" for row in undecided)
        assert all(row.is_anomalous is not None and row.score is not None for row in rows[len(undecided):])
        assert subscriber.wait_for(lambda: len(subscriber.payloads("/inspection")) == N_CUBES)
        published = {p["id"]: p for p in subscriber.payloads("/inspection")}
        for row in undecided:
            assert published[row.id]["verdict"] == "no_decision" and published[row.id]["is_anomalous"] is None
        listed = client.get("/api/inspections", params={"source": "cubes", "anomalous": "false", "limit": 100},
                            headers=auth("viewer")).json()["items"]
        assert not {item["id"] for item in listed} & {row.id for row in undecided}  # not among the good ones
        cube_alerts = len(subscriber.payloads("/anomaly"))

        # 2. The line changes: one drift event instead of an alert per frame.
        _feed(plates[:N_PLATES], tmp_path / "inbox", N_CUBES)
        assert wait_until(lambda: len(_rows(service)) == N_CUBES + N_PLATES, timeout=600)
        assert subscriber.wait_for(lambda: subscriber.payloads("/drift"), timeout=60), "no drift message"
        drift = subscriber.payloads("/drift")
        assert len(drift) == 1 and drift[0]["state"] == "drifting", drift
        event = drift[0]
        plate_rows = _rows(service)[N_CUBES:]
        assert event["started_at"] == rfc3339(plate_rows[0].captured_at)  # the first frame of the new product
        assert event["source"] == "cubes" and event["line"] == "line1" and event["share"] > 0.5
        signalled = next(i for i, r in enumerate(plate_rows) if rfc3339(r.captured_at) == event["detected_at"])
        assert signalled <= 5 and event["frames"] == signalled + 1
        before, after = plate_rows[:signalled], plate_rows[signalled:]
        assert all(row.is_anomalous for row in before)  # judged before the signal: alerted
        assert after and all(row.is_anomalous is None and row.meta["no_decision"] == "drift"
                             and row.score is not None for row in after)
        plate_alerts = len(subscriber.payloads("/anomaly")) - cube_alerts
        assert plate_alerts == len(before) < N_PLATES
        with capsys.disabled():
            print(f"\n{len(undecided)} of {N_CUBES} cube frames no decision (window filling), {cube_alerts} cube alerts; "
                  f"metal plates: drift signalled at plate {signalled + 1} of {N_PLATES} (share {event['share']}), "
                  f"{plate_alerts} alerts before it, {len(after)} held back with no decision")
        # retained: a consumer that connects later still learns the source is in drift
        late = Subscriber(mosquitto.port, "anomalyd/line1/cubes/drift")
        try:
            assert late.wait_for(lambda: late.messages, timeout=30)
            topic, payload, retained = late.messages[0]
            assert topic == "anomalyd/line1/cubes/drift"
            assert retained and json.loads(payload)["drift_id"] == event["drift_id"]
        finally:
            late.close()
        # the webhook got it too, with the outbox's guarantee
        assert wait_until(lambda: any(h.get("x-anomalyd-event") == "drift" for h, _ in receiver.bodies()), timeout=60)
        hooked = [json.loads(body) for h, body in receiver.bodies() if h.get("x-anomalyd-event") == "drift"]
        assert [h["id"] for h in hooked] == [event["id"]]
        metrics = service.metrics.render().decode()
        assert 'anomalyd_source_drift{source="cubes"} 1.0' in metrics
        assert 'anomalyd_drift_events_total{source="cubes"} 1.0' in metrics
        shown = client.get("/api/sources/cubes/drift", headers=auth("viewer")).json()
        assert shown["drifting"] is True and shown["current"]["drift_id"] == event["drift_id"]
        assert shown["current"]["suppressed"] == len(after)

        # 3. The offered references are the new product's frames; approving them ends the drift.
        proposal = client.get(f"{event['references_proposal']}&count=3", headers=auth("viewer")).json()
        assert proposal["ready"] is True, proposal
        chosen = [frame["inspection_id"] for frame in proposal["frames"]]
        assert set(chosen) <= {row.id for row in plate_rows}
        capsys.readouterr()  # the CLI offers the same frames from the same database
        assert main(["references", "propose", "--config", str(tmp_path / "config.toml"), "--source", "cubes",
                     "--count", "3", "--since", event["started_at"], "--json"]) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["frames"] == proposal["frames"]
        answer = client.post("/api/sources/cubes/references", json={"inspection_ids": chosen},
                             headers=auth("operator"))
        assert answer.status_code == 201, answer.text
        assert wait_until(lambda: service.pipeline.detector.version_for("cubes").startswith("patchcore-"),
                          timeout=600)
        _feed(plates[N_PLATES:], tmp_path / "inbox", N_CUBES + N_PLATES)
        assert subscriber.wait_for(lambda: len(subscriber.payloads("/drift")) == 2, timeout=120)
        cleared = subscriber.payloads("/drift")[1]
        assert cleared["state"] == "cleared" and cleared["drift_id"] == event["drift_id"]
        assert "new references" in cleared["reason"] and cleared["suppressed"] == len(after)
        assert client.get("/api/sources/cubes/drift", headers=auth("viewer")).json()["drifting"] is False
        assert 'anomalyd_source_drift{source="cubes"} 0.0' in service.metrics.render().decode()
        with service.sessions() as session:
            drifts = session.scalars(select(OutboxMessage).where(OutboxMessage.event_type == "drift")).all()
            retained = [mqtt_message(as_event(row), "anomalyd", 0) for row in drifts]
        assert len(retained) == 2 and all(message.retain and message.topic.endswith("/drift") for message in retained)

        # 4. On PatchCore now (the plates as references): the line changes back to cubes, and the source's
        # reference drift watch (daemon/detectors/drift_watch.py) makes it one drift event again.
        patchcore = service.pipeline.detector.version_for("cubes")
        seen = len(_rows(service))
        alerts = len(subscriber.payloads("/anomaly"))
        _feed(cubes_again, tmp_path / "inbox", N_CUBES + N_PLATES + 2)
        assert wait_until(lambda: len(_rows(service)) == seen + len(cubes_again), timeout=600)
        assert subscriber.wait_for(lambda: len(subscriber.payloads("/drift")) == 3, timeout=60), "no PatchCore drift"
        again = subscriber.payloads("/drift")[2]
        back = _rows(service)[seen:]
        assert all(row.model_version == patchcore for row in back)
        assert again["state"] == "drifting" and again["model_version"] == patchcore
        assert again["started_at"] == rfc3339(back[0].captured_at) and again["share"] > 0.2  # allowance: 0.1
        signalled = next(i for i, r in enumerate(back) if rfc3339(r.captured_at) == again["detected_at"])
        # on references the drift is reported, and every frame keeps its decision: nothing is held back
        assert 2 <= signalled <= 4 and all(row.is_anomalous is not None for row in back)
        alerted = sum(bool(row.is_anomalous) for row in back)
        assert subscriber.wait_for(lambda: len(subscriber.payloads("/anomaly")) - alerts == alerted, timeout=60)
        with capsys.disabled():
            print(f"PatchCore on plates, cubes again: drift signalled at cube {signalled + 1} of {len(cubes_again)} "
                  f"(share {again['share']}), {alerted} of {len(back)} cubes alerted (none held back)")

        # 5. Re-approval: the drift offers the cubes scored by PatchCore; approving them ends it. (The plates are
        # removed first: their frames are 512 px, the cubes' 640x480, and one source's references share a size.)
        proposal = client.get(f"{again['references_proposal']}&count=3", headers=auth("viewer")).json()
        assert proposal["ready"] is True, proposal
        chosen = [frame["inspection_id"] for frame in proposal["frames"]]
        assert set(chosen) <= {row.id for row in back}
        names = [item["name"] for item in client.get("/api/sources/cubes/references",
                                                     headers=auth("viewer")).json()["items"]]
        assert client.delete("/api/sources/cubes/references", params={"name": names},
                             headers=auth("operator")).status_code == 200
        answer = client.post("/api/sources/cubes/references", json={"inspection_ids": chosen},
                             headers=auth("operator"))
        assert answer.status_code == 201, answer.text
        assert wait_until(lambda: service.pipeline.detector.version_for("cubes").startswith("patchcore-")
                          and service.pipeline.detector.version_for("cubes") != patchcore, timeout=600)
        _feed(cubes_again[:1], tmp_path / "inbox", N_CUBES + N_PLATES + 2 + len(cubes_again))
        assert subscriber.wait_for(lambda: len(subscriber.payloads("/drift")) == 4, timeout=120)
        ended = subscriber.payloads("/drift")[3]
        assert ended["state"] == "cleared" and ended["drift_id"] == again["drift_id"]
        assert "new references" in ended["reason"]
    finally:
        service.stop()
        subscriber.close()
        receiver.stop()
