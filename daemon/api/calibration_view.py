"""What the UI's references and calibration page of a source shows, in one answer (viewer):

- `GET /api/sources`: the sources this daemon knows (running or configured), for the page's source picker;
- `GET /api/sources/{id}/calibration`: the threshold in effect with its origin (the history row that set it:
  rule, who, when; pinned or not) and the newest changes; the score histogram of the source's recent frames by
  newest label; the false-reject rate against the miss rate over every threshold, from the scores its labelled
  frames were given (daemon/references/calibration_curve.py), and the point of the threshold in effect; its reference files
  with their leave-one-out scores where the running bank has them; its newest stored frames, to add as references;
- `GET /api/sources/{id}/references/{name}/thumbnail`: a small JPEG of one reference file.

Changes go through the existing endpoints, so each is recorded the same way: pin/unpin through
`/thresholds/pin` (daemon/api/thresholds.py: a threshold_history row, a log line, MQTT), references through
`POST`/`DELETE /references` (daemon/api/references.py).
"""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query, Response, status
from sqlalchemy import select

from adapters.db import Inspection
from adapters.db.history import inspection_dict
from adapters.db.repository import latest_label_subquery
from adapters.db.schema import labels
from daemon.api.app import AppState, get_state, require_role
from daemon.api.inspections import sessions_of
from daemon.api.references import _known, _source_ids
from daemon.api.thresholds import _source, _version
from daemon.references import admin as admin
from daemon.references import calibration_curve as curve
from daemon.references import thresholds
from daemon.references.files import own_reference_dir
from model.known_good import CALIBRATION_HOLDOUTS

router = APIRouter(prefix="/api/sources", tags=["calibration"])

THUMBNAIL_PX = 160


@router.get("", summary="The sources this daemon knows: running or configured")
def list_sources(state: AppState = Depends(get_state), _: str = Depends(require_role("viewer"))) -> dict[str, Any]:
    configured = {cfg.id for cfg in state.settings.sources}
    return {"items": [{"id": source_id, "configured": source_id in configured} for source_id in _source_ids(state)]}


@router.get("/{source_id}/calibration",
            summary="A source's references and operating point: threshold and origin, histogram, FRR/miss curve")
def calibration(source_id: str, limit: int = Query(500, ge=1, le=5000, description="recent frames in the histogram"),
                labelled: int = Query(2000, ge=1, le=20000, description="newest labelled frames in the curve"),
                bins: int = Query(25, ge=5, le=200), recent: int = Query(12, ge=0, le=100,
                                                                         description="newest stored frames listed"),
                state: AppState = Depends(get_state), _: str = Depends(require_role("viewer"))) -> dict[str, Any]:
    cfg = _source(state, source_id)
    sessions = sessions_of(state)
    effect = thresholds.summary(state.settings, sessions, cfg, _version(state, source_id))
    label = latest_label_subquery()
    with sessions() as session:
        window = session.execute(
            select(Inspection.score, label).where(Inspection.source == source_id, Inspection.score.is_not(None))
            .order_by(Inspection.id.desc()).limit(limit)).all()
        labelled_rows = session.execute(  # from the labels table (small, indexed), not every inspection
            select(Inspection.score, label, Inspection.model_version)
            .where(Inspection.id.in_(select(labels.c.inspection_id)), Inspection.source == source_id,
                   Inspection.score.is_not(None))
            .order_by(Inspection.id.desc()).limit(labelled)).all()
        frames = session.execute(
            select(Inspection, label).where(Inspection.source == source_id, Inspection.frame_path.is_not(None))
            .order_by(Inspection.id.desc()).limit(recent)).all() if recent else []
        recent_frames = [_frame(row, lab) for row, lab in frames]
    normals = [float(score) for score, lab, _ in labelled_rows if lab == "normal"]
    anomalies = [float(score) for score, lab, _ in labelled_rows if lab == "anomalous"]
    threshold = float(effect["threshold"])
    return {
        "source": source_id, "sources": _source_ids(state), "model_version": effect["model_version"],
        "threshold": {**effect, "pinned": effect["origin"] == "pinned",
                      "set_by_row": _origin_row(sessions, source_id, effect),
                      "history": thresholds.history(sessions, source_id, limit=10)},
        "histogram": {**curve.histogram([(float(s), lab) for s, lab in window], bins), "frames": len(window),
                      "limit": limit},
        "labelled": {"normal": normals, "anomalous": anomalies, "limit": labelled,
                     "model_versions": dict(Counter(version for _, _, version in labelled_rows))},
        "curve": curve.operating_curve(normals, anomalies),
        "at_threshold": curve.point(normals, anomalies, threshold),
        "references": _references(state, source_id),
        "recent_frames": recent_frames,
    }


