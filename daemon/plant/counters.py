"""Per-source production counters for OPC UA: inspected, OK, NG, deadline misses, processing times, and the
rejected and failed frames since start or the last reset (`ResetCounters`).

Values come only from committed rows and trigger answers, so OPC UA never shows a count the database does not have.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from prometheus_client import CollectorRegistry


@dataclass
class SourceStats:
    """Per-source counters for OPC UA (since start or the last reset)."""

    inspected: int = 0
    ok: int = 0
    ng: int = 0
    deadline_missed: int = 0
    times_ms: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])  # min, sum, max, count
    baseline: dict[str, float] = field(default_factory=dict)  # rejected/errors at the last reset

    def add_time(self, ms: float) -> None:
        t = self.times_ms
        t[0] = ms if t[3] == 0 else min(t[0], ms)
        t[1] += ms
        t[2] = max(t[2], ms)
        t[3] += 1

    def processing(self) -> dict[str, float]:
        t = self.times_ms
        return {"ProcessingTime.MinMs": t[0], "ProcessingTime.MeanMs": t[1] / t[3] if t[3] else 0.0,
                "ProcessingTime.MaxMs": t[2]}


class PlantCounters:
    """The counters of every source, thread-safe (the writer thread counts, OPC UA clients read and reset)."""

    def __init__(self, source_ids: list[str], registry: CollectorRegistry) -> None:
        self.registry = registry  # rejected and failed frames are read from the daemon's metrics
        self.stats: dict[str, SourceStats] = {source_id: SourceStats() for source_id in source_ids}
        self._lock = threading.Lock()

    def committed(self, row: Any) -> None:
        """A newly committed inspection row."""
        stats = self.stats.setdefault(row.source, SourceStats())
        with self._lock:
            stats.inspected += 1
            if row.is_anomalous:
                stats.ng += 1
            elif row.is_anomalous is False:  # a frame with no decision is neither
                stats.ok += 1
            if row.processed_at is not None and row.captured_at is not None:
                stats.add_time(max(0.0, (aware(row.processed_at) - aware(row.captured_at)).total_seconds() * 1000))

    def deadline_missed(self, source_id: str) -> None:
        with self._lock:
            self.stats.setdefault(source_id, SourceStats()).deadline_missed += 1

    def _sample(self, name: str, source_id: str) -> float:
        if name == "errors":
            total = 0.0
            for family in self.registry.collect():
                if family.name == "anomalyd_frames_failed":
                    total += sum(s.value for s in family.samples
                                 if s.name.endswith("_total") and s.labels.get("source") == source_id)
            return total
        return self.registry.get_sample_value("anomalyd_frames_rejected_total", {"source": source_id}) or 0.0

    def values(self, source_id: str) -> dict[str, Any]:
        """The OPC UA `Counters.*` and `ProcessingTime.*` values of a source."""
        stats = self.stats.setdefault(source_id, SourceStats())
        with self._lock:
            values = {"Counters.Inspected": stats.inspected, "Counters.OK": stats.ok, "Counters.NG": stats.ng,
                      "Counters.DeadlineMissed": stats.deadline_missed, **stats.processing()}
            baseline = dict(stats.baseline)
        for name in ("rejected", "errors"):
            values[f"Counters.{name.capitalize()}"] = self._sample(name, source_id) - baseline.get(name, 0.0)
        return values

    def reset(self, source_id: str) -> bool:
        """Start a source's counters again; False for an unknown source."""
        if source_id not in self.stats:
            return False
        baseline = {name: self._sample(name, source_id) for name in ("rejected", "errors")}
        with self._lock:
            self.stats[source_id] = SourceStats(baseline=baseline)
        return True


def aware(when: datetime) -> datetime:
    """A naive database timestamp as UTC."""
    return when.replace(tzinfo=timezone.utc) if when.tzinfo is None else when
