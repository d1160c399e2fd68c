"""`/api/sources/{id}/geometry`: which pixels of a source's frames are inspected and how (issue 20), set at runtime.

`GET /api/geometry` (viewer) lists the configured sources with theirs. GET (viewer) the geometry in effect (`resize`, `roi`, `ignore_polygons`, `tile_overlap`), where each value comes
from (override, `[[sources]]`, `[model]`, default), the override with who set it and when, the last change, and the
frame it is checked against (the source's newest inspected frame, else its first reference image); GET
`/geometry/history` (viewer) every change, newest first; PUT (operator) sets keys (a key left out keeps its value;
`"roi": null` inspects the whole frame, `"ignore_polygons": []` ignores nothing); DELETE (operator) goes back to
the configuration. A degenerate ROI or polygon, one outside the frame, or a geometry the model family cannot run
is 422 with the reason. Changes are kept in `<[storage].dir>/geometry/` and survive restarts; the running daemon
rebuilds the source's bank through the new geometry and recalibrates (daemon/references/geometry_overrides.py). Each change
is also announced: retained on MQTT `<prefix>/<line>/<source>/geometry`, webhook event `geometry`
(daemon/references/geometry_events.py).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, status
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from adapters.db import Inspection
from daemon.api.app import AppState, get_state, require_role
from daemon.api.references import _known
from daemon.references import geometry_events
from daemon.references import geometry_overrides as overrides
from model.geometry import GeometryError

router = APIRouter(prefix="/api", tags=["geometry"])

Point = Annotated[list[float], Field(min_length=2, max_length=2)]


class GeometryChange(BaseModel):
    """The keys to set; a key left out keeps its value (override or configuration)."""

    model_config = ConfigDict(extra="forbid")

    resize: Literal["squash", "fit", "tile", "auto"] | None = None
    roi: list[int] | None = Field(None, min_length=4, max_length=4, description="[x, y, width, height]; null: all")
    ignore_polygons: list[Annotated[list[Point], Field(max_length=256)]] | None = Field(None, max_length=64)
    tile_overlap: float | None = Field(None, ge=0.0, lt=0.9)
    tile_size: int | None = Field(None, ge=32, le=16384, description="frame pixels per tile; null: native resolution")


def _configured(state: AppState, source_id: str) -> str:
    _known(state, source_id)
    if not any(cfg.id == source_id for cfg in state.settings.sources):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"source {source_id!r} is not configured")
    return source_id


def frame_of(state: AppState, source_id: str) -> dict[str, Any] | None:
    """The frame a geometry is drawn on and checked against: the source's newest inspection with a stored
    frame (its size and URL), else the size of its first reference image; None when neither is known."""
    if state.sessions is not None:
        with state.sessions() as session:
            row = session.execute(
                select(Inspection.id, Inspection.width, Inspection.height, Inspection.frame_path)
                .where(Inspection.source == source_id, Inspection.width.is_not(None), Inspection.height.is_not(None))
                .order_by(Inspection.id.desc()).limit(1)).first()
        if row is not None:
            return {"inspection_id": row.id, "width": row.width, "height": row.height,
                    "frame_url": f"/api/inspections/{row.id}/frame.jpg" if row.frame_path else None,
                    "from": "newest inspection"}
    manager = state.references
    shape = manager.states[source_id].shape if manager is not None and source_id in manager.states else None
    if shape is None:
        from daemon.references.files import ReferenceSetupError, image_shape, reference_files

        try:
            files, _ = reference_files(state.settings, source_id)
            images = [f for f in files if f.suffix != ".safetensors"]
            shape = image_shape(images[0], source_id) if images else None
        except ReferenceSetupError:
            shape = None
    if shape is None:
        return None
    return {"inspection_id": None, "width": shape[1], "height": shape[0], "frame_url": None,
            "from": "first reference image"}


def _summary(state: AppState, source_id: str) -> dict[str, Any]:
    try:
        shown = overrides.summary(state.settings, source_id)
    except GeometryError as exc:  # an unreadable override file: say which and why
        raise HTTPException(status.HTTP_500_INTERNAL_SERVER_ERROR, str(exc)) from None
    manager = state.references
    bank = manager.states[source_id].as_dict() if manager is not None and source_id in manager.states else None
    return {**shown, "frame": frame_of(state, source_id), "bank": bank}


@router.get("/geometry", summary="Every configured source with the geometry it runs with (the UI's source list)")
def list_sources(state: AppState = Depends(get_state), _: str = Depends(require_role("viewer"))) -> dict[str, Any]:
    items = []
    for cfg in state.settings.sources:
        try:
            shown = overrides.summary(state.settings, cfg.id)
        except GeometryError as exc:
            items.append({"source": cfg.id, "error": str(exc)})
            continue
        items.append({"source": cfg.id, "geometry": shown["geometry"], "overridden": shown["override"] is not None})
    return {"items": items}


@router.get("/sources/{source_id}/geometry", summary="The frame geometry a source runs with and where each value comes from")
def show(source_id: str, state: AppState = Depends(get_state),
         _: str = Depends(require_role("viewer"))) -> dict[str, Any]:
    return _summary(state, _configured(state, source_id))


@router.get("/sources/{source_id}/geometry/history", summary="Every change of a source's geometry, newest first")
def history(source_id: str, limit: int = Query(50, ge=1, le=1000), state: AppState = Depends(get_state),
            _: str = Depends(require_role("viewer"))) -> dict[str, Any]:
    _configured(state, source_id)
    return {"source": source_id, "items": overrides.history(state.settings, source_id, limit=limit)}


@router.put("/sources/{source_id}/geometry", summary="Set a source's ROI, ignore polygons, resize (operator)")
def set_geometry(source_id: str, body: GeometryChange, state: AppState = Depends(get_state),
                 token: str = Depends(require_role("operator"))) -> dict[str, Any]:
    _configured(state, source_id)
    changes = {key: getattr(body, key) for key in body.model_fields_set}
    for key in ("resize", "tile_overlap"):  # null for these: keep the value (there is no "none" of them)
        if key in changes and changes[key] is None:
            del changes[key]
    if not changes:
        raise HTTPException(422, "nothing to set: give resize, roi, ignore_polygons, tile_overlap or tile_size")
    frame = frame_of(state, source_id)
    try:
        overrides.check_override(state.settings, source_id, changes,
                                 (frame["height"], frame["width"]) if frame else None)
        event = overrides.save_override(state.settings, source_id, changes, set_by=f"api:{token}")
    except GeometryError as exc:
        raise HTTPException(422, f"source {source_id}: {exc}") from None
    announced = geometry_events.announce(state.sessions, state.settings, event)
    if state.references is not None:
        state.references.wake()  # the bank is rebuilt through the new geometry now, not at the next poll
    return {**_summary(state, source_id), "change": event, "announced": announced is not None}


@router.delete("/sources/{source_id}/geometry", summary="Drop a source's geometry override: back to config (operator)")
def reset_geometry(source_id: str, state: AppState = Depends(get_state),
                   token: str = Depends(require_role("operator"))) -> dict[str, Any]:
    _configured(state, source_id)
    try:
        event = overrides.clear_override(state.settings, source_id, set_by=f"api:{token}")
    except LookupError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc).strip("'\"")) from None
    except GeometryError as exc:
        raise HTTPException(422, f"source {source_id}: {exc}") from None
    announced = geometry_events.announce(state.sessions, state.settings, event)
    if state.references is not None:
        state.references.wake()
    return {**_summary(state, source_id), "change": event, "announced": announced is not None}
