"""The retraining schedule (`[retraining].schedule`) and the metrics a candidate can be compared on.

A light module: loading the configuration validates the schedule and the metric, and every operator command loads
the configuration, so nothing here imports SQLAlchemy (daemon.learning.retraining does); croniter (a few tens of ms) is
imported only to check a cron expression.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from adapters.timeutil import duration_seconds

# The same names as model.metrics.METRIC_NAMES (not imported: config validation must not load sklearn).
COMPARABLE_METRICS = ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_f1_max",
                      "aupro", "aupro_anomalyclip")


@dataclass(frozen=True)
class Schedule:
    """A 5-field cron expression (host local time) or a fixed interval."""

    text: str
    interval_s: float | None = None  # None: cron

    def next_after(self, when: datetime) -> datetime:
        """The first due time strictly after `when` (aware datetime)."""
        if self.interval_s is not None:
            return when + timedelta(seconds=self.interval_s)
        from croniter import croniter

        local = when.astimezone()
        return croniter(self.text, local).get_next(datetime).astimezone(timezone.utc)

    def describe(self) -> str:
        if self.interval_s is not None:
            return f"every {self.interval_s:g} s"
        return f"cron '{self.text}' (local time)"


def parse_schedule(text: str) -> Schedule:
    """"0 3 * * *" (cron) or "6h" / "30m" / "every 2d" / "90s" (interval); ValueError names what is wrong."""
    value = str(text).strip()
    seconds = duration_seconds(value, units="smhd", allow_every=True)
    if seconds is not None:
        if seconds <= 0:
            raise ValueError(f"schedule {text!r}: the interval must be positive")
        return Schedule(value, seconds)
    if len(value.split()) != 5 or not _croniter_is_valid(value):
        raise ValueError(f"schedule {text!r} is neither a 5-field cron expression (e.g. '0 3 * * *') "
                         f"nor an interval (e.g. '6h', '30m', 'every 2d')")
    return Schedule(value)


def _croniter_is_valid(value: str) -> bool:
    from croniter import croniter

    return bool(croniter.is_valid(value))
