"""`/api/sources/{id}/thresholds`: the thresholds a source runs with and their origin, their history, and pins.

GET (viewer) the thresholds in effect (pinned, calibrated for the version the source runs, or configured) with the
last change; GET `/history` (viewer) every change, newest first; PUT `/pin` `{"threshold": x, "pixel_threshold": y}`
(operator) fixes them for every model version until DELETE `/pin` (operator). Each change is a history row, a log
line and a retained MQTT message (daemon/references/thresholds.py); the running daemon uses a pin from the next batch on.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query, status
from pydantic import BaseModel, Field

from daemon.api.app import AppState, get_state, require_role
from daemon.api.inspections import sessions_of
from daemon.api.references import _known
from daemon.references import thresholds

router = APIRouter(prefix="/api/sources", tags=["thresholds"])


class Pin(BaseModel):
    threshold: float = Field(ge=0.0, le=1.0)
    pixel_threshold: float | None = Field(None, ge=0.0, le=1.0)


def _version(state: AppState, source_id: str) -> str | None:
    detector = state.current_detector()
    if detector is None:
        return None
    return detector.version_for(source_id) if hasattr(detector, "version_for") else str(detector.version)


def _source(state: AppState, source_id: str) -> Any:
    _known(state, source_id)
    cfg = next((c for c in state.settings.sources if c.id == source_id), None)
    if cfg is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"source {source_id!r} is not configured")
    return cfg


def _after_change(state: AppState) -> None:
    manager = state.references
    if manager is not None:
        manager.refresh_thresholds()  # from the next frame on, not the next poll; announces the change (MQTT)


@router.get("/{source_id}/thresholds", summary="The thresholds a source runs with and their origin")
def show(source_id: str, state: AppState = Depends(get_state),
         _: str = Depends(require_role("viewer"))) -> dict[str, Any]:
    cfg = _source(state, source_id)
    return thresholds.summary(state.settings, sessions_of(state), cfg, _version(state, source_id))


@router.get("/{source_id}/thresholds/history", summary="Every change of a source's thresholds, newest first")
def history(source_id: str, limit: int = Query(50, ge=1, le=1000), state: AppState = Depends(get_state),
            _: str = Depends(require_role("viewer"))) -> dict[str, Any]:
    _source(state, source_id)
    return {"source": source_id, "items": thresholds.history(sessions_of(state), source_id, limit=limit)}


@router.put("/{source_id}/thresholds/pin", summary="Pin a source's thresholds until unpinned (operator)")
def pin(source_id: str, body: Pin, state: AppState = Depends(get_state),
        token: str = Depends(require_role("operator"))) -> dict[str, Any]:
    _source(state, source_id)
    sessions = sessions_of(state)
    version = _version(state, source_id) or thresholds.recorded_version(state.settings, sessions, source_id)
    event = thresholds.pin(sessions, source_id, version, body.threshold, body.pixel_threshold, set_by=f"api:{token}")
    _after_change(state)
    return event


@router.delete("/{source_id}/thresholds/pin", summary="Unpin a source's thresholds (operator)")
def unpin(source_id: str, state: AppState = Depends(get_state),
          token: str = Depends(require_role("operator"))) -> dict[str, Any]:
    _source(state, source_id)
    sessions = sessions_of(state)
    version = _version(state, source_id) or thresholds.recorded_version(state.settings, sessions, source_id)
    try:
        event = thresholds.unpin(sessions, source_id, version, set_by=f"api:{token}")
    except LookupError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc).strip("'\"")) from None
    _after_change(state)
    return event
