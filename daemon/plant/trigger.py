"""Trigger mode: a PLC asks for an inspection of *this* part and gets an answer within its cycle time.

A `[[sources]]` entry with `trigger = "opcua" | "mqtt"` is not inspected free-running: its frames are taken only
while a trigger is waiting. The first frame captured after the trigger (older ones are stale: acknowledged, not
inspected) is tagged with the trigger's id and part id and goes to the model ahead of the free-running sources
(`DynamicBatcher.put(priority=True)`). The answer is decided once, whichever comes first:

- the committed inspection row (result OK / NG), or
- `deadline_ms` after the trigger: the configured fail-safe (`NG` or `no_decision`), counted and logged. The
  late real result is still stored (and reported with `late: true`).

A frame that fails (undecodable, model error) answers with the fail-safe at once. Requests are bounded per source
(`max_pending_triggers`): one more is refused with `busy`; bad input (unknown source, a free-running source, a
trigger on the wrong channel, a part id that is not a short string or an integer) is refused with a code and a
message, never queued.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

log = logging.getLogger("anomalyd.trigger")

PART_ID_MAX = 128
STALE_FRAME_S = 120.0  # a request whose frame never came back (lost in a failing pipeline) is forgotten
STALE_LOG_INTERVAL_S = 60.0  # discarded stale frames: one log line per source per interval, with the count


class TriggerError(Exception):
    """A refused trigger: `code` is one of unknown_source, not_triggered, wrong_channel, bad_part_id, busy."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def as_dict(self) -> dict[str, str]:
        return {"status": "error", "error": self.code, "message": self.message}


@dataclass(frozen=True)
class TriggerSettings:
    source_id: str
    line: str
    channel: str  # opcua | mqtt
    deadline_s: float | None = None
    fail_safe: str = "NG"  # NG | no_decision
    max_pending: int = 4


@dataclass
class TriggerRequest:
    id: str
    source_id: str
    line: str
    part_id: str
    channel: str
    requested_at: datetime  # wall clock: frames captured before it are stale
    t0: float  # monotonic
    deadline_s: float | None
    fail_safe: str
    frame_id: str | None = None
    answered: bool = False
    failed_safe: bool = False

    @property
    def deadline(self) -> float | None:
        return None if self.deadline_s is None else self.t0 + self.deadline_s


@dataclass
class TriggerAnswer:
    """What every sink publishes: `result` OK | NG | no_decision; `fail_safe` when the deadline (or an error)
    decided; `late` for a real result that came after its fail-safe answer."""

    request: TriggerRequest
    result: str
    fail_safe: bool = False
    late: bool = False
    inspection: Any | None = None  # adapters.db.Inspection
    latency_s: float = 0.0
    reason: str | None = None

    def payload(self, answer_id: str | None = None) -> dict[str, Any]:
        row = self.inspection
        request = self.request
        body: dict[str, Any] = {
            "id": answer_id or str(uuid.uuid4()), "trigger_id": request.id, "part_id": request.part_id,
            "source": request.source_id, "line": request.line, "result": self.result,
            "fail_safe": self.fail_safe, "late": self.late, "latency_ms": round(self.latency_s * 1000, 3),
            "ts": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "inspection_id": None, "score": None, "threshold": None, "regions": None, "model_version": None,
        }
        if row is not None:
            body.update(inspection_id=row.id, frame_id=row.frame_id, score=row.score, threshold=row.threshold,
                        regions=len(row.regions or []), model_version=row.model_version)
        if self.reason:
            body["reason"] = self.reason
        return body


@dataclass
class _SourceTriggers:
    settings: TriggerSettings
    waiting: deque[TriggerRequest] = field(default_factory=deque)  # no frame yet, oldest first
    requested: int = 0
    deadline_missed: int = 0
    refused: int = 0
    stale: int = 0  # frames discarded because they were captured before the trigger waiting for one (or none)
    stale_unlogged: int = 0  # of those, not yet in a log line
    stale_logged_at: float = float("-inf")


def validate_part_id(part_id: Any) -> str:
    """A part id is a non-empty printable string of at most 128 characters, or an integer (made a string)."""
    if isinstance(part_id, bool) or not isinstance(part_id, str | int):
        raise TriggerError("bad_part_id", f"part id must be a string or an integer, not {type(part_id).__name__}")
    text = str(part_id)
    if not text or len(text) > PART_ID_MAX or not text.isprintable():
        raise TriggerError("bad_part_id", f"part id must be 1..{PART_ID_MAX} printable characters")
    return text


