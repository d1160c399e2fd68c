"""`anomalyd geometry set|reset|show|history` against a running daemon, and every geometry change as an event (issue
20): a real PatchCore daemon (EfficientNet-Lite0 weights at 64 px, 4 synthetic references), a real Mosquitto and a
webhook receiver. The CLI's change is recorded with who made it, the daemon rebuilds the source's bank through it,
and it is one retained message on `anomalyd/<line>/<source>/geometry` and one webhook call (`X-Anomalyd-Event:
geometry`) with the same id; a geometry the frame cannot take is a usage error that saves and announces nothing; a
consumer that connects later learns the geometry in effect."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import pytest

from daemon.api import routers
from daemon.cli import main
from daemon.commands.context import current_user
from daemon.config.settings import load_config
from daemon.process.service import Service
from tests.adapters.test_mqtt import Subscriber
from tests.daemon.test_api import TOKENS
from tests.daemon.test_restart_cache import _texture
from tests.waiting import wait_until
from tests.webhook_receiver import Receiver

pytestmark = [pytest.mark.services]

TOPIC = "anomalyd/line20/cam20/geometry"  # a line and source of its own: the broker keeps retained messages


def _config(tmp_path: Path, port: int, hook: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f"""
[model]
name = "patchcore"
image_size = 64

[runtime]
device = "cpu"
max_batch_size = 4
max_batch_delay_ms = 5
shutdown_grace_s = 10

[[sources]]
id = "cam20"
kind = "folder"
uri = "{tmp_path / 'cam20'}"
line = "line20"
settle_s = 0.02
poll_interval_s = 0.05
references = "{tmp_path / 'refs'}"

[mqtt]
host = "127.0.0.1"
port = {port}
client_id = "anomalyd-geo-{tmp_path.name[-8:]}"

[[webhooks]]
url = "{hook}"
name = "hook"
allow_private = true
anomalous_only = true

[database]
url = "sqlite:///{tmp_path}/anomalyd.db"

[storage]
dir = "{tmp_path / 'artifacts'}"

[api]
bind = "127.0.0.1:0"
tokens = [{{name = "operator-1", role = "operator", token = "{TOKENS['operator']}"}},
          {{name = "viewer-1", role = "viewer", token = "{TOKENS['viewer']}"}}]
