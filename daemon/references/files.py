"""Which files are a source's normal references, and whether they go together.

A source's references are the images of its own folder (`[[sources]].references`, else the managed folder
`<[storage].dir>/references/<source id>` where the API/CLI put the frames operators pick), plus the
`[model].references` folder when the source names none, plus, with `references_from = "labels"`, the newest
frames of that source labelled normal (capped at `max_references`, newest first). A saved bank
(`.safetensors`) stands for its images. `check_images` refuses references of sizes more than SIZE_TOLERANCE
apart per side (any sizes are fine under resize "fit" or "tile" without ROI or ignore polygons: `sizes_may_differ`)
or of mixed channel counts; every error names the source and the value (`ReferenceSetupError`). A source's
`source_signature` also counts its geometry override file, so a geometry change rebuilds its bank.
The reference manager (daemon/references/manager.py) and the operators' file management (daemon/references/admin.py) read
the files through here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from daemon.references.thresholds import labelled_frames
from daemon.zero_label.start import AUTO
from model.preprocess import IMAGE_SUFFIXES

log = logging.getLogger("anomalyd.references")

MAX_REFERENCES = 16
REFERENCE_PREFIX = "ref-"


class ReferenceSetupError(ValueError):
    """References that cannot be used; the message names the source and the value."""


def configured_source(settings: Any, source_id: str) -> Any | None:
    for cfg in settings.sources:
        if cfg.id == source_id:
            return cfg
    return None


def own_reference_dir(settings: Any, source_id: str) -> Path:
    """Where a source's added references go: its `references` folder, else the managed folder."""
    cfg = configured_source(settings, source_id)
    if cfg is not None and cfg.references and cfg.references != AUTO:
        return settings.resolve(cfg.references)
    return settings.resolve(settings.storage.dir) / "references" / source_id


def bank_path(settings: Any, source_id: str) -> Path:
    return settings.resolve(settings.storage.dir) / "references" / "banks" / f"{source_id}.safetensors"


