"""Zero-label start: a source with no references is inspected by mutual scoring on its own recent frames.

A source configured with `references = "auto"` (or any source when `[model].name = "mutual"`) gets, while its
managed reference folder (`<[storage].dir>/references/<source id>`) is empty, its own `mutual` detector
(model/mutual: PatchCore's Lite0 features, a bounded rolling window of that source's normal-looking frames, each
new frame scored against it). The model weights are loaded once and shared; every source has its own window.
`propose_references` picks known-good candidates from the source's own inspections (`GET
/api/sources/{id}/references/proposal`, `anomalyd references propose`). When references arrive in the managed
folder (an operator approves the proposal, i.e. adds those frames through `POST /api/sources/{id}/references` or
`anomalyd references add`), the reference manager builds the configured model on them (PatchCore), calibrates and
swaps it in, like any change of references; the new model version on the inspections records the switch.

Scores are on the daemon's 0-1 scale (daemon/detectors/scale.py, rule "mutual"): the window's own scale puts the point where
it alerts (1.5x the median leave-one-out score of the frames it holds; frames from 1.35x on are kept out of it)
at 0.5, the default `threshold`.
"""

from __future__ import annotations

import threading
from datetime import datetime
from typing import Any

from daemon.detectors.scale import scaled

AUTO = "auto"
PROPOSED = 8  # references proposed at once
PROPOSAL_POOL = 200  # newest judged frames a proposal picks from
PROPOSE_AFTER = 50  # judged normal-looking frames before anything is proposed (default of [mutual] propose_after)
_SHARED: dict[tuple, Any] = {}  # (device, dtype, options) → the mutual model whose weights every source shares
_SHARED_LOCK = threading.Lock()


def version_prefix() -> str:
    """What the versions of the zero-label family's detectors start with (their inspections' `model_version`)."""
    from model.factory import zero_label_family

    return f"{zero_label_family()}-"


def scores_own_frames(detector: Any) -> bool:
    """Whether `detector` (the configured model) is itself a zero-label family: every source, references or not."""
    from model.factory import capabilities_of

    return capabilities_of(getattr(detector, "raw", detector)).scores_own_frames


def zero_label(settings: Any, base: Any, source_id: str, files: list) -> bool:
    """Whether `source_id` is inspected by mutual scoring now."""
    if scores_own_frames(base):  # e.g. [model].name = "mutual": every source, references or not
        return True
    cfg = next((s for s in settings.sources if s.id == source_id), None)
    return not files and cfg is not None and cfg.references == AUTO


def zero_label_detector(settings: Any, base: Any, options: dict[str, Any], source_id: str = "") -> Any:
    """The zero-label family's detector (`model.factory.zero_label_family()`) with an empty window of its own
    (bounded by `[mutual]`), on the daemon's 0-1 scale."""
    mutual = getattr(settings, "mutual", None)
    if scores_own_frames(base):
        raw = getattr(base, "raw", base)
        limits = mutual.limits(str(raw.name)) if mutual is not None else None
        return scaled(_labelled(raw.fork(limits), source_id))
    limits = mutual.limits() if mutual is not None else None
    r = settings.runtime
    key = (str(r.device), str(r.dtype), tuple(sorted((k, str(v)) for k, v in options.items())))
    with _SHARED_LOCK:
        if key not in _SHARED:
            from daemon.config.model_options import runtime_options
            from model import create_detector
            from model.factory import zero_label_family

            _SHARED[key] = create_detector(zero_label_family(), **options, **runtime_options(settings))
        shared = _SHARED[key]
    return scaled(_labelled(shared.fork(limits), source_id))


def _labelled(detector: Any, source_id: str) -> Any:
    detector.label = f"source {source_id}" if source_id else ""
    return detector


def propose_references(sessions: Any, source_id: str, count: int = PROPOSED, recent: int = PROPOSAL_POOL,
                       min_judged: int = PROPOSE_AFTER, since: datetime | None = None) -> dict[str, Any]:
    """Known-good candidates for a source that runs mutual scoring: among its `recent` newest judged frames
    (a score: past the window's cold start) that were not alerted and have a stored frame, the lower-scoring
    half, and of those `count` spread evenly over time (frames of different moments of the line: diverse).
    `ready` is False (and `frames` empty) until `min_judged` such frames exist.

    `since` (a drift's start, daemon/zero_label/drift.py): the frames captured since then instead, whatever scored them
    (mutual scoring or, for a source on references, PatchCore) and whatever their verdict: they show the line as it
    is now (held back with no decision on mutual scoring, alerted against the old references on PatchCore); the
    lower-scoring half of them, for an operator to approve; ready once `count` exist."""
    from sqlalchemy import select

    from adapters.db import Inspection

    query = (select(Inspection.id, Inspection.score, Inspection.captured_at, Inspection.frame_name)
             .where(Inspection.source == source_id,
                    Inspection.frame_path.is_not(None), Inspection.score.is_not(None), Inspection.score > 0)
             .order_by(Inspection.id.desc()).limit(recent))
    if since is None:
        query = query.where(Inspection.model_version.like(f"{version_prefix()}%"), Inspection.is_anomalous.is_(False))
    else:
        query = query.where(Inspection.captured_at >= since)
        min_judged = count
    with sessions() as session:
        rows = session.execute(query).all()
    if len(rows) < max(min_judged, count):
        return {"source": source_id, "ready": False, "frames": [],
                "message": f"{len(rows)} judged normal-looking frames so far; a proposal needs {max(min_judged, count)}"}
    lowest = sorted(rows, key=lambda r: r.score)[:max(count, len(rows) // 2)]
    by_time = sorted(lowest, key=lambda r: r.id)
    step = len(by_time) / count
    chosen = [by_time[int(k * step)] for k in range(count)]
    return {"source": source_id, "ready": True, "message": f"{count} of {len(rows)} recent normal-looking frames",
            "frames": [{"inspection_id": r.id, "score": float(r.score), "frame_name": r.frame_name,
                        "captured_at": r.captured_at.isoformat() if r.captured_at else None} for r in chosen]}
