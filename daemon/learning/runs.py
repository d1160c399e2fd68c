"""Recent retraining runs as the Models page (`GET /api/models`) and `anomalyd models list` show them: a failed
run registers no version, so its reason is only here (the `failed: ...` line of its log)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from adapters.db.schema import training_runs  # Core: `anomalyd models list` does not load the ORM

if TYPE_CHECKING:
    from sqlalchemy import Connection
    from sqlalchemy.orm import Session


def failure_reason(log_text: str | None) -> str | None:
    """The last `failed: ...` or `interrupted: ...` line of a run's log (without its time stamp)."""
    for line in reversed((log_text or "").splitlines()):
        for marker in ("failed: ", "interrupted: "):
            at = line.find(marker)
            if at >= 0:
                return line[at:].strip()[:500]
    return None


def run_view(row: Any) -> dict[str, Any]:
    """A training run: id, status, times, trigger, candidate, promoted, and why it failed."""
    params = row.params or {}
    return {"id": row.id, "status": row.status, "started_at": row.started_at, "finished_at": row.finished_at,
            "trigger": params.get("trigger"), "candidate_version": row.candidate_version, "promoted": row.promoted,
            "reason": ((row.metrics or {}).get("reason") if row.status == "succeeded"
                       else failure_reason(row.log)),
            "metrics": row.metrics}


def recent_runs(session: Session | Connection, limit: int = 10) -> list[dict[str, Any]]:
    """The newest `limit` runs, newest first (an ORM session or a Core connection: the history commands')."""
    query = select(training_runs).order_by(training_runs.c.id.desc()).limit(limit)
    return [run_view(row) for row in session.execute(query)]
