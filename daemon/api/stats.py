"""`/api/stats` (viewer): counts per source, anomalous rate, labels and rejected frames over a time window."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query, status

from adapters.db import history
from daemon.api.inspections import sessions_of, utc_query_time
from daemon.app import AppState, get_state, require_role

router = APIRouter(prefix="/api", tags=["stats"])


@router.get("/stats", summary="Counts over [after, before); default the last 24 hours")
def get_stats(
    after: datetime | None = Query(None, description="window start (default: 24 h before `before`)"),
    before: datetime | None = Query(None, description="window end (default: now)"),
    state: AppState = Depends(get_state),
    _: str = Depends(require_role("viewer")),
) -> dict[str, Any]:
    after, before = utc_query_time(after), utc_query_time(before)
    if after is not None and before is not None and after >= before:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "after must be earlier than before")
    with sessions_of(state)() as session:
        try:
            return history.stats(session, after=after, before=before)
        except OverflowError:  # the default window (24 h before `before`) starts before year 1
            raise HTTPException(422, "the time window is out of range") from None
