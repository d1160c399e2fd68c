"""Result sinks: where committed results, alerts and source statuses go (MQTT, webhooks, OPC UA).

The contract (`ResultSink`), as the daemon calls it:

- Everything a sink receives is already committed to the database: the result writer calls
  `inspection_committed(result)` only after the transaction that stored the inspection (and its alert) returned,
  so a sink never shows what the database does not have. A redelivered frame (already stored) is not sent again.
  It runs on a writer thread: it must not block (queue and send from your own thread, or send fire-and-forget)
  and must not raise for a delivery problem (the `SinkSet` logs and swallows what it does raise, so one sink never
  stops the others or the writer).
- Alerts keep the outbox guarantee. The writer stores each alert in the `outbox` table in the same transaction
  as its inspection, as a neutral event (adapters/events.py: `event_type` and a sink-independent `body`; the
  row's `id` is the message id consumers dedupe on), then calls `alerts_committed()`; threshold changes, drifts
  and trigger answers are outbox events too. A sink that delivers them has its own formatter (a function in its
  adapter module: `adapters.mqtt.mqtt_message`, `adapters.webhooks.webhook_request`) and its own cursor in
  `sink_cursors` (adapters/db/outbox.py: the last `seq` delivered to it): it reads the rows after its cursor in
  `seq` order (commit order), sends them and moves the cursor only once the receiver acknowledged them, so
  neither a receiver outage nor a daemon restart loses one, and no sink waits for another. A sink that shows the
  events itself (OPC UA) follows the outbox with `adapters.outbox_follower.OutboxFollower`: its state restored as
  of its cursor at start, each row applied, the cursor moved past it.
- `source_status(line, source_id, status)`: a source went online / offline / disabled (from the sources' threads).
- Lifecycle: `start()` must not block on the receiver; `flush(timeout)` waits for pending alerts at shutdown;
  `stop(timeout)`; `pending()` counts undelivered alerts; `health()` is the sink's part of `/readyz`
  (`details[<name>]`); `problem()` returns why the sink cannot work any more (a crashed thread), which makes the
  daemon not ready. A receiver being unreachable is reported in `health()`, never fatal.

Adding a sink is one module plus its registration::

    class WebhookSink(ResultSink):
        name = "webhooks"
        ...

    @register_sink("webhooks", section="webhooks")
    def build_webhooks(section: WebhookSettings, context: SinkContext) -> ResultSink | None:
        return WebhookSink(section, context) if section.enabled else None

`section` names the configuration section the sink reads (`Settings.<section>`, a pydantic model the sink module
defines and `daemon/config/settings.py` declares as a field). The built-in sinks' modules are imported on the first
`sink_kinds()` call.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

BUILTIN_SINK_MODULES: tuple[str, ...] = ("adapters.sinks.mqtt", "adapters.sinks.webhook", "adapters.sinks.opcua")


@dataclass(frozen=True)
class CommittedInspection:
    """One stored inspection, as sinks see it (the row's values after the commit)."""

    inspection_id: int
    frame_id: str
    source: str
    line: str
    captured_at: datetime
    score: float | None  # None: no score (a frame with no decision, e.g. mutual scoring's window filling)
    threshold: float
    is_anomalous: bool | None  # None: no decision (never a pass)
    model_version: str
    regions: list[dict[str, Any]] = field(default_factory=list)
    frame_name: str | None = None
    processed_at: datetime | None = None  # when its result was ready (capture → result: OPC UA's ProcessingTime)


@dataclass(frozen=True)
class SinkContext:
    """What a sink gets from the daemon besides its own configuration section."""

    sessions: sessionmaker[Session] | None = None  # the database (the outbox) for alert-delivering sinks
    base_dir: Path = field(default_factory=Path.cwd)  # the config file's directory: relative paths (TLS files)
    on_alerts_sent: Callable[[int], None] | None = None  # metrics: alerts acknowledged by the receiver


class ResultSink:
    """Base class of the sinks; every hook does nothing by default (override what the sink handles)."""

    name: str = "sink"

    def start(self) -> None:
        """Connect (asynchronously: an absent receiver must not block the daemon)."""

    def inspection_committed(self, result: CommittedInspection) -> None:
        """A new inspection is stored (called after the commit, on a writer thread; must not block)."""

    def alerts_committed(self) -> None:
        """New alerts are in the outbox (committed): wake the delivery."""

    def source_status(self, line: str, source_id: str, status: str) -> None:
        """A source's status changed (online / offline / disabled)."""

    def flush(self, timeout: float) -> bool:
        """Wait until every alert is delivered (True) or `timeout` passes (False)."""
        return True

    def pending(self) -> int:
        """Alerts not delivered yet."""
        return 0

    def health(self) -> dict[str, Any]:
        """This sink's part of the readiness details."""
        return {}

    def problem(self) -> str | None:
        """Why this sink cannot work any more (a crashed thread): the daemon is then not ready."""
        return None

    def stop(self, timeout: float = 2.0) -> None:
        """Say goodbye (e.g. a retained `stopped`) and disconnect."""


SinkFactory = Callable[[Any, SinkContext], "ResultSink | None"]


@dataclass(frozen=True)
class SinkKind:
    key: str
    section: str | None  # the Settings field the factory gets (None: the whole Settings)
    factory: SinkFactory


_sinks: dict[str, SinkKind] = {}
_builtins_loaded = False
_lock = threading.RLock()


def register_sink(key: str, *, section: str | None, replace: bool = False) -> Callable[[SinkFactory], SinkFactory]:
    """Decorator: register `factory(section_settings, context) -> ResultSink | None` (None: disabled).

    `section` is the name of the configuration section the factory gets; None: the whole configuration.
    """

    def register(factory: SinkFactory) -> SinkFactory:
        with _lock:
            if key in _sinks and not replace and _sinks[key].factory is not factory:
                raise ValueError(f"sink {key!r} is already registered")
            _sinks[key] = SinkKind(key, section, factory)
        return factory

    return register


def unregister_sink(key: str) -> None:
    with _lock:
        _sinks.pop(key, None)


def sink_kinds() -> dict[str, SinkKind]:
    global _builtins_loaded
    if not _builtins_loaded:
        with _lock:
            for module in BUILTIN_SINK_MODULES:
                importlib.import_module(module)
            _builtins_loaded = True
    return dict(_sinks)


def build_sinks(settings: Any, context: SinkContext) -> list[ResultSink]:
    """Every registered sink whose section is present in `settings` and enabled (its factory decides)."""
    built = []
    for kind in sink_kinds().values():
        section = settings if kind.section is None else getattr(settings, kind.section, None)
        if section is None:
            continue
        sink = kind.factory(section, context)
        if sink is not None:
            built.append(sink)
    return built


class SinkSet:
    """The daemon's sinks as one: fans each call out; a sink that raises is logged and the others still get it."""

    def __init__(self, sinks: Iterable[ResultSink] = ()) -> None:
        self.sinks = list(sinks)

    def __bool__(self) -> bool:
        return bool(self.sinks)

    def __iter__(self):
        return iter(self.sinks)

    def get(self, name: str) -> ResultSink | None:
        return next((sink for sink in self.sinks if sink.name == name), None)

    def _each(self, what: str, call: Callable[[ResultSink], Any]) -> None:
        for sink in self.sinks:
            try:
                call(sink)
            except Exception:
                log.exception("sink %s failed in %s", sink.name, what)

    def start(self) -> None:
        for sink in self.sinks:
            sink.start()

    def inspection_committed(self, result: CommittedInspection) -> None:
        self._each("inspection_committed", lambda sink: sink.inspection_committed(result))

    def alerts_committed(self) -> None:
        self._each("alerts_committed", lambda sink: sink.alerts_committed())

    def source_status(self, line: str, source_id: str, status: str) -> None:
        self._each("source_status", lambda sink: sink.source_status(line, source_id, status))

    def flush(self, timeout: float) -> bool:
        return all(sink.flush(timeout) for sink in self.sinks)

    def stop(self, timeout: float = 2.0) -> None:
        self._each("stop", lambda sink: sink.stop(timeout))


__all__ = [
    "CommittedInspection",
    "ResultSink",
    "SinkContext",
    "SinkKind",
    "SinkSet",
    "build_sinks",
    "register_sink",
    "sink_kinds",
    "unregister_sink",
]
