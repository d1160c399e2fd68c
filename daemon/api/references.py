"""`/api/sources/{id}/references` (normal references of a source) and `/api/sources/{id}/scores` (its histogram).

GET lists the reference files (viewer); POST `{"inspection_ids": [..]}` copies those inspections' frames into the
source's reference folder under server-chosen names (operator; a frame that was found or labelled anomalous is
added with a warning); DELETE `?name=ref-..` removes files of that folder (operator). The running daemon rebuilds
the source's bank from the new files and swaps it in between two batches (daemon/references/manager.py).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query, status
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field
from sqlalchemy import select

from adapters.db import Inspection
from adapters.db.repository import latest_label_subquery
from daemon.api.app import AppState, get_state, require_role
from daemon.api.inspections import sessions_of
from daemon.references import admin as admin
from daemon.references import files as refs
from daemon.references.calibration import load_thresholds
from daemon.references.manager import ReferenceManager

router = APIRouter(prefix="/api/sources", tags=["references"])


class AddReferences(BaseModel):
    inspection_ids: list[int] = Field(min_length=1, max_length=refs.MAX_REFERENCES)


def _source_ids(state: AppState) -> list[str]:
    ids = [source.id for source in state.sources]
    return ids + [cfg.id for cfg in state.settings.sources if cfg.id not in ids]


def _known(state: AppState, source_id: str) -> str:
    if source_id not in _source_ids(state):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no source {source_id!r} "
                            f"(known: {', '.join(_source_ids(state)) or 'none'})")
    return source_id


def _manager(state: AppState) -> ReferenceManager | None:
    return state.references


@router.get("/{source_id}/references", summary="The normal reference images of a source")
def list_references(source_id: str, state: AppState = Depends(get_state),
                    _: str = Depends(require_role("viewer"))) -> dict[str, Any]:
    _known(state, source_id)
    manager = _manager(state)
    info = manager.states[source_id].as_dict() if manager is not None and source_id in manager.states else None
    return {"source": source_id, "folder": str(refs.own_reference_dir(state.settings, source_id)),
            "items": admin.list_references(state.settings, source_id, state.sessions, state.store), "bank": info}


@router.get("/{source_id}/references/proposal", summary="Known-good candidates of a source that runs mutual scoring")
def propose_references(source_id: str,
                       count: int | None = Query(None, ge=1, le=refs.MAX_REFERENCES,
                                                 description="frames proposed (default: [mutual] propose_count)"),
                       after: int | None = Query(None, ge=1, description="judged normal-looking frames needed first "
                                                 "(default: [mutual] propose_after)"),
                       since: datetime | None = Query(None, description="a drift's start: the frames since then"),
                       state: AppState = Depends(get_state),
                       _: str = Depends(require_role("viewer"))) -> dict[str, Any]:
    """Approve them by POSTing their inspection ids to /references (daemon/zero_label/start.py). A drift event offers
    this with `since` = its start (daemon/zero_label/drift.py)."""
    from daemon.zero_label.start import propose_references as propose

    _known(state, source_id)
    mutual = state.settings.mutual
    return propose(sessions_of(state), source_id, count or mutual.propose_count,
                   min_judged=after or mutual.propose_after, since=since)


@router.get("/{source_id}/references/history", summary="Who added or removed a source's references, and when")
def reference_history(source_id: str, limit: int = Query(50, ge=1, le=1000), state: AppState = Depends(get_state),
                      _: str = Depends(require_role("viewer"))) -> dict[str, Any]:
    """Newest first: `at`, `action` (added | removed), `names`, `inspection_ids`, `by` (`api:<token>`,
    `cli:<user>`, `daemon:auto_accept`); daemon/references/history.py."""
    from daemon.references.history import history

    _known(state, source_id)
    return {"source": source_id, "items": history(state.settings, source_id, limit)}


@router.get("/{source_id}/drift", summary="Whether a source is in drift now, and its drifts, newest first")
def drift(source_id: str, limit: int = Query(20, ge=1, le=1000), state: AppState = Depends(get_state),
          _: str = Depends(require_role("viewer"))) -> dict[str, Any]:
    """The source's drift watch (mutual scoring's, or PatchCore's on its references: daemon/detectors/drift_watch.py) as the
    daemon reported it (daemon/zero_label/drift.py): a current drift offers the frames since its start as new references
    (`references_proposal`)."""
    from daemon.zero_label.drift import drift_status

    _known(state, source_id)
    return drift_status(sessions_of(state), source_id, limit)


@router.post("/{source_id}/references", status_code=status.HTTP_201_CREATED,
             summary="Use the frames of inspections as normal references of their source (operator)")
async def add_references(source_id: str, body: AddReferences, state: AppState = Depends(get_state),
                         token: str = Depends(require_role("operator"))) -> dict[str, Any]:
    _known(state, source_id)
    if state.store is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "no artifact store in this role")
    try:
        added, warnings = await run_in_threadpool(admin.add_references, state.settings, sessions_of(state),
                                                  state.store, source_id, body.inspection_ids, f"api:{token}")
    except LookupError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc).strip("'\"")) from None
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None
    manager = _manager(state)
    if manager is not None:
        manager.wake()
    return {"source": source_id, "added": added, "warnings": warnings}


@router.delete("/{source_id}/references", summary="Remove reference images of a source by name (operator)")
def remove_references(source_id: str, name: list[str] = Query(..., min_length=1),
                      state: AppState = Depends(get_state),
                      token: str = Depends(require_role("operator"))) -> dict[str, Any]:
    _known(state, source_id)
    removed = []
    for item in name:
        try:
            admin.remove_reference(state.settings, source_id, item, f"api:{token}")
        except LookupError as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc).strip("'\"")) from None
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        removed.append(item)
    manager = _manager(state)
    if manager is not None:
        manager.wake()
    return {"source": source_id, "removed": removed}


@router.get("/{source_id}/scores", summary="Recent scores of a source with labels and thresholds (histogram)")
def recent_scores(source_id: str, limit: int = Query(500, ge=1, le=5000), state: AppState = Depends(get_state),
                  _: str = Depends(require_role("viewer"))) -> dict[str, Any]:
    _known(state, source_id)
    label = latest_label_subquery()
    with sessions_of(state)() as session:
        rows = session.execute(
            select(Inspection.score, Inspection.threshold, Inspection.model_version, label)
            .where(Inspection.source == source_id, Inspection.score.is_not(None))
            .order_by(Inspection.id.desc()).limit(limit)).all()
    effect = thresholds_in_effect(state, source_id, rows[0][2] if rows else None)
    return {"source": source_id, **effect,
            "items": [{"score": score, "label": lab, "threshold": thr} for score, thr, _, lab in rows]}


def thresholds_in_effect(state: AppState, source_id: str, recorded_version: str | None,
                         stored: dict[tuple[str, str], tuple[float, float]] | None = None,
                         fallback: float = 0.5) -> dict[str, Any]:
    """The image and pixel thresholds a source runs with: calibrated for its model version (the running detector's,
    else `recorded_version`, the newest one recorded) when stored, else configured, else `fallback`.
    `stored` is `load_thresholds`' answer when the caller already has it (one query for many sources)."""
    cfg = next((c for c in state.settings.sources if c.id == source_id), None)
    threshold = cfg.threshold if cfg is not None else fallback
    pixel = cfg.map_threshold if cfg is not None else threshold
    version, calibrated = recorded_version, False
    detector = state.current_detector()
    if detector is not None:
        version = detector.version_for(source_id) if hasattr(detector, "version_for") else str(detector.version)
    if version is not None and state.sessions is not None:
        if stored is None:
            stored = load_thresholds(state.sessions)
        if (source_id, version) in stored:
            (threshold, pixel), calibrated = stored[(source_id, version)], True
    pinned = state.references is not None and source_id in state.references.thresholds.pins
    if pinned:  # an operator's pin wins over every version's calibration (daemon/references/thresholds.py)
        threshold, pixel = state.references.thresholds.pins[source_id]
    return {"model_version": version, "threshold": threshold, "pixel_threshold": pixel, "calibrated": calibrated,
            "pinned": pinned}
