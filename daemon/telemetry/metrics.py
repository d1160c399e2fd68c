"""Prometheus metrics of the daemon (one registry per service, so tests can run several in a process).

Names (the contract's list): frames in/dropped/rejected per source, queue depth, batch size, queue / inference /
end-to-end latency histograms, alerts published / pending, a source's drift; plus the process (`process_*`, `python_*`),
`anomalyd_build_info` and `anomalyd_model_info`. docs/grafana-dashboard.json charts them.
"""

from __future__ import annotations

import platform
import threading
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class _CallbackCollector(Collector):
    """Values read at scrape time from the running objects (source counters, queue sizes, outbox)."""

    def __init__(self, read: Callable[[], Iterable]) -> None:
        self._read = read

    def collect(self):
        yield from self._read()


OTHER_SOURCE = "other"
MAX_EXTRA_SOURCES = 32  # distinct unconfigured source ids (relayed capture hosts) that may become a label


class _SourceLabelled:
    """A labelled metric whose first label is a source id, mapped through `Metrics.source_label` so that ids
    decided by inputs (a producer's `source` field) cannot grow the label set without bound."""

    def __init__(self, metric: Any, label_of: Callable[[str], str]) -> None:
        self._metric = metric
        self._label_of = label_of

    def labels(self, source: str, *rest: str) -> Any:
        return self._metric.labels(self._label_of(source), *rest)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._metric, name)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.known_sources: set[str] = set()  # configured ids: always their own label
        self._extra_sources: set[str] = set()
        self._labels_lock = threading.Lock()
        self.frames_in = Counter("anomalyd_frames_in", "Frames taken from the sources by the pipeline",
                                 ["source"], registry=r)
        self.frames_rejected = Counter("anomalyd_frames_rejected", "Frames that could not be decoded",
                                       ["source"], registry=r)
        self.frames_failed = Counter("anomalyd_frames_failed", "Frames left unprocessed after an internal error",
                                     ["source", "stage"], registry=r)
        self.inspections = Counter("anomalyd_inspections", "Inspections written", ["source", "result"], registry=r)
        self.queue_depth = Gauge("anomalyd_queue_depth", "Items waiting in a pipeline queue", ["queue"], registry=r)
        self.batch_size = Histogram("anomalyd_batch_size", "Frames per model batch", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.queue_latency = Histogram("anomalyd_queue_latency_seconds",
                                       "From capture to the start of the model batch", buckets=LATENCY_BUCKETS,
                                       registry=r)
        self.inference_latency = Histogram("anomalyd_inference_latency_seconds", "Model time per batch",
                                           buckets=LATENCY_BUCKETS, registry=r)
        self.decode_latency = Histogram("anomalyd_decode_latency_seconds", "Decode + preprocess per frame",
                                        buckets=LATENCY_BUCKETS, registry=r)
        self.persist_latency = Histogram("anomalyd_persist_latency_seconds",
                                         "Post-processing, artifacts and database per frame",
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.end_to_end_latency = Histogram("anomalyd_end_to_end_latency_seconds",
                                            "From capture to the committed result", buckets=LATENCY_BUCKETS,
                                            registry=r)
        self.alerts_published = Counter("anomalyd_alerts_published", "Alerts acknowledged by the broker",
                                        registry=r)
        self.alerts_pending = Gauge("anomalyd_alerts_pending", "Alerts in the outbox not yet acknowledged",
                                    registry=r)
        self.model_swaps = Counter("anomalyd_model_swaps", "Detector swaps applied", registry=r)
        self.dead_lettered = Counter("anomalyd_frames_dead_lettered",
                                     "Frames given up after failing max_attempts times (recorded as rejected)",
                                     ["source"], registry=r)
        self.frames_deduplicated = Counter("anomalyd_frames_deduplicated",
                                           "Redelivered frames already inspected: acknowledged, no second row",
                                           ["source"], registry=r)
        self.resource_faults = Counter("anomalyd_resource_faults",
                                       "Frame attempts that failed on a missing resource (disk full, database "
                                       "down, out of memory) and were retried, never given up", ["resource"],
                                       registry=r)
        self.last_inspected = Gauge("anomalyd_source_last_inspected_timestamp_seconds",
                                    "Unix time of the last inspection written for a source", ["source"], registry=r)
        self.source_ready = Gauge("anomalyd_source_ready", "1 when a source can be inspected now, 0 while it has no "
                                  "usable reference bank (its frames wait; daemon/plant/source_availability.py)",
                                  ["source"], registry=r)
        self.source_drift = Gauge("anomalyd_source_drift", "1 while a source is in drift (daemon/zero_label/drift.py)",
                                  ["source"], registry=r)
        self.drift_events = Counter("anomalyd_drift_events", "Drifts signalled per source", ["source"], registry=r)
        # The process itself (CPU, memory, file descriptors, start time; Python version and GC) and what runs.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.build_info = Gauge("anomalyd_build_info", "anomalyd version and Python version (value 1)",
                                ["version", "python"], registry=r)
        self.build_info.labels(package_version(), platform.python_version()).set(1)
        for name in ("frames_in", "frames_rejected", "frames_failed", "inspections", "dead_lettered",
                     "frames_deduplicated", "last_inspected", "source_drift", "drift_events"):
            setattr(self, name, _SourceLabelled(getattr(self, name), self.source_label))

    def source_label(self, source: str) -> str:
        """The label for a source id: configured ids as they are; up to MAX_EXTRA_SOURCES other short printable
        ids (capture hosts relayed through Redis) as they are; anything else "other"."""
        source = str(source)
        if source in self.known_sources or source in self._extra_sources:
            return source
        if len(source) > 64 or not source.isprintable():
            return OTHER_SOURCE
        with self._labels_lock:
            if len(self._extra_sources) >= MAX_EXTRA_SOURCES:
                return OTHER_SOURCE
            self._extra_sources.add(source)
        return source

    def add_source_collector(self, sources: Callable[[], Iterable]) -> None:
        """Per-source counters kept by the sources themselves (frames captured, dropped by policy)."""

        def read():
            captured = CounterMetricFamily("anomalyd_source_frames", "Frames produced by a source", labels=["source"])
            dropped = CounterMetricFamily("anomalyd_frames_dropped", "Frames dropped by a source's queue policy",
                                          labels=["source"])
            online = GaugeMetricFamily("anomalyd_source_online", "1 when the source is online", labels=["source"])
            for source in sources():
                counts = _source_counts(source)
                captured.add_metric([source.id], counts.get("frames", 0))
                dropped.add_metric([source.id], counts.get("dropped", 0))
                online.add_metric([source.id], 1.0 if _status_text(source) == "online" else 0.0)
            yield captured
            yield dropped
            yield online

        self.registry.register(_CallbackCollector(read))

    def add_model_collector(self, detector: Callable[[], object | None]) -> None:
        """`anomalyd_model_info{model, version, image_size}` = 1 for the detector in use (follows hot swaps)."""

        def read():
            info = GaugeMetricFamily("anomalyd_model_info", "The model in use (value 1)",
                                     labels=["model", "version", "image_size"])
            current = detector()
            if current is not None:
                info.add_metric([str(getattr(current, "name", "?")), str(getattr(current, "version", "?")),
                                 str(getattr(current, "image_size", ""))], 1.0)
            yield info

        self.registry.register(_CallbackCollector(read))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("anomalyd")
    except PackageNotFoundError:  # a checkout without an installed distribution
        return "0+unknown"


def _status_text(source) -> str:
    status = getattr(source, "status", "")
    return str(getattr(status, "value", status))


def _source_counts(source) -> dict[str, float]:
    """Frames produced and dropped, whatever shape the source's counters have."""
    counters = getattr(source, "counters", None)
    if counters is None:
        return {}
    if not isinstance(counters, dict):
        counters = {k: v for k, v in vars(counters).items() if isinstance(v, int | float)}
    frames = counters.get("frames", counters.get("captured", counters.get("frames_in", 0)))
    queue = getattr(source, "queue", None)
    dropped = counters.get("dropped", counters.get("frames_dropped", getattr(queue, "dropped", 0)))
    return {"frames": float(frames or 0), "dropped": float(dropped or 0)}
