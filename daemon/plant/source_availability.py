"""Whether each source can be inspected now, told wherever an operator or a PLC looks (issue 19).

A source without a usable reference bank is *unavailable*: its frames wait (inbox, redelivery) until a bank
exists. The reference manager keeps the cause per source in its `unavailable` mapping; `AvailabilityBoard` is that
mapping with a callback on every change, so the daemon tells readiness (`/api/health/ready`), the retained MQTT
status (`unavailable` instead of `online`), OPC UA (`SystemState` Error) and the metric `anomalyd_source_ready` the
same thing at the same moment.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

UNAVAILABLE = "unavailable"
_MISSING: Any = object()


class AvailabilityBoard(dict[str, str]):
    """source id → why it cannot be inspected; `on_change(source_id, cause or None)` after each change."""

    def __init__(self, on_change: Callable[[str, str | None], None]) -> None:
        super().__init__()
        self.on_change = on_change

    def __setitem__(self, source_id: str, cause: str) -> None:
        changed = self.get(source_id) != cause
        super().__setitem__(source_id, cause)
        if changed:
            self.on_change(source_id, cause)

    def pop(self, source_id: str, default: Any = _MISSING) -> Any:
        had = source_id in self
        value = super().pop(source_id) if had else default
        if value is _MISSING:
            raise KeyError(source_id)
        if had:
            self.on_change(source_id, None)
        return value


def published_status(status: str, source_id: str, unavailable: Mapping[str, str]) -> str:
    """The status a source publishes: `unavailable` while it is online but cannot be inspected."""
    return UNAVAILABLE if status == "online" and source_id in unavailable else status
