"""`/api/stats` (viewer): counts per source, anomalous rate, labels and rejected frames over a time window."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query, status

from adapters.db import history
from adapters.timeutil import as_utc
from daemon.api.inspections import sessions_of
from daemon.app import AppState, get_state, require_role

router = APIRouter(prefix="/api", tags=["stats"])




@router.get("/stats", summary="Counts over [after, before); default the last 24 hours")
def get_stats(
    after: datetime | None = Query(None, description="window start (default: 24 h before `before`)"),
    before: datetime | None = Query(None, description="window end (default: now)"),
    state: AppState = Depends(get_state),
    _: str = Depends(require_role("viewer")),
) -> dict[str, Any]:
    after, before = as_utc(after), as_utc(before)
    if after is not None and before is not None and after >= before:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "after must be earlier than before")
    with sessions_of(state)() as session:
        return history.stats(session, after=after, before=before)