@router.get("/{source_id}/references/{name}/thumbnail", summary="A small JPEG of one reference file of a source",
            responses={200: {"content": {"image/jpeg": {}}}, 404: {"description": "no such reference"}})
def reference_thumbnail(source_id: str, name: str, state: AppState = Depends(get_state),
                        _: str = Depends(require_role("viewer"))) -> Response:
    from PIL import Image

    from model.preprocess import decode_image

    _known(state, source_id)
    # only a name of the source's listing, never a path the caller builds
    path = next((item["path"] for item in _reference_files(state, source_id) if item["name"] == name), None)
    if path is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"source {source_id} has no reference {name!r}")
    try:
        image = Image.fromarray(decode_image(path))
    except Exception as exc:  # an unreadable file is named, the page shows the others
        raise HTTPException(422, f"reference {name!r} of source {source_id} cannot be read: {exc}") from None
    image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85)
    return Response(out.getvalue(), media_type="image/jpeg",
                    headers={"Cache-Control": "private, max-age=60", "X-Content-Type-Options": "nosniff"})


def _frame(row: Any, label: str | None) -> dict[str, Any]:
    item = inspection_dict(row)
    keep = ("id", "captured_at", "score", "threshold", "is_anomalous", "frame_name", "frame_url", "model_version")
    return {**{key: item[key] for key in keep}, "label": label}


def _origin_row(sessions: Any, source_id: str, effect: dict[str, Any]) -> dict[str, Any] | None:
    """The history row that set the value in effect: the newest pin when pinned, else the newest applied row of
    the model version the source runs; None for configured thresholds (config.toml set them)."""
    from adapters.db.schema import threshold_history as t

    if effect["origin"] == "pinned":
        where = [t.c.action == "pinned"]
    elif effect["origin"] == "calibrated":
        where = [t.c.action == "applied", t.c.model_version == effect["model_version"]]
    else:
        return None
    query = select(t).where(t.c.source == source_id, *where).order_by(t.c.id.desc()).limit(1)
    with sessions() as session:
        row = session.execute(query).first()
    return thresholds._row_dict(row) if row is not None else None


def _reference_files(state: AppState, source_id: str) -> list[dict[str, Any]]:
    """The source's reference listing with each file's path (server side only)."""
    items = admin.list_references(state.settings, source_id, state.sessions, state.store)
    for item in items:
        item["path"] = Path(item["folder"]) / item["name"]
    return items


def _references(state: AppState, source_id: str) -> dict[str, Any]:
    scores = leave_one_out_scores(state, source_id)
    items = []
    for item in _reference_files(state, source_id):
        item.pop("path")
        item.pop("folder")
        items.append({**item, "leave_one_out_score": scores.get(item["name"]),
                      "thumbnail_url": f"/api/sources/{source_id}/references/{item['name']}/thumbnail"})
    manager = state.references
    bank = manager.states[source_id].as_dict() if manager is not None and source_id in manager.states else None
    return {"folder": str(own_reference_dir(state.settings, source_id)), "bank": bank, "items": items,
            "held_out_at_most": CALIBRATION_HOLDOUTS}


def leave_one_out_scores(state: AppState, source_id: str) -> dict[str, float]:
    """Reference file name → its score against a bank of the other references, on the daemon's 0–1 scale, for the
    references the running bank held out when it was built (PatchCore: the first CALIBRATION_HOLDOUTS files,
    model/known_good.py). Empty without a running bank or for a family that keeps none."""
    manager = state.references
    source = manager.states.get(source_id) if manager is not None else None
    detector = getattr(source, "detector", None)
    known = getattr(detector, "known_good", None)
    own, names = list(getattr(known, "own", None) or []), list(getattr(known, "own_files", None) or [])
    if not own or len(names) != len(own):  # names from the build itself: the files may have changed since
        return {}
    import torch

    from daemon.detectors.scale import scale_outputs

    raw = torch.tensor(own, dtype=torch.float32)
    scaled = scale_outputs(detector, raw, raw)[0].tolist()
    return {name: float(score) for name, score in zip(names, scaled, strict=True)}
