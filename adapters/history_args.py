"""The history queries' argument errors and time arguments, apart from `adapters.db.history` (which re-exports
them) so that the operator commands check their arguments without importing SQLAlchemy: a command run where
there is no database says so without loading it."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from adapters.timeutil import duration_seconds, utc_now


class HistoryError(ValueError):
    """A bad query or label value (the API answers 400/422, the CLI exits 2)."""


def parse_when(value: str, *, now: datetime | None = None, name: str = "time") -> datetime:
    """An RFC 3339 / ISO 8601 time (naive = UTC), or a duration ago: `30m`, `24h`, `7d`, `2w`."""
    text = value.strip()
    seconds = duration_seconds(text)
    if seconds is not None:
        return (now or utc_now()) - timedelta(seconds=seconds)
    try:  # the offset is kept (converting 0001-01-01T00:00+14:00 to UTC would overflow)
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise HistoryError(f"{name} {value!r}: expected an ISO time like 2024-05-01T08:00:00Z or a duration "
                           "like 30m, 24h, 7d") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)
