"""The OPC UA sink: the OPC UA server (adapters/opcua.py) as a result sink. Committed results become each
source's `LastResult`, status changes its `SystemState`; the daemon binds the methods (trigger, model selection,
counter reset) and adds what only it knows (trigger answers, counters, Busy) through `server.update`.

A source's drift (daemon/zero_label/drift.py) becomes its `Drift` and `DriftStartedAt`: a drift's start and end are committed
rows of `drift_events` and outbox messages, after which the writer calls `alerts_committed`; the sink then reads
the open drifts on a thread of its own (never on the writer's) and writes what changed.

Configured by `[opcua]` (`adapters.opcua_settings.OpcUaConfig`, off by default); it reads `[[sources]]` for the address
space, so it registers for the whole configuration.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from datetime import datetime, timezone
from typing import Any

from adapters.sinks import CommittedInspection, ResultSink, SinkContext, register_sink

log = logging.getLogger(__name__)

NO_DRIFT = datetime(1970, 1, 1, tzinfo=timezone.utc)  # DriftStartedAt while a source is not in drift
STATES = {"online": "Ready", "offline": "Disconnected", "disabled": "Disconnected", "unavailable": "Error"}


def result_word(is_anomalous: bool | None) -> str:
    """OK | NG | no_decision (the trigger answers' words): a frame with no decision is never OK."""
    return "no_decision" if is_anomalous is None else "NG" if is_anomalous else "OK"


def _not_ready(*_args: Any) -> Any:
    from adapters.opcua import OpcUaCommandError

    raise OpcUaCommandError("error", "the daemon is still starting")


class OpcUaSink(ResultSink):
    name = "opcua"

    def __init__(self, settings: Any, context: SinkContext) -> None:
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
        self._drift_shown: dict[str, datetime] = {}  # source → start of the drift shown as open
        self._drift_wake = threading.Event()
        self._drift_stop = threading.Event()
        self._drift_thread: threading.Thread | None = None

    def bind(self, handlers: Any) -> None:
        """The daemon's side of the methods (until then a call is refused: still starting)."""
        self.handlers.trigger = handlers.trigger
        self.handlers.select_model = handlers.select_model
        self.handlers.reset_counters = handlers.reset_counters

    def start(self) -> None:
        self.server.start(timeout=None)  # building the address space takes seconds: never block the daemon
        if self.sessions is not None:
            self._drift_wake.set()  # a drift still open from before shows at once
            self._drift_thread = threading.Thread(target=self._drift_loop, name="opcua-drift", daemon=True)
            self._drift_thread.start()

    def alerts_committed(self) -> None:
        self._drift_wake.set()  # a drift may have started or ended (its row and message were just committed)

    def _drift_loop(self) -> None:
        while not self._drift_stop.is_set():
            self._drift_wake.wait()
            self._drift_wake.clear()
            if self._drift_stop.is_set():
                return
            try:
                self.refresh_drift()
            except Exception as exc:  # a database outage: the next commit tries again
                log.warning("OPC UA: cannot read the open drifts: %s", str(exc).splitlines()[0][:200])

    def refresh_drift(self) -> None:
        """`Drift` / `DriftStartedAt` of every source whose drift state differs from what the server shows."""
        from sqlalchemy import select

        from adapters.db.tables import DriftEvent

        with self.sessions() as session:
            rows = session.execute(select(DriftEvent.source, DriftEvent.started_at)
                                   .where(DriftEvent.cleared_at.is_(None))).all()
        open_now = {row.source: row.started_at for row in rows}
        for source in set(open_now) | set(self._drift_shown):
            started = open_now.get(source)
            if self._drift_shown.get(source) == started:
                continue
            self.server.update(source, {"Drift": started is not None, "DriftStartedAt": started or NO_DRIFT})
            if started is None:
                self._drift_shown.pop(source, None)
            else:
                self._drift_shown[source] = started

    def inspection_committed(self, result: CommittedInspection) -> None:
        self.server.update(result.source, {
            "LastResult.InspectionId": result.inspection_id, "LastResult.PartId": "",
            "LastResult.Result": result_word(result.is_anomalous), "LastResult.IsOk": result.is_anomalous is False,
            "LastResult.Score": result.score, "LastResult.Threshold": result.threshold,
            "LastResult.RegionCount": len(result.regions or []), "LastResult.ModelVersion": result.model_version,
            "LastResult.Timestamp": result.captured_at, "LastResult.TriggerId": "", "LastResult.FailSafe": False,
            "LastResult.Late": False})

    def source_status(self, line: str, source_id: str, status: str) -> None:
        self.server.update(source_id, {"SystemState": STATES.get(status, "Error")})

    def health(self) -> dict[str, Any]:
        return {"endpoint": self.server.settings.endpoint, "running": self.server.started,
                "error": repr(self.server.start_error) if self.server.start_error else None}

    def problem(self) -> str | None:
        if self.server.start_error is not None:
            return f"OPC UA server cannot start: {self.server.start_error}"
        if self.server.crashed is not None:
            return f"OPC UA server crashed: {self.server.crashed!r}"
        return None

    def stop(self, timeout: float = 2.0) -> None:
        self._drift_stop.set()
        self._drift_wake.set()
        if self._drift_thread is not None:
            self._drift_thread.join(timeout)
        self.server.stop(timeout)


@register_sink("opcua", section=None)
def build_opcua_sink(settings: Any, context: SinkContext) -> OpcUaSink | None:
    opcua = getattr(settings, "opcua", None)
    return OpcUaSink(settings, context) if opcua is not None and opcua.enabled else None