""", encoding="utf-8")
    return path


def _cli(capsys, *argv: str) -> dict:
    assert main(["geometry", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_change_rebuilds_the_bank_and_is_a_retained_mqtt_message_and_webhook_event(tmp_path, mosquitto, capsys,
                                                                                     monkeypatch):
    (tmp_path / "refs").mkdir()
    for index in range(4):
        assert cv2.imwrite(str(tmp_path / "refs" / f"ref{index}.png"), _texture(100 + index))  # 128 x 128
    (tmp_path / "cam20").mkdir()
    receiver = Receiver()
    subscriber = Subscriber(mosquitto.port, TOPIC)
    config = str(_config(tmp_path, mosquitto.port, receiver.url))
    service = Service(load_config(Path(config)), routers=routers())
    service.start()
    try:
        before = service.references.states["cam20"].version
        assert before and "-roi" not in before

        # 1. an operator sets an ROI and an ignore polygon from the command line
        answer = _cli(capsys, "set", "--config", config, "--source", "cam20", "--roi", "8,8,112,112",
                      "--ignore", "8,8 40,8 40,40", "--resize", "fit")
        who = f"cli:{current_user()}"
        assert answer["announced"] and answer["change"]["set_by"] == who
        assert answer["summary"]["geometry"] == {"resize": "fit", "roi": [8, 8, 112, 112],
                                                 "ignore_polygons": [[[8.0, 8.0], [40.0, 8.0], [40.0, 40.0]]],
                                                 "tile_overlap": 0.25, "tile_size": None}
        assert subscriber.wait_for(lambda: subscriber.payloads("/geometry"), timeout=60), "no geometry message"
        set_message = subscriber.payloads("/geometry")[0]
        assert (set_message["event"], set_message["action"], set_message["set_by"]) == ("geometry", "set", who)
        assert set_message["source"] == "cam20" and set_message["line"] == "line20"
        assert set_message["geometry"] == answer["summary"]["geometry"]
        assert set_message["before"]["roi"] is None and set_message["before"]["resize"] == "squash"

        # 2. the running daemon rebuilds the source's bank through it
        assert wait_until(lambda: "-roi8x8x112x112" in (service.references.states["cam20"].version or ""),
                          timeout=120), service.references.states["cam20"].as_dict()
        assert "-fit-" in service.references.states["cam20"].version

        # 3. what it cannot take is refused with the reason: nothing saved, nothing announced
        with pytest.raises(SystemExit) as refused:
            main(["geometry", "set", "--config", config, "--source", "cam20", "--roi", "100,100,64,64"])
        assert refused.value.code == 2
        assert "reaches outside the 128x128 frame" in capsys.readouterr().err
        with pytest.raises(SystemExit):
            main(["geometry", "set", "--config", config, "--source", "nope", "--resize", "tile"])
        assert "not a [[sources]] id" in capsys.readouterr().err
        shown = _cli(capsys, "show", "--config", config, "--source", "cam20")["items"][0]
        assert shown["geometry"]["roi"] == [8, 8, 112, 112] and shown["origins"]["roi"] == "override"

        # 4. back to the configuration
        reset = _cli(capsys, "reset", "--config", config, "--source", "cam20")
        assert reset["change"]["action"] == "reset" and reset["summary"]["override"] is None
        assert subscriber.wait_for(lambda: len(subscriber.payloads("/geometry")) == 2, timeout=60)
        reset_message = subscriber.payloads("/geometry")[1]
        assert reset_message["action"] == "reset" and reset_message["geometry"]["roi"] is None
        assert reset_message["id"] != set_message["id"]
        history = _cli(capsys, "history", "--config", config, "--source", "cam20")["items"]
        assert [(e["action"], e["set_by"]) for e in history] == [("reset", who), ("set", who)]
        assert wait_until(lambda: service.references.states["cam20"].version == before, timeout=120)

        # 5. the same through the running daemon's HTTP API (--api, the token from the environment)
        api = f"http://127.0.0.1:{service.http_port}"
        with pytest.raises(SystemExit):
            main(["geometry", "set", "--api", api, "--source", "cam20", "--resize", "tile"])
        assert "needs an API token" in capsys.readouterr().err
        monkeypatch.setenv("ANOMALYD_TOKEN", TOKENS["viewer"])
        with pytest.raises(SystemExit):
            main(["geometry", "set", "--api", api, "--source", "cam20", "--resize", "tile"])
        assert "403" in capsys.readouterr().err
        monkeypatch.setenv("ANOMALYD_TOKEN", TOKENS["operator"])
        with pytest.raises(SystemExit):
            main(["geometry", "set", "--api", api, "--source", "cam20", "--roi", "100,100,64,64"])
        assert "reaches outside the 128x128 frame" in capsys.readouterr().err
        remote = _cli(capsys, "set", "--api", api, "--source", "cam20", "--resize", "tile")
        assert remote["announced"] and remote["change"]["set_by"] == "api:operator-1"
        assert remote["summary"]["geometry"]["resize"] == "tile"
        assert subscriber.wait_for(lambda: len(subscriber.payloads("/geometry")) == 3, timeout=60)
        api_message = subscriber.payloads("/geometry")[2]
        assert (api_message["action"], api_message["set_by"]) == ("set", "api:operator-1")
        assert api_message["geometry"]["resize"] == "tile"
        assert _cli(capsys, "show", "--api", api, "--source", "cam20")["origins"]["resize"] == "override"
        assert wait_until(lambda: "-tile-" in (service.references.states["cam20"].version or ""), timeout=120)

        # 6. the webhook got them all, in order, with the ids MQTT consumers dedupe on (an anomalous-only target too)
        def hooked() -> list[dict]:
            return [json.loads(body) for headers, body in receiver.bodies()
                    if headers.get("x-anomalyd-event") == "geometry"]

        assert wait_until(lambda: len(hooked()) == 3, timeout=60), hooked()
        assert [event["id"] for event in hooked()] == [set_message["id"], reset_message["id"], api_message["id"]]

        # 7. retained: a consumer that connects later learns the geometry in effect
        late = Subscriber(mosquitto.port, TOPIC)
        try:
            assert late.wait_for(lambda: late.messages, timeout=30)
            _, payload, retained = late.messages[-1]
            assert retained and json.loads(payload)["id"] == api_message["id"]
        finally:
            late.close()
        assert len(subscriber.payloads("/geometry")) == 3  # the refused changes sent nothing
    finally:
        service.stop()
        subscriber.close()
        receiver.stop()


def test_a_geometry_edited_in_config_toml_is_recorded_and_announced_at_the_next_start(tmp_path, mosquitto, capsys):
    (tmp_path / "refs").mkdir()
    for index in range(4):
        assert cv2.imwrite(str(tmp_path / "refs" / f"ref{index}.png"), _texture(200 + index))
    (tmp_path / "cam20").mkdir()
    receiver = Receiver()
    topic = "anomalyd/line20/cam20/geometry"
    subscriber = Subscriber(mosquitto.port, topic)
    config = _config(tmp_path, mosquitto.port, receiver.url)
    try:
        service = Service(load_config(config), routers=routers())
        service.start()  # the first start: the geometry in effect is remembered, nothing announced
        service.stop()
        text = config.read_text(encoding="utf-8")
        config.write_text(text.replace('line = "line20"\n', 'line = "line20"\nroi = [16, 16, 96, 96]\n'),
                          encoding="utf-8")
        service = Service(load_config(config), routers=routers())
        service.start()
        try:
            def edits() -> list[dict]:
                return [m for m in subscriber.payloads("/geometry") if m["action"] == "config"]

            assert subscriber.wait_for(edits, timeout=60), subscriber.payloads("/geometry")
            message = edits()[-1]
            assert message["set_by"] == "config.toml" and message["source"] == "cam20"
            assert message["before"]["roi"] is None and message["geometry"]["roi"] == [16, 16, 96, 96]
            assert wait_until(lambda: "-roi16x16x96x96" in (service.references.states["cam20"].version or ""),
                              timeout=120), service.references.states["cam20"].as_dict()
        finally:
            service.stop()
        history = _cli(capsys, "history", "--config", str(config), "--source", "cam20")["items"]
        assert [(e["action"], e["set_by"]) for e in history] == [("config", "config.toml")]
        service = Service(load_config(config), routers=routers())
        service.start()  # unchanged since: no second event
        service.stop()
        assert len(_cli(capsys, "history", "--config", str(config), "--source", "cam20")["items"]) == 1
        assert len([m for m in subscriber.payloads("/geometry") if m["action"] == "config"]) == 1
    finally:
        subscriber.close()
        receiver.stop()
