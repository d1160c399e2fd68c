"""The history filters as SQL, in Core over `adapters.db.schema` (no ORM: the operator commands use them too).

`adapters.db.history` (API and CLI reads) and `adapters.db.repository` (the daemon's ORM code) share these.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select

from adapters.db.schema import inspections, labels


@dataclass
class InspectionFilter:
    source: str | None = None
    line: str | None = None
    after: datetime | None = None  # captured_at >= after
    before: datetime | None = None  # captured_at < before
    min_score: float | None = None
    max_score: float | None = None
    anomalous: bool | None = None
    label: str | None = None  # latest label: normal | anomalous | "none" (unlabelled)


def latest_label_subquery() -> Any:
    """The label of an inspection's newest label row, as a correlated scalar subquery (None when unlabelled)."""
    return (
        select(labels.c.label)
        .where(labels.c.inspection_id == inspections.c.id)
        .order_by(labels.c.created_at.desc(), labels.c.id.desc())
        .limit(1)
        .correlate(inspections)
        .scalar_subquery()
    )


def inspection_filter_clauses(filters: InspectionFilter) -> list[Any]:
    """WHERE clauses for `filters`: the one definition of the history filters (API, CLI, repository)."""
    if filters.label is not None and filters.label not in ("normal", "anomalous", "none"):
        raise ValueError(f"label filter must be normal, anomalous or none, not {filters.label!r}")
    column = inspections.c
    checks = [
        (filters.source, lambda v: column.source == v),
        (filters.line, lambda v: column.line == v),
        (filters.after, lambda v: column.captured_at >= v),
        (filters.before, lambda v: column.captured_at < v),
        (filters.min_score, lambda v: column.score >= v),
        (filters.max_score, lambda v: column.score <= v),
        (filters.anomalous, lambda v: column.is_anomalous.is_(v)),
        (filters.label, lambda v: latest_label_subquery().is_(None) if v == "none" else latest_label_subquery() == v),
    ]
    return [clause(value) for value, clause in checks if value is not None]
