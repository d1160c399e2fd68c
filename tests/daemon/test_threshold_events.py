"""Every threshold change is an event on MQTT and on webhooks (issue 19): a real PatchCore daemon (EfficientNet-Lite0
weights at 64 px, 4 synthetic references), a real Mosquitto and a webhook receiver. The daemon's calibration and an
operator's pin through the API each give one retained message on `anomalyd/<line>/<source>/threshold` and one
webhook call (`X-Anomalyd-Event: threshold`) with the same id, in the order they happened; a consumer that connects
later gets the threshold in effect."""

from __future__ import annotations

import json

import cv2
import pytest
from fastapi.testclient import TestClient

from daemon.api import routers
from daemon.api.app import create_app
from daemon.config.settings import load_config
from daemon.process.service import Service
from tests.adapters.test_mqtt import Subscriber
from tests.daemon.test_api import TOKENS, auth
from tests.daemon.test_restart_cache import _texture
from tests.waiting import wait_until
from tests.webhook_receiver import Receiver

pytestmark = [pytest.mark.services]


def test_calibration_and_pin_are_retained_mqtt_messages_and_webhook_events(tmp_path, mosquitto):
    refs = tmp_path / "refs"
    refs.mkdir()
    for index in range(4):
        assert cv2.imwrite(str(refs / f"ref{index}.png"), _texture(100 + index))
    (tmp_path / "cam").mkdir()
    receiver = Receiver()
    subscriber = Subscriber(mosquitto.port, "anomalyd/line1/cam/threshold")
    settings = load_config(None, environ={}, overrides={
        "model": {"name": "patchcore", "image_size": 64},
        "runtime": {"device": "cpu", "max_batch_size": 4, "max_batch_delay_ms": 5, "shutdown_grace_s": 10},
        "sources": [{"id": "cam", "kind": "folder", "uri": str(tmp_path / "cam"), "line": "line1",
                     "settle_s": 0.02, "poll_interval_s": 0.05, "references": str(refs)}],
        "mqtt": {"host": "127.0.0.1", "port": mosquitto.port, "client_id": f"anomalyd-thr-{tmp_path.name[-8:]}"},
        "webhooks": [{"url": receiver.url, "name": "hook", "allow_private": True, "anomalous_only": True}],
        "database": {"url": f"sqlite:///{tmp_path}/anomalyd.db"}, "storage": {"dir": str(tmp_path / "artifacts")},
        "api": {"enabled": False, "tokens": [{"name": "operator-1", "role": "operator", "token": TOKENS["operator"]}]},
    })
    service = Service(settings, serve_http=False)
    service.start()
    try:
        # 1. the daemon's own calibration of the source's bank
        assert subscriber.wait_for(lambda: subscriber.payloads("/threshold"), timeout=120), "no threshold message"
        applied = subscriber.payloads("/threshold")[0]
        assert (applied["event"], applied["action"], applied["set_by"]) == ("threshold", "applied", "daemon")
        assert applied["source"] == "cam" and applied["line"] == "line1" and 0 < applied["threshold"] < 1
        assert isinstance(applied["change_id"], int)

        # 2. an operator pins a value through the API
        client = TestClient(create_app(service.app_state(), routers()))
        response = client.put("/api/sources/cam/thresholds/pin", headers=auth("operator"),
                              json={"threshold": 0.9, "pixel_threshold": 0.95})
        assert response.status_code == 200, response.text
        assert subscriber.wait_for(lambda: len(subscriber.payloads("/threshold")) == 2, timeout=60)
        pinned = subscriber.payloads("/threshold")[1]
        assert (pinned["action"], pinned["threshold"], pinned["set_by"]) == ("pinned", 0.9, "api:operator-1")
        assert pinned["change_id"] > applied["change_id"] and pinned["id"] != applied["id"]

        # 3. the webhook got both, in order, with the ids MQTT consumers dedupe on (also an anomalous-only target)
        def hooked() -> list[dict]:
            return [json.loads(body) for headers, body in receiver.bodies()
                    if headers.get("x-anomalyd-event") == "threshold"]

        assert wait_until(lambda: len(hooked()) == 2, timeout=60), hooked()
        assert [event["id"] for event in hooked()] == [applied["id"], pinned["id"]]

        # 4. retained: a consumer that connects later learns the threshold in effect
        late = Subscriber(mosquitto.port, "anomalyd/line1/cam/threshold")
        try:
            assert late.wait_for(lambda: late.messages, timeout=30)
            _, payload, retained = late.messages[-1]
            assert retained and json.loads(payload)["id"] == pinned["id"]
        finally:
            late.close()
        client.close()
    finally:
        service.stop()
        subscriber.close()
        receiver.stop()
