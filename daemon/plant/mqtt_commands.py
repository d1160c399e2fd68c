"""MQTT command topics (`[mqtt].commands`): `<prefix>/<line>/<source>/trigger/set` with a JSON part id (a string,
an integer, or `{"part_id": ...}`) answered on `.../trigger/status`; `<prefix>/models/activate/set` with
`{"version": "..."}` (or a JSON string) answered on `<prefix>/models/activate/status`.

Commands go through a bounded queue: a flood is answered `busy`, never queued without limit. Each command must pass
`[mqtt].command_guard`: signed with `command_secret` (default, adapters/mqtt_commands.py; else answered
`unauthorized`), or `"broker"`: the broker's authentication and ACLs decide who may publish.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from daemon.plant.trigger import TriggerError

log = logging.getLogger("anomalyd.integrations")

COMMAND_QUEUE_SIZE = 64


class MqttCommands:
    """Subscribes the command topics and answers each command from its own thread (never paho's)."""

    def __init__(self, settings: Any, publisher: Any, *, trigger: Callable[[str, Any, str], str],
                 activate: Callable[[str], str]) -> None:
        self.settings = settings
        self.publisher = publisher
        self._trigger, self._activate = trigger, activate
        self._commands: queue.Queue[tuple[str, str, bytes]] = queue.Queue(maxsize=COMMAND_QUEUE_SIZE)
        self._verifier: Any = None  # adapters.mqtt_commands.CommandVerifier with command_guard = "hmac"
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def start(self) -> None:
        s = self.settings
        prefix = s.mqtt.prefix
        if s.mqtt.command_guard == "hmac" and s.mqtt.command_secret is not None:
            from adapters.mqtt_commands import CommandVerifier

            self._verifier = CommandVerifier(s.mqtt.command_secret.get_secret_value(), s.mqtt.command_max_age_s)
        if "trigger" in s.mqtt.commands:
            self.publisher.subscribe(f"{prefix}/+/+/trigger/set", self._enqueue("trigger"))
        if "activate" in s.mqtt.commands:
            self.publisher.subscribe(f"{prefix}/models/activate/set", self._enqueue("activate"))
        self._thread = threading.Thread(target=self._run, name="mqtt-commands", daemon=True)
        self._thread.start()
        log.info("MQTT command topics enabled: %s (guard: %s)", ", ".join(s.mqtt.commands),
                 "signed (HMAC)" if self._verifier is not None else "the broker's ACLs")

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(1.0)

    def _enqueue(self, kind: str) -> Callable[[str, bytes], None]:
        def handle(topic: str, payload: bytes) -> None:  # paho's thread: hand over only
            try:
                self._commands.put_nowait((kind, topic, payload))
            except queue.Full:
                log.warning("MQTT command flood: %s on %s refused (queue of %d full)", kind, topic,
                            COMMAND_QUEUE_SIZE)
                self._reply(topic, {"status": "error", "error": "busy",
                                    "message": "too many commands waiting; try again"})
        return handle

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                kind, topic, payload = self._commands.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                reply = self.answer(kind, topic, payload)
            except Exception as exc:  # never let one command stop the others
                log.exception("MQTT command %s on %s failed", kind, topic)
                reply = {"status": "error", "error": "error", "message": str(exc)[:300]}
            self._reply(topic, reply)

    def answer(self, kind: str, topic: str, payload: bytes) -> dict[str, Any]:
        """The reply to one command."""
        if self._verifier is not None:
            from adapters.mqtt_commands import CommandRefused

            try:
                payload = self._verifier.open(topic, payload)
            except CommandRefused as exc:
                log.warning("MQTT command %s on %s refused: %s", kind, topic, exc)
                return {"status": "error", "error": "unauthorized", "message": str(exc)}
        try:
            body = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return {"status": "error", "error": "bad_payload", "message": "the payload must be JSON"}
        if kind == "activate":
            version = body.get("version") if isinstance(body, dict) else body
            if not isinstance(version, str) or not version:
                return {"status": "error", "error": "bad_payload", "message": 'expected {"version": "..."}'}
            try:
                return {"status": "ok", "version": self._activate(version)}
            except ValueError as exc:
                return {"status": "error", "error": "unknown_version", "message": str(exc), "version": version}
        parts = topic.split("/")
        line, source_id = parts[-4], parts[-3]
        part_id = body.get("part_id") if isinstance(body, dict) else body
        configured = {cfg.id: cfg.line for cfg in self.settings.sources}
        if configured.get(source_id, line) != line:
            return {"status": "error", "error": "unknown_source", "part_id": _echo(part_id),
                    "message": f"source {source_id!r} is on line {configured[source_id]!r}, not {line!r}"}
        try:
            trigger_id = self._trigger(source_id, part_id, "mqtt")
        except TriggerError as exc:
            return {**exc.as_dict(), "part_id": _echo(part_id)}
        return {"status": "accepted", "trigger_id": trigger_id, "part_id": str(part_id)}

    def _reply(self, topic: str, reply: dict[str, Any]) -> None:
        status_topic = topic[: -len("/set")] + "/status"
        self.publisher.publish_reply(status_topic, json.dumps(reply, separators=(",", ":")))


def _echo(value: Any) -> Any:
    return value if isinstance(value, str | int | float | bool) or value is None else str(value)[:200]