def images_in(folder: Path, *, required: bool, what: str) -> list[Path]:
    if folder.suffix == ".safetensors":  # a saved bank
        if not folder.is_file():
            raise ReferenceSetupError(f"{what} {folder}: no such reference bank file")
        return [folder]
    if not folder.exists():
        if required:
            raise ReferenceSetupError(f"{what} {folder}: no such folder")
        return []
    if not folder.is_dir():
        raise ReferenceSetupError(f"{what} {folder}: not a folder")
    try:
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    except OSError as exc:
        raise ReferenceSetupError(f"{what} {folder}: cannot list it ({exc.strerror or exc})") from exc
    if required and not files:
        raise ReferenceSetupError(f"{what} {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


_CAPPED_LOGGED: set[tuple[str, int]] = set()


def reference_files(settings: Any, source_id: str, sessions: Any = None, store: Any = None,
                    max_references: int = MAX_REFERENCES) -> tuple[list[Path], bool]:
    """(files, configured): the source's reference files, and whether references were asked for at all."""
    cfg = configured_source(settings, source_id)
    own = cfg.references if cfg is not None and cfg.references != AUTO else None
    files: list[Path] = []
    if own:
        files += images_in(settings.resolve(own), required=True, what=f"source {source_id}: references")
    else:
        files += images_in(own_reference_dir(settings, source_id), required=False, what="managed references")
        if settings.model.references:
            files += images_in(settings.resolve(settings.model.references), required=True,
                                what=f"source {source_id}: [model].references")
    from_labels = cfg is not None and cfg.references_from == "labels"
    if from_labels and len(files) < max_references:
        files += labelled_frames(sessions, store, source_id, "normal", max_references - len(files))
    configured = bool(own or settings.model.references or from_labels)
    if len(files) > max_references and not any(f.suffix == ".safetensors" for f in files):
        # The reference poll re-reads the folders every few seconds: say it once per source and count.
        level = logging.DEBUG if (source_id, len(files)) in _CAPPED_LOGGED else logging.WARNING
        _CAPPED_LOGGED.add((source_id, len(files)))
        log.log(level, "source %s: %d reference images, using the %d newest", source_id, len(files), max_references)
        files = sorted(files, key=lambda p: p.stat().st_mtime, reverse=True)[:max_references]
    return files, configured


def source_signature(settings: Any, source_id: str, files: Sequence[Path]) -> tuple[tuple[str, int, int], ...]:
    """`signature` of the files plus the source's geometry override file (daemon/references/geometry_overrides.py): setting
    or resetting a geometry rebuilds the bank as a change of reference files does."""
    from daemon.references.geometry_overrides import override_path

    return signature([*files, override_path(settings, source_id)])


def signature(files: Sequence[Path]) -> tuple[tuple[str, int, int], ...]:
    """What changes when a reference file is added, removed or rewritten."""
    out = []
    for path in files:
        try:
            stat = path.stat()
        except OSError:
            continue
        out.append((str(path), stat.st_size, stat.st_mtime_ns))
    return tuple(sorted(out))


SIZE_TOLERANCE = 0.10  # frames are resized to the model's input anyway: a few pixels apart is one camera setting


def image_shape(path: Path, source_id: str) -> tuple[int, int, int]:
    """(height, width, channels) of a reference file; ReferenceSetupError when it is not a readable image."""
    import cv2

    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None or image.size == 0:
        raise ReferenceSetupError(f"source {source_id}: reference {path} is not a readable image")
    return image.shape[0], image.shape[1], 1 if image.ndim == 2 else image.shape[2]


def shape_mismatch(shape: tuple[int, int, int], like: tuple[int, int, int], any_size: bool = False) -> str | None:
    """Why a reference of `shape` does not go with references of `like` (None when it does): the same channel
    count, and each side within SIZE_TOLERANCE of theirs unless `any_size` (`sizes_may_differ`)."""
    if shape[2] != like[2]:
        return f"{shape[2]} channel(s) instead of {like[2]}"
    if any_size:
        return None
    for side, (a, b) in (("height", (shape[0], like[0])), ("width", (shape[1], like[1]))):
        if abs(a - b) > SIZE_TOLERANCE * b:
            return f"its {side} {a} px is more than {100 * SIZE_TOLERANCE:g} % from {b} px"
    return None


def sizes_may_differ(settings: Any, source_id: str) -> bool:
    """Whether a source's references may be of any size: its geometry feeds each frame at its own shape ("fit",
    "tile") and points at no frame pixels (no ROI, no ignore polygon, which would land elsewhere on a frame of
    another size). "squash" stretches each size differently, so its references stay within SIZE_TOLERANCE."""
    from daemon.references.geometry_overrides import effective_geometry
    from model.geometry import GeometryError

    try:
        geometry = effective_geometry(settings, source_id)
    except GeometryError:
        return False  # the build says why
    return geometry.resize in ("fit", "tile", "auto") and geometry.roi is None and not geometry.ignore


def check_images(files: Sequence[Path], source_id: str, any_size: bool = False) -> tuple[int, int, int] | None:
    """All references readable, of one channel count and (unless `any_size`) of sizes within SIZE_TOLERANCE of
    the first one's per side; (height, width, channels) of the first."""
    shape: tuple[int, int, int] | None = None
    first: Path | None = None
    for path in files:
        if path.suffix == ".safetensors":
            continue
        this = image_shape(path, source_id)
        if shape is None:
            shape, first = this, path
        elif (why := shape_mismatch(this, shape, any_size)) is not None:
            raise ReferenceSetupError(
                f"source {source_id}: reference {path.name} is {this[1]}x{this[0]} with {this[2]} channel(s), "
                f"but {first.name if first else '?'} is {shape[1]}x{shape[0]} with {shape[2]} ({why}): references "
                "of one source must come from one camera setting (resize = \"fit\" or \"tile\" without roi and "
                "ignore_polygons takes references of any size)")
    return shape
