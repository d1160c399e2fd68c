"""`GET /api/events` (viewer): a live feed of new alerts (or all inspections) as server-sent events.

Fed by polling the database by id, which works across processes (several workers writing one PostgreSQL) and
needs no hook in the pipeline. Ids are assigned at insert but rows of concurrent writers may commit out of id
order, so each poll looks back `_LOOKBACK_IDS` ids behind the newest one sent and skips ids already sent.

Events: `event: alert` (or `inspection` with `kind=all`), `id: <inspection id>`, `data: <inspection JSON>`.
A reconnecting client sends `Last-Event-ID` and gets what it missed. Browsers' EventSource cannot send an
Authorization header; the UI reads the stream with fetch() instead.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Literal

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from adapters.db import Inspection, history
from adapters.db.history import MAX_ID
from daemon.api.app import AppState, get_state, require_role
from daemon.api.inspections import sessions_of

router = APIRouter(prefix="/api", tags=["events"])

_LOOKBACK_IDS = 256
_BATCH = 200
_KEEPALIVE_S = 15.0


def _max_id(sessions: sessionmaker[Session]) -> int:
    with sessions() as session:
        return int(session.scalar(select(func.max(Inspection.id))) or 0)


def _fetch(sessions: sessionmaker[Session], above: int, alerts_only: bool, sent: set[int]) -> list[dict[str, Any]]:
    with sessions() as session:
        query = select(Inspection).where(Inspection.id > above)
        if alerts_only:
            query = query.where(Inspection.is_anomalous.is_(True))
        rows = [row for row in session.scalars(query.order_by(Inspection.id).limit(_BATCH + len(sent)))
                if row.id not in sent][:_BATCH]
        labels = history.latest_labels(session, [row.id for row in rows])
        return [history.inspection_dict(row, labels.get(row.id)) for row in rows]


@router.get("/events", summary="Server-sent events: new alerts (kind=alerts) or every inspection (kind=all)",
            responses={200: {"content": {"text/event-stream": {}}}})
async def events(
    request: Request,
    kind: Literal["alerts", "all"] = "alerts",
    after_id: int | None = Query(None, ge=0, le=MAX_ID,
                                 description="start after this inspection id (default: now)"),
    max_events: int | None = Query(None, ge=1, description="close the stream after this many events"),
    last_event_id: str | None = Header(None),
    state: AppState = Depends(get_state),
    _: str = Depends(require_role("viewer")),
) -> StreamingResponse:
    sessions = sessions_of(state)
    if last_event_id and last_event_id.strip().isdigit():
        after_id = int(last_event_id.strip())
        if after_id > MAX_ID:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, f"Last-Event-ID {after_id} is not an inspection id")
    start = after_id if after_id is not None else await run_in_threadpool(_max_id, sessions)
    poll_s = float(state.extra.get("events_poll_s", 1.0))
    event_name = "alert" if kind == "alerts" else "inspection"

    async def stream():
        yield "retry: 3000\n\n"
        newest, sent, count = start, set(), 0
        last_write = time.monotonic()
        while not await request.is_disconnected():
            items = await run_in_threadpool(_fetch, sessions, max(start, newest - _LOOKBACK_IDS),
                                            kind == "alerts", sent)
            for item in items:
                yield f"id: {item['id']}\nevent: {event_name}\ndata: {json.dumps(item, separators=(',', ':'))}\n\n"
                sent.add(item["id"])
                newest = max(newest, item["id"])
                count += 1
                last_write = time.monotonic()
                if max_events is not None and count >= max_events:
                    return
            sent = {sent_id for sent_id in sent if sent_id > newest - _LOOKBACK_IDS}
            if time.monotonic() - last_write > _KEEPALIVE_S:
                yield ": keepalive\n\n"
                last_write = time.monotonic()
            await asyncio.sleep(poll_s)

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
