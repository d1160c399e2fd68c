"""`/api/inspections`: the history (filters, sort, cursor pages), one inspection, its artifacts, labelling.

Artifact files are found only through the path stored in the inspection's row and `ArtifactStore.path`, which
refuses anything outside the store; the URL only picks one of a fixed set of artifact names.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse
from sqlalchemy.orm import Session, sessionmaker

from adapters.db import InspectionFilter, history
from adapters.timeutil import as_utc
from daemon.api.app import AppState, get_state, require_role

router = APIRouter(prefix="/api/inspections", tags=["inspections"])

_MEDIA_TYPES = {".png": "image/png", ".jpg": "image/jpeg"}


def utc_query_time(value: datetime | None) -> datetime | None:
    """A query-string time as aware UTC (naive = UTC); 422 when it is out of range in UTC."""
    try:
        return as_utc(value)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+14:00: before year 1 in UTC
        raise HTTPException(422, f"time {value.isoformat()} is out of range in UTC") from None


def sessions_of(state: AppState) -> sessionmaker[Session]:
    if state.sessions is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "no database in this role")
    return state.sessions


@router.get("", summary="List inspections (newest first by default), filtered, one page at a time")
def list_inspections(
    source: str | None = None,
    line: str | None = None,
    after: datetime | None = Query(None, description="captured at or after (RFC 3339; naive = UTC)"),
    before: datetime | None = Query(None, description="captured before (RFC 3339; naive = UTC)"),
    min_score: float | None = None,
    max_score: float | None = None,
    anomalous: bool | None = None,
    label: Literal["normal", "anomalous", "none"] | None = Query(None, description="latest label; none = unlabelled"),
    limit: int = Query(50, ge=1, le=1000),
    cursor: str | None = Query(None, description="next_cursor of the previous page"),
    sort: Literal["time_desc", "time_asc", "score_desc", "score_asc"] = "time_desc",
    state: AppState = Depends(get_state),
    _: str = Depends(require_role("viewer")),
) -> dict[str, Any]:
    filters = InspectionFilter(source=source, line=line, after=utc_query_time(after), before=utc_query_time(before),
                               min_score=min_score, max_score=max_score, anomalous=anomalous, label=label)
    try:
        with sessions_of(state)() as session:
            page = history.list_page(session, filters, sort=sort, limit=limit, cursor=cursor)
            items = [history.inspection_dict(row, page.labels.get(row.id)) for row in page.rows]
    except history.HistoryError as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, str(exc)) from None
    return {"items": items, "next_cursor": page.next_cursor}


@router.get("/{inspection_id}", summary="One inspection with all its labels")
def get_inspection(
    inspection_id: int, state: AppState = Depends(get_state), _: str = Depends(require_role("viewer"))
) -> dict[str, Any]:
    with sessions_of(state)() as session:
        try:
            row = history.get_inspection(session, inspection_id)
        except history.NotFound as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
        return history.inspection_detail(session, row)


@router.get(
    "/{inspection_id}/{artifact}",
    summary="An artifact file: mask.png, heatmap.jpg, frame.jpg, or label_mask.png (the latest label's mask)",
    responses={200: {"content": {"image/png": {}, "image/jpeg": {}}}, 404: {"description": "no such artifact"}},
)
def get_artifact(
    inspection_id: int, artifact: str, state: AppState = Depends(get_state),
    _: str = Depends(require_role("viewer")),
) -> FileResponse:
    not_found = HTTPException(status.HTTP_404_NOT_FOUND, f"no artifact {artifact!r} for inspection {inspection_id}")
    if artifact not in history.ARTIFACTS and artifact != history.LABEL_MASK_ARTIFACT:
        raise not_found
    with sessions_of(state)() as session:
        try:
            row = history.get_inspection(session, inspection_id)
        except history.NotFound:
            raise not_found from None
        if artifact == history.LABEL_MASK_ARTIFACT:
            label = history.latest_labels(session, [row.id]).get(row.id)
            relative = label.mask_path if label is not None else None
        else:
            relative = getattr(row, history.ARTIFACTS[artifact])
    if not relative or state.store is None:
        raise not_found
    try:
        path = state.store.path(relative)  # refuses a stored path that escapes the store
    except ValueError:
        raise not_found from None
    if not path.is_file():
        raise not_found
    return FileResponse(path, media_type=_MEDIA_TYPES.get(path.suffix.lower(), "application/octet-stream"),
                        headers={"Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff"})


_LABEL_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {
                "type": "object", "required": ["label"],
                "properties": {"label": {"type": "string", "enum": list(history.LABELS)}}}},
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["label"],
                "properties": {"label": {"type": "string", "enum": list(history.LABELS)},
                               "mask": {"type": "string", "format": "binary",
                                        "description": "optional defect mask, PNG, BMP or TIFF of the frame's size (non-zero = defect)"}}}},
        },
    }
}


@router.post("/{inspection_id}/label", status_code=status.HTTP_201_CREATED, openapi_extra=_LABEL_BODY,
             summary="Label an inspection normal or anomalous (operator), optionally with a mask PNG")
async def post_label(
    inspection_id: int, request: Request, state: AppState = Depends(get_state),
    author: str = Depends(require_role("operator")),
) -> JSONResponse:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    mask: bytes | None = None
    mask_name = "mask"
    if content_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
        form = await request.form(max_files=1, max_fields=10)
        label = form.get("label")
        upload = form.get("mask")
        if upload is not None and not isinstance(upload, str):
            mask_name = f"mask ({upload.filename or 'upload'})"
            mask = await upload.read(history.MAX_MASK_BYTES + 1)
            if not mask:
                mask = None  # an empty file field: a browser form with no file chosen
    elif content_type in ("application/json", ""):
        try:
            body = json.loads(await request.body() or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise HTTPException(status.HTTP_400_BAD_REQUEST, "body is not valid JSON") from None
        label = body.get("label") if isinstance(body, dict) else None
    else:
        raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
                            "send application/json or multipart/form-data")
    if label not in history.LABELS:
        raise HTTPException(422,
                            f"label must be 'normal' or 'anomalous', not {label!r}")
    try:
        row = await run_in_threadpool(history.apply_label, sessions_of(state), state.store, inspection_id, label,
                                      author=author, mask=mask, mask_name=mask_name)
    except history.NotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    except history.HistoryError as exc:
        raise HTTPException(422, str(exc)) from None
    return JSONResponse(history.label_dict(row), status_code=status.HTTP_201_CREATED)
