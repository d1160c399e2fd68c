"""`/api/stats` (viewer): counts per source, anomalous rate, labels and rejected frames over a time window;
`/api/stats/series`: the same in time buckets per source or line, with scores and thresholds (the dashboard)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, status

from adapters.db import history
from daemon.api.app import AppState, get_state, require_role
from daemon.api.inspections import sessions_of, utc_query_time
from daemon.api.references import thresholds_in_effect
from daemon.references.calibration import load_thresholds

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


@router.get("/stats/series", summary="Counts, defect rate and scores per source or line in time buckets "
                                     "(the UI's dashboard); default the last 24 hours in 1 h buckets")
def get_series(
    after: datetime | None = Query(None, description="window start (default: 24 h before `before`)"),
    before: datetime | None = Query(None, description="window end (default: now)"),
    bucket: int = Query(3600, ge=history.MIN_BUCKET_S, le=history.MAX_BUCKET_S,
                        description="bucket length in seconds (UTC, aligned to the Unix epoch)"),
    by: Literal["source", "line"] = Query("line", description="one series per source, or per line (a source "
                                                              "without a configured line is its own line)"),
    state: AppState = Depends(get_state),
    _: str = Depends(require_role("viewer")),
) -> dict[str, Any]:
    after, before = utc_query_time(after), utc_query_time(before)
    with sessions_of(state)() as session:
        try:
            result = history.series(session, after=after, before=before, bucket_s=bucket, by=by)
        except history.HistoryError as exc:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, str(exc)) from None
        except OverflowError:
            raise HTTPException(422, "the time window is out of range") from None
    if by == "source":  # the thresholds in effect, as the per-source histogram draws them
        stored = load_thresholds(state.sessions) if result["groups"] else {}
        for group in result["groups"]:
            recorded = group["model_versions"].get(group["key"])
            applied = [point["max_threshold"] for point in group["points"] if point["max_threshold"] is not None]
            group.update(thresholds_in_effect(state, group["key"], recorded, stored,
                                              fallback=applied[-1] if applied else 0.5))
    return result
