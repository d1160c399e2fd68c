"""The daemon on an exported engine (`[runtime].engine = "onnxruntime" | "openvino"`).

`with_engine(settings, detector)` turns the PyTorch detector of a model version into the engine-backed one:
`[runtime].export_dir` when set (checked against the version and image size), else an export under
`<[storage].dir>/exports/<version>-<format>`, reused while it still fits (same version, anomalyd version, file
digests, the configured classes) and otherwise made again through the parity gate. A hot swap builds the new
version's PyTorch detector and calls this before swapping, so a version whose export fails the gate is never
swapped in (the watcher logs the error and keeps the running one).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

log = logging.getLogger("anomalyd.engines")

FORMAT_FOR_ENGINE = {"onnxruntime": "onnx", "openvino": "openvino"}


def exports_dir(settings: Any) -> Path:
    return settings.resolve(settings.storage.dir) / "exports"


def configured_classes(settings: Any) -> list[str]:
    """The class names the exported per-class inputs must cover: [model].class_name and every source's."""
    names = {settings.model.class_name or "object"}
    names.update(s.class_name for s in settings.sources if s.class_name)
    return sorted(names)


def with_engine(settings: Any, detector: Any) -> Any:
    """The engine-backed detector for `detector` (returned as is for the torch engine or when already one)."""
    from adapters.export import ExportedDetector, ExportError, export_detector, load_export, read_manifest

    engine = settings.runtime.engine
    if engine == "torch" or isinstance(detector, ExportedDetector):
        return detector
    version, size = str(detector.version), int(detector.image_size)
    if settings.runtime.export_dir:
        return load_export(settings.resolve(settings.runtime.export_dir), engine, image_size=size, version=version)
    classes = configured_classes(settings)
    folder = exports_dir(settings) / f"{re.sub(r'[^A-Za-z0-9_.+-]', '_', version)}-{FORMAT_FOR_ENGINE[engine]}"
    if (folder / "manifest.json").is_file():
        try:
            loaded = load_export(folder, engine, image_size=size, version=version)
            held = set(read_manifest(folder).get("classes") or [])
            if loaded.aux_name is None or loaded.class_row is not None or set(classes) <= held:  # none missing
                log.info("engine %s: using the export in %s", engine, folder)
                return loaded
            log.info("engine %s: export %s lacks classes %s; exporting again", engine, folder,
                     sorted(set(classes) - held))
        except ExportError as exc:
            log.info("engine %s: exporting again (%s)", engine, exc)
    folder.parent.mkdir(parents=True, exist_ok=True)
    log.info("engine %s: exporting %s %s into %s (parity-checked)", engine, detector.name, version, folder)
    export_detector(detector, folder, export_format=FORMAT_FOR_ENGINE[engine], class_names=classes, engine=engine)
    return load_export(folder, engine, image_size=size, version=version)
