"""Signed MQTT commands: the default guard of `[mqtt].commands` (`command_guard = "hmac"`).

Anyone who may publish on the broker could otherwise trigger an inspection or switch the model. A command is
accepted only in this envelope, published on the command topic:

    {"command": "<the command's JSON text, e.g. {\\"version\\": \\"v3\\"}>", "ts": <unix seconds>,
     "signature": "<hex HMAC-SHA256 over '<topic>\\n<ts>\\n<command>' with [mqtt].command_secret>"}

The topic is signed (a trigger for one source cannot be replayed on another), the timestamp must be within
`max_age_s` of the daemon's clock, and a signature is accepted once (no replay inside that window).
`sign_command` builds the envelope (what a PLC gateway or script does).
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import json
import threading
import time


class CommandRefused(Exception):
    """An unsigned, badly signed, stale or replayed command (answered `unauthorized`)."""


def _mac(secret: str, topic: str, ts: int, command: str) -> str:
    return hmac.new(secret.encode(), f"{topic}\n{ts}\n{command}".encode(), hashlib.sha256).hexdigest()


def sign_command(secret: str, topic: str, command: str, ts: int | None = None) -> bytes:
    """The payload to publish on `topic` for `command` (its JSON text)."""
    ts = int(time.time()) if ts is None else ts
    return json.dumps({"command": command, "ts": ts, "signature": _mac(secret, topic, ts, command)}).encode()


class CommandVerifier:
    """Opens signed envelopes; thread-safe."""

    def __init__(self, secret: str, max_age_s: float = 60.0) -> None:
        self._secret = secret
        self.max_age_s = max_age_s
        self._seen: collections.OrderedDict[str, float] = collections.OrderedDict()  # signature → ts
        self._lock = threading.Lock()

    def open(self, topic: str, payload: bytes) -> bytes:
        """The command's JSON text as bytes, or CommandRefused naming why."""
        try:
            envelope = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            envelope = None
        if not isinstance(envelope, dict) or not {"command", "ts", "signature"} <= envelope.keys():
            raise CommandRefused('unsigned command: expected {"command", "ts", "signature"} (HMAC-SHA256)')
        command, ts, signature = envelope["command"], envelope["ts"], envelope["signature"]
        if not isinstance(command, str) or not isinstance(ts, int) or not isinstance(signature, str):
            raise CommandRefused("command must be a string, ts an integer, signature a hex string")
        if not hmac.compare_digest(_mac(self._secret, topic, ts, command), signature.lower()):
            raise CommandRefused("bad signature")
        now = time.time()
        if abs(now - ts) > self.max_age_s:
            raise CommandRefused(f"stale command: ts is {now - ts:.0f} s from the daemon's clock "
                                 f"(at most {self.max_age_s:.0f} s)")
        with self._lock:
            while self._seen and next(iter(self._seen.values())) < now - 2 * self.max_age_s:
                self._seen.popitem(last=False)
            if signature in self._seen:
                raise CommandRefused("replayed command (this signature was already used)")
            self._seen[signature] = ts
        return command.encode()
