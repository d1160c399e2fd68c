"""The OPC UA sink: the OPC UA server (adapters/opcua.py) as a result sink that follows the outbox like the others.

What it shows per source (`LastResult`, `Counters`, `ProcessingTime`, `Drift` / `DriftStartedAt`) is an
`OpcUaView` (adapters/opcua_view.py: where each value comes from). The sink keeps its own cursor in the outbox
(`sink_cursors` row `opcua`) and one thread (`adapters.outbox_follower.OutboxFollower`) does all its updates, in
order: at start it rebuilds the view from the database as of its cursor, then it applies the newly committed
inspections the writer hands it (`inspection_committed`: normal frames are not outbox events) and the outbox
events after its cursor in `seq` order (`result`: trigger answers, `drift`), moving the cursor past each batch
once applied. So after a restart the variables are what they were, and no answer counts twice.
`ResetCounters` is stored (`opcua_counter_resets`), so counters go on from it after a restart too.

Status changes set `SystemState`; the daemon binds the methods (trigger, model selection, counter reset) and adds
what only it knows (Busy, the active model, the rejected and failed frames) through `server.update`.

Configured by `[opcua]` (`adapters.opcua_settings.OpcUaConfig`, off by default); it reads `[[sources]]` for the address
space, so it registers for the whole configuration.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import deque
from datetime import datetime
from typing import Any

from adapters.db.outbox import OPCUA_SINK
from adapters.events import RESULT, OutboxEvent
from adapters.opcua_view import NO_DRIFT, OpcUaView, result_word
from adapters.outbox_follower import OutboxFollower
from adapters.sinks import CommittedInspection, ResultSink, SinkContext, register_sink

log = logging.getLogger(__name__)

__all__ = ["NO_DRIFT", "STATES", "OpcUaSink", "build_opcua_sink", "result_word"]

STATES = {"online": "Ready", "offline": "Disconnected", "disabled": "Disconnected", "unavailable": "Error"}


def _not_ready(*_args: Any) -> Any:
    from adapters.opcua import OpcUaCommandError

    raise OpcUaCommandError("error", "the daemon is still starting")


class OpcUaSink(ResultSink):
    name = "opcua"

    def __init__(self, settings: Any, context: SinkContext, *, poll_interval_s: float = 1.0) -> None:
        # asyncua is imported only when OPC UA is enabled
        from adapters.opcua import OpcUaHandlers, OpcUaServer, OpcUaSettings, OpcUaSource, OpcUaUserEntry

        o = settings.opcua
        users = [OpcUaUserEntry(name=u.name, role=u.role, password_sha256=u.password_sha256 or hashlib.sha256(
            u.password.get_secret_value().encode()).hexdigest()) for u in o.users]
        resolve = settings.resolve if hasattr(settings, "resolve") else (lambda p: context.base_dir / p)
        server_settings = OpcUaSettings(
            endpoint=o.endpoint, namespace=o.namespace, allow_anonymous=o.allow_anonymous, users=users,
            certificate=str(resolve(o.certificate)) if o.certificate else None,
            private_key=str(resolve(o.private_key)) if o.private_key else None, security=o.security,
            log_level=getattr(o, "log_level", "WARNING"))
        sources = [OpcUaSource(cfg.id, cfg.line, getattr(cfg, "trigger", None)) for cfg in settings.sources]
        self.handlers = OpcUaHandlers(trigger=_not_ready, select_model=_not_ready, reset_counters=_not_ready)
        self.server = OpcUaServer(server_settings, sources, self.handlers)
        self.sessions = context.sessions
        self.view = OpcUaView(source.id for source in sources)
        self._lock = threading.Lock()  # the view: the follower's thread updates it, ResetCounters resets it
        self._shown: dict[str, dict[str, Any]] = {}  # source → the values handed to the server
        self._committed: deque[CommittedInspection] = deque()  # the writer's, until the follower takes them
        self.follower = None if self.sessions is None else OutboxFollower(
            self.sessions, OPCUA_SINK, apply=self._apply, restore=self._restore, after_pass=self._take_committed,
            poll_interval_s=poll_interval_s)

    def bind(self, handlers: Any) -> None:
        """The daemon's side of the methods (until then a call is refused: still starting)."""
        self.handlers.trigger = handlers.trigger
        self.handlers.select_model = handlers.select_model
        self.handlers.reset_counters = handlers.reset_counters

    def start(self) -> None:
        self.server.start(timeout=None)  # building the address space takes seconds: never block the daemon
        if self.follower is not None:
            self.follower.start()

    # --- what the writer tells ----------------------------------------------------------------------------------

    def inspection_committed(self, result: CommittedInspection) -> None:
        if self.follower is None:  # no database: shown at once, counted since start
            with self._lock:
                self._count(result)
            return
        self._committed.append(result)  # never blocks the writer: the follower's thread shows it
        self.follower.notify()

    def alerts_committed(self) -> None:
        if self.follower is not None:
            self.follower.notify()  # an answer, a drift or an alert was just committed to the outbox

    def source_status(self, line: str, source_id: str, status: str) -> None:
        self.server.update(source_id, {"SystemState": STATES.get(status, "Error")})

    # --- the follower's thread ----------------------------------------------------------------------------------

    def _restore(self, session: Any, cursor: int) -> None:
        with self._lock:
            self.view.restore(session, cursor)
            for source_id in self.view.sources:
                self._publish(source_id)

    def _take_committed(self, upto: int | None = None) -> None:
        """Count and show the inspections the writer handed over (those up to inspection `upto` only: the ones
        committed before a trigger answer about to be shown), in the order they were committed."""
        while self._committed and (upto is None or self._committed[0].inspection_id <= upto):
            result = self._committed.popleft()
            with self._lock:
                self._count(result)

    def _count(self, r: CommittedInspection) -> None:
        if self.view.inspection(r.inspection_id, r.source, r.is_anomalous, r.score, r.threshold, len(r.regions or []),
                                r.model_version, r.captured_at, r.processed_at):
            self._publish(r.source)

    def _apply(self, event: OutboxEvent) -> None:
        answered = event.body.get("inspection_id") if event.event_type == RESULT else None
        if isinstance(answered, int):
            self._take_committed(upto=answered)  # the answer's inspection (and those before it) first
        with self._lock:
            source_id = self.view.event(event, self._captured_at)
            if source_id is not None:
                self._publish(source_id)

    def _captured_at(self, inspection_id: int) -> datetime | None:
        from adapters.db.tables import Inspection

        assert self.sessions is not None
        with self.sessions() as session:
            row = session.get(Inspection, inspection_id)
            return row.captured_at if row is not None else None

    def _publish(self, source_id: str) -> None:
        """Hand the server the values of `source_id` that changed since they were last handed over."""
        values = self.view.values(source_id)
        shown = self._shown.setdefault(source_id, {})
        changed = {name: value for name, value in values.items() if name not in shown or shown[name] != value}
        if changed:
            shown.update(changed)
            self.server.update(source_id, changed)

    # --- methods ------------------------------------------------------------------------------------------------

    def reset_counters(self, source_id: str) -> bool:
        """`ResetCounters` of a source, stored so that a restart keeps it; False for an unknown source. Raises
        RuntimeError while the counters are not restored yet (the database is unreachable at start)."""
        if source_id not in self.view.sources:
            return False
        with self._lock:
            cursor = 0
            if self.follower is not None:  # stored first: a reset the database does not have does not happen
                assert self.sessions is not None
                if self.follower.cursor is None:
                    raise RuntimeError("the OPC UA counters are not restored yet (is the database reachable?)")
                cursor = self.follower.cursor
                with self.sessions() as session, session.begin():
                    self.view.store_reset(session, source_id, cursor)
            self.view.reset(source_id, cursor)
            self._publish(source_id)
        return True

    # --- lifecycle ----------------------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        follower = self.follower
        return {"endpoint": self.server.settings.endpoint, "running": self.server.started,
                "error": repr(self.server.start_error) if self.server.start_error else None,
                "cursor": follower.cursor if follower is not None else None}

    def problem(self) -> str | None:
        if self.server.start_error is not None:
            return f"OPC UA server cannot start: {self.server.start_error}"
        if self.server.crashed is not None:
            return f"OPC UA server crashed: {self.server.crashed!r}"
        if self.follower is not None and self.follower.crashed is not None:
            return f"OPC UA outbox follower crashed: {self.follower.crashed!r}"
        return None

    def stop(self, timeout: float = 2.0) -> None:
        if self.follower is not None:
            self.follower.stop(timeout)
        self.server.stop(timeout)


@register_sink("opcua", section=None)
def build_opcua_sink(settings: Any, context: SinkContext) -> OpcUaSink | None:
    opcua = getattr(settings, "opcua", None)
    return OpcUaSink(settings, context) if opcua is not None and opcua.enabled else None
