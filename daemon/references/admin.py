"""Operator management of a source's reference files (the API's and the CLI's `references list|add|remove`):
frames of inspections copied in under server-chosen names, refused when their size does not go with the references
(the daemon would refuse the whole bank), and removal by name.
"""

from __future__ import annotations

import logging
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from daemon.references.files import (
    REFERENCE_PREFIX,
    ReferenceSetupError,
    image_shape,
    images_in,
    own_reference_dir,
    reference_files,
    shape_mismatch,
    sizes_may_differ,
)
from model.preprocess import IMAGE_SUFFIXES

log = logging.getLogger("anomalyd.references")


def list_references(settings: Any, source_id: str, sessions: Any = None, store: Any = None) -> list[dict[str, Any]]:
    """The reference files of a source: name, folder, size, whether operators may remove it."""
    try:
        files, _ = reference_files(settings, source_id, sessions, store, max_references=10_000)
    except ReferenceSetupError:
        files = images_in(own_reference_dir(settings, source_id), required=False, what="references")
    own = own_reference_dir(settings, source_id).resolve()
    out = []
    for path in files:
        try:
            size = path.stat().st_size
        except OSError:
            continue
        out.append({"name": path.name, "folder": str(path.parent), "bytes": size,
                    "removable": path.resolve().parent == own})
    return out


def add_references(settings: Any, sessions: Any, store: Any, source_id: str,
                   inspection_ids: Sequence[int], by: str = "api") -> tuple[list[dict[str, Any]], list[str]]:
    """Copy the frames of inspections of `source_id` into its reference folder under server-chosen names.

    Returns (added files, warnings); a frame that was itself found or labelled anomalous is added with a warning.
    The change is recorded with `by` (daemon/references/history.py).
    Raises LookupError for an unknown inspection, ValueError for one of another source or without a frame.
    """
    from adapters.db import Inspection
    from adapters.db.repository import latest_label

    target = own_reference_dir(settings, source_id)
    added, warnings = [], []
    with sessions() as session:
        rows = []
        for inspection_id in inspection_ids:
            row = session.get(Inspection, int(inspection_id))
            if row is None:
                raise LookupError(f"no inspection {inspection_id}")
            if row.source != source_id:
                raise ValueError(f"inspection {inspection_id} is from source {row.source!r}, not {source_id!r}")
            if not row.frame_path:
                raise ValueError(f"inspection {inspection_id} has no stored frame ([storage].save_frames is off?)")
            label = latest_label(session, row.id)
            rows.append((row.id, row.frame_path, row.is_anomalous, row.score, row.threshold,
                         label.label if label is not None else None))
    _check_added_shapes(settings, sessions, store, source_id, [(row[0], store.path(row[1])) for row in rows])
    target.mkdir(parents=True, exist_ok=True)
    for inspection_id, frame_path, is_anomalous, score, threshold, label in rows:
        source_file = store.path(frame_path)
        if not source_file.is_file():
            raise ValueError(f"inspection {inspection_id}: its frame file {frame_path} is gone (retention?)")
        if label == "anomalous" or (label is None and is_anomalous):
            why = "labelled anomalous" if label == "anomalous" else f"scored {score:.3f} >= threshold {threshold:.3f}"
            warnings.append(f"inspection {inspection_id} was {why}: a defective reference hides that defect")
        name = f"{REFERENCE_PREFIX}{inspection_id}-{uuid.uuid4().hex[:8]}{source_file.suffix.lower() or '.jpg'}"
        tmp = target / f".{name}.tmp"
        shutil.copyfile(source_file, tmp)
        tmp.replace(target / name)
        added.append({"name": name, "inspection_id": inspection_id, "folder": str(target)})
    for warning in warnings:
        log.warning("source %s: %s", source_id, warning)
    from daemon.references.history import record

    record(settings, source_id, "added", [item["name"] for item in added], by,
           [item["inspection_id"] for item in added])
    return added, warnings


def _check_added_shapes(settings: Any, sessions: Any, store: Any, source_id: str,
                        frames: Sequence[tuple[int, Path]]) -> None:
    """ValueError (nothing added) when a frame's size or channels do not go with the source's references (or with
    the first added frame when it has none): the daemon would refuse the whole bank."""
    try:
        existing, _ = reference_files(settings, source_id, sessions, store)
    except ReferenceSetupError:
        existing = []
    like = next((image_shape(f, source_id) for f in existing if f.suffix != ".safetensors"), None)
    for inspection_id, path in frames:
        if not path.is_file():
            continue  # named below, with the inspection
        try:
            shape = image_shape(path, source_id)
        except ReferenceSetupError as exc:
            raise ValueError(f"inspection {inspection_id}: {exc}") from None
        if like is None:
            like = shape
        elif (why := shape_mismatch(shape, like, sizes_may_differ(settings, source_id))) is not None:
            raise ValueError(f"inspection {inspection_id}: its frame is {shape[1]}x{shape[0]} with {shape[2]} "
                             f"channel(s), the references of source {source_id} {like[1]}x{like[0]} with "
                             f"{like[2]} ({why}); nothing added")


def remove_reference(settings: Any, source_id: str, name: str, by: str = "api") -> Path:
    """Delete one reference file of the source's own folder (by its name, never a path); recorded with `by`."""
    if not name or "/" in name or "\\" in name or name.startswith(".") or Path(name).suffix.lower() \
            not in IMAGE_SUFFIXES:
        raise ValueError(f"{name!r} is not a reference file name")
    path = own_reference_dir(settings, source_id) / name
    if not path.is_file():
        raise LookupError(f"source {source_id} has no reference {name!r}")
    path.unlink()
    from daemon.references.history import record

    record(settings, source_id, "removed", [name], by)
    return path
