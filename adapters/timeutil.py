"""Time in one place: aware UTC datetimes, RFC 3339 text (the MQTT, HTTP and Redis contracts) and durations.

Naive datetimes are taken as UTC everywhere (SQLite hands them back naive).
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Literal, overload

TimeSpec = Literal["auto", "seconds", "milliseconds", "microseconds"]


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


@overload
def as_utc(when: datetime) -> datetime: ...
@overload
def as_utc(when: None) -> None: ...
def as_utc(when: datetime | None) -> datetime | None:
    """Aware UTC; naive input is taken as UTC; None stays None."""
    if when is None:
        return None
    return when.replace(tzinfo=timezone.utc) if when.tzinfo is None else when.astimezone(timezone.utc)


def rfc3339(when: datetime, timespec: TimeSpec = "milliseconds") -> str:
    """`2026-05-01T12:00:00.123Z`: UTC with a `Z` suffix (naive input is taken as UTC). The MQTT payloads use
    milliseconds (the default); the HTTP API and the Redis stream keep Python's `auto` (microseconds if any)."""
    return as_utc(when).isoformat(timespec=timespec).replace("+00:00", "Z")


def parse_rfc3339(text: str) -> datetime:
    """RFC 3339 / ISO 8601 text (`Z` or an offset; none: UTC) → aware UTC. ValueError if malformed."""
    return as_utc(datetime.fromisoformat(text.strip().replace("Z", "+00:00")))


# Duration units: the retraining schedule ("6h", "every 2d") and the CLI/API time arguments ("30m" ago, "2w").
DURATION_UNITS: dict[str, float] = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}
_DURATION = re.compile(r"^(every\s+)?(\d+(?:\.\d*)?|\.\d+)\s*([a-z])$", re.IGNORECASE)


def duration_seconds(text: str, *, units: str = "smhdw", allow_every: bool = False) -> float | None:
    """`"30m"`, `"6h"`, `"1.5d"`, `"2w"` (and `"every 2d"` with `allow_every`) → seconds (>= 0); None when the
    text is not such a duration (the caller says what else it may be). `units` limits the unit letters."""
    match = _DURATION.match(str(text).strip())
    if match is None or (match.group(1) and not allow_every) or match.group(3).lower() not in units:
        return None
    return float(match.group(2)) * DURATION_UNITS[match.group(3).lower()]