class TriggerController:
    """Thread-safe; `on_answer(answer)` runs on the deadline thread or a writer thread, outside the lock."""

    def __init__(self, sources: dict[str, TriggerSettings], known_sources: set[str] | None = None,
                 on_answer: Callable[[TriggerAnswer], None] | None = None) -> None:
        self._sources = {source_id: _SourceTriggers(settings) for source_id, settings in sources.items()}
        self._known = set(known_sources or ()) | set(sources)
        self.on_answer = on_answer
        self._inflight: dict[str, TriggerRequest] = {}  # every unfinished request by id (waiting or inspecting)
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # --- queries ------------------------------------------------------------------------------------------------

    def is_triggered(self, source_id: str) -> bool:
        return source_id in self._sources

    @property
    def source_ids(self) -> list[str]:
        return list(self._sources)

    def pending(self, source_id: str) -> int:
        with self._cond:
            return sum(1 for request in self._inflight.values() if request.source_id == source_id)

    def counts(self, source_id: str) -> dict[str, int]:
        state = self._sources.get(source_id)
        if state is None:
            return {}
        return {"requested": state.requested, "deadline_missed": state.deadline_missed, "refused": state.refused,
                "stale_discarded": state.stale, "pending": self.pending(source_id)}

    def discarded(self, source_id: str, frame: Any, why: str) -> None:
        """A frame of a triggered source acknowledged without inspection (captured before the trigger waiting, or
        queued with none waiting at shutdown): counted (`counts()["stale_discarded"]`, the
        anomalyd_trigger_stale_frames_total metric) and logged, one line per source per STALE_LOG_INTERVAL_S."""
        state = self._sources.get(source_id)
        if state is None:
            return
        now = time.monotonic()
        with self._cond:
            state.stale += 1
            state.stale_unlogged += 1
            if now - state.stale_logged_at < STALE_LOG_INTERVAL_S:
                return
            count, state.stale_unlogged, state.stale_logged_at = state.stale_unlogged, 0, now
        log.info("triggered source %s: %d frame(s) discarded uninspected (%s; the last %s, captured %s)",
                 source_id, count, why, frame.frame_id, frame.captured_at.isoformat())

    # --- requests -----------------------------------------------------------------------------------------------

    def request(self, source_id: str, part_id: Any, channel: str) -> TriggerRequest:
        """Accept a trigger (returns the request) or raise TriggerError saying why not."""
        state = self._sources.get(source_id)
        if state is None:
            if source_id in self._known:
                raise TriggerError("not_triggered", f"source {source_id!r} is free-running (no trigger configured)")
            raise TriggerError("unknown_source", f"no source {source_id!r}")
        try:
            part = validate_part_id(part_id)
            if channel != state.settings.channel:
                raise TriggerError("wrong_channel", f"source {source_id!r} is triggered over "
                                   f"{state.settings.channel}, not {channel}")
        except TriggerError:
            state.refused += 1
            raise
        with self._cond:
            outstanding = sum(1 for r in self._inflight.values() if r.source_id == source_id)
            if outstanding >= state.settings.max_pending:
                state.refused += 1
                raise TriggerError("busy", f"source {source_id!r} already has {outstanding} trigger(s) pending "
                                   f"(max_pending_triggers = {state.settings.max_pending})")
            s = state.settings
            request = TriggerRequest(id=str(uuid.uuid4()), source_id=source_id, line=s.line, part_id=part,
                                     channel=channel, requested_at=datetime.now(timezone.utc), t0=time.monotonic(),
                                     deadline_s=s.deadline_s, fail_safe=s.fail_safe)
            state.waiting.append(request)
            state.requested += 1
            self._inflight[request.id] = request
            self._cond.notify_all()
        log.info("trigger %s for %s part %s (via %s)", request.id, source_id, part, channel)
        return request

    def waiting(self, source_id: str) -> TriggerRequest | None:
        """The oldest request of this source still waiting for a frame."""
        state = self._sources.get(source_id)
        if state is None:
            return None
        with self._cond:
            return state.waiting[0] if state.waiting else None

    def wait_for_request(self, timeout: float) -> bool:
        """Block until some source has a trigger waiting for a frame (True) or `timeout` passes."""
        with self._cond:
            return self._cond.wait_for(lambda: any(state.waiting for state in self._sources.values())
                                       or self._stopping, timeout)

    def attach(self, request: TriggerRequest, frame: Any) -> bool:
        """Tag `frame` for `request` when it was captured after the trigger (True); False: a stale frame."""
        captured = frame.captured_at
        if captured.tzinfo is None:
            captured = captured.replace(tzinfo=timezone.utc)
        if captured < request.requested_at:
            return False
        with self._cond:
            state = self._sources[request.source_id]
            if state.waiting and state.waiting[0] is request:
                state.waiting.popleft()
            request.frame_id = frame.frame_id
        frame.meta["trigger_id"] = request.id
        frame.meta["part_id"] = request.part_id
        return True

    # --- answers ------------------------------------------------------------------------------------------------

    def committed(self, row: Any) -> None:
        """A committed inspection row: answers its trigger (or reports the late result)."""
        trigger_id = (row.meta or {}).get("trigger_id") if isinstance(row.meta, dict) else None
        if not trigger_id:
            return
        with self._cond:
            request = self._inflight.pop(trigger_id, None)
            if request is None:
                return
            late = request.answered
            request.answered = True
        result = "no_decision" if row.is_anomalous is None else "NG" if row.is_anomalous else "OK"
        answer = TriggerAnswer(request, result, late=late, inspection=row,
                               latency_s=time.monotonic() - request.t0)
        if late:
            log.warning("trigger %s (%s part %s): real result %s came %.0f ms after the deadline; stored",
                        request.id, request.source_id, request.part_id, answer.result, answer.latency_s * 1000)
        self._emit(answer)

    def frame_failed(self, frame: Any, reason: str) -> None:
        """A triggered frame that will give no row: answer with the fail-safe now."""
        trigger_id = frame.meta.get("trigger_id") if isinstance(getattr(frame, "meta", None), dict) else None
        if not trigger_id:
            return
        with self._cond:
            request = self._inflight.pop(trigger_id, None)
            if request is None or request.answered:
                return
            request.answered = request.failed_safe = True
        log.error("trigger %s (%s part %s): %s; answering %s (fail-safe)", request.id, request.source_id,
                  request.part_id, reason, request.fail_safe)
        self._emit(TriggerAnswer(request, request.fail_safe, fail_safe=True,
                                 latency_s=time.monotonic() - request.t0, reason=reason))

    def _emit(self, answer: TriggerAnswer) -> None:
        if self.on_answer is None:
            return
        try:
            self.on_answer(answer)
        except Exception:
            log.exception("cannot publish the answer to trigger %s", answer.request.id)

    # --- deadlines ----------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._watch_deadlines, name="trigger-deadlines", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _watch_deadlines(self) -> None:
        while True:
            expired: list[TriggerRequest] = []
            with self._cond:
                if self._stopping:
                    return
                now = time.monotonic()
                next_due = now + 0.5
                for request in list(self._inflight.values()):
                    due = request.deadline
                    if not request.answered and due is not None:
                        if due <= now:
                            request.answered = request.failed_safe = True
                            expired.append(request)
                            state = self._sources[request.source_id]
                            state.deadline_missed += 1
                            if request.frame_id is None:  # no frame yet: the part is gone, stop waiting
                                if request in state.waiting:
                                    state.waiting.remove(request)
                                self._inflight.pop(request.id, None)
                        else:
                            next_due = min(next_due, due)
                    elif request.answered and now - request.t0 > STALE_FRAME_S:
                        self._inflight.pop(request.id, None)  # its frame was lost; free the slot
                if not expired:
                    self._cond.wait(max(0.0005, next_due - now))
                    continue
            for request in expired:
                latency = time.monotonic() - request.t0
                log.warning("trigger %s (%s part %s): no result within %.0f ms (%s); answering %s (fail-safe)",
                            request.id, request.source_id, request.part_id, (request.deadline_s or 0) * 1000,
                            "no fresh frame yet" if request.frame_id is None else "still inspecting",
                            request.fail_safe)
                self._emit(TriggerAnswer(request, request.fail_safe, fail_safe=True, latency_s=latency,
                                         reason="deadline missed"))
