"""The OPC UA `Counters.Rejected` and `Counters.Errors` of each source: the daemon's own metrics (rejected frames,
failed frames) since it started or the source's last `ResetCounters`.

The other counters (Inspected, OK, NG, DeadlineMissed, ProcessingTime) are the OPC UA sink's: rebuilt from the
database at start and kept from the committed rows and the outbox (adapters/opcua_view.py), so they survive a
restart; these two are process metrics and start again with the process.
"""

from __future__ import annotations

import threading
from typing import Any

from prometheus_client import CollectorRegistry


class PlantCounters:
    """Rejected and failed frames per source, as OPC UA shows them (thread-safe: OPC UA clients reset)."""

    def __init__(self, source_ids: list[str], registry: CollectorRegistry) -> None:
        self.registry = registry  # rejected and failed frames are read from the daemon's metrics
        self.baselines: dict[str, dict[str, float]] = {source_id: {} for source_id in source_ids}
        self._lock = threading.Lock()

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
        """The OPC UA `Counters.Rejected` and `Counters.Errors` of a source."""
        with self._lock:
            baseline = dict(self.baselines.get(source_id, {}))
        return {f"Counters.{name.capitalize()}": self._sample(name, source_id) - baseline.get(name, 0.0)
                for name in ("rejected", "errors")}

    def reset(self, source_id: str) -> bool:
        """Start a source's counters again; False for an unknown source."""
        if source_id not in self.baselines:
            return False
        baseline = {name: self._sample(name, source_id) for name in ("rejected", "errors")}
        with self._lock:
            self.baselines[source_id] = baseline
        return True
