"""The daemon's readiness report (`GET /health/ready`, the systemd watchdog): whether it can inspect now, and every
reason it cannot, assembled from the parts `Service` (daemon/process/service.py) built.

Ready means: model loaded, every source with a usable reference bank, database reachable and writable, storage
writable, every pipeline thread alive, no sink or integration with a problem, no source dead, not stopping. The
broker's state is reported, not required (alerts wait in the outbox). Imports only daemon/telemetry/health.py at module level;
the parts are typed under TYPE_CHECKING, so nothing here imports back into the service.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from daemon.telemetry.health import database_write_problem, source_problem, storage_problem

if TYPE_CHECKING:
    from adapters.sinks import SinkSet
    from adapters.sources.source import FrameSource
    from adapters.storage import ArtifactStore
    from daemon.frames.pipeline import Pipeline
    from daemon.frames.worker import DetectorLike
    from daemon.learning.versions import ModelWatcher
    from daemon.plant.integrations import Integrations
    from daemon.references.manager import ReferenceManager
    from daemon.telemetry.metrics import Metrics


def source_status(source: FrameSource) -> str:
    """A source's status as the plain string published and reported ("running", "disabled", ...)."""
    status = getattr(source, "status", "")
    return str(getattr(status, "value", status))


def _database(engine: Any, sessions: Callable[[], Any], metrics: Metrics) -> dict[str, Any]:
    """Reachable (and the outbox backlog, also as a metric) and writable; `error` says why not."""
    try:
        from adapters.db import count_pending_outbox, ping

        ping(engine)
        with sessions() as session:
            pending = count_pending_outbox(session)
        report: dict[str, Any] = {"reachable": True, "outbox_pending": pending}
        metrics.alerts_pending.set(pending)
    except Exception as exc:
        return {"reachable": False, "error": str(exc).splitlines()[0][:300]}
    write_problem = database_write_problem(engine)
    report["writable"] = write_problem is None
    if write_problem is not None:
        report["error"] = write_problem
    return report


def assess_readiness(
    *,
    role: str,
    detector: DetectorLike | None,
    pipeline: Pipeline | None,
    models: ModelWatcher | None,
    references: ReferenceManager | None,
    engine: Any,
    sessions: Callable[[], Any] | None,
    store: ArtifactStore | None,
    integrations: Integrations | None,
    sinks: SinkSet,
    sources: Sequence[FrameSource],
    metrics: Metrics,
    http_crashed: bool,
    stopping: bool,
) -> tuple[bool, dict[str, Any]]:
    """(ready, details): details names each part's state, and `causes` every reason it is not ready."""
    details: dict[str, Any] = {"role": role}
    ok = True
    if role != "capture":
        from adapters.cnn_runtime import in_effect as cnn_runtime_in_effect

        details["model"] = {"loaded": pipeline is not None, "name": getattr(detector, "name", None),
                            "version": getattr(detector, "version", None), "cnn_runtime": cnn_runtime_in_effect()}
        ok &= pipeline is not None
        if models is not None and models.last_error:
            details["model"]["error"] = models.last_error  # still inspecting with the previous one
        if references is not None:  # a source without a usable bank is not ready (its frames wait)
            details["references"] = references.status()
            missing = list(references.unavailable.values())
            if missing:
                ok = False
                details["reference_problems"] = missing
        details["database"] = _database(engine, sessions, metrics)
        ok &= "error" not in details["database"]
        if store is not None:
            storage = storage_problem(store.root)
            details["storage"] = {"writable": storage is None, **({"error": storage} if storage else {})}
            ok &= storage is None
    if pipeline is not None:
        healthy, problems = pipeline.healthy()
        ok &= healthy
        details["pipeline"] = {"healthy": healthy, "problems": problems, "processed": pipeline.processed,
                               "rejected": pipeline.rejected, "failed": pipeline.failed}
    if integrations is not None:
        ok &= integrations.readiness(details)
    for sink in sinks:
        details[sink.name] = sink.health()
        if sink.problem() is not None:
            ok = False
    details.setdefault("mqtt", {"enabled": False})
    details["sources"] = {source.id: source_status(source) for source in sources}
    if not stopping:
        dead = [problem for problem in map(source_problem, sources) if problem is not None]
        if dead:
            ok = False
            details["source_problems"] = dead
    problems = [*(details.get("pipeline", {}).get("problems") or []), *details.get("source_problems", []),
                *details.get("reference_problems", []),
                *([details["database"]["error"]] if details.get("database", {}).get("error") else []),
                *([details["storage"]["error"]] if details.get("storage", {}).get("error") else [])]
    if problems:
        details["causes"] = problems  # every reason it is not ready, in one list
    if http_crashed:
        ok = False
    if stopping:
        ok = False
        details["stopping"] = True
    return bool(ok), details
