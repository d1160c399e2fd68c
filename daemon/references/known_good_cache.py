"""Calibration views survive restarts: a source's known-good scores (its family's `known_good` hook, for PatchCore
model/patchcore/known_good.py: leave-one-out of the references and their shifted/turned/exposed views, the costly
part of a start) are stored next to its bank as `<source id>.known-good.json`, keyed by a digest of the
detector's version (the backbone, taps, input size and the reference files' names and contents, bank options), the
view parameters
and the source's and [model]'s geometry settings. A restart with unchanged references reads them back instead of
recomputing; anything else in the key changing recomputes them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("anomalyd.references")

FORMAT = "anomalyd-known-good/1"
_NOT_GEOMETRY = {"threshold", "pixel_threshold", "map_threshold", "false_reject_rate", "class_name", "line", "queue_size",
                 "enabled", "settle_s", "poll_interval_s", "retry_s"}


def cache_file(bank_path: Path) -> Path:
    return bank_path.with_name(f"{bank_path.stem}.known-good.json")


def cache_key(settings: Any, source_id: str, detector: Any, parameters: dict[str, Any]) -> str:
    """What the known-good scores depend on, as one digest."""
    cfg = next((c for c in settings.sources if c.id == source_id), None)
    source = {k: v for k, v in (cfg.model_dump(mode="json") if cfg is not None else {}).items()
              if k not in _NOT_GEOMETRY}
    model = {k: v for k, v in settings.model.model_dump(mode="json").items() if k not in _NOT_GEOMETRY}
    payload = json.dumps({"format": FORMAT, "version": str(getattr(detector, "version", "")),
                          "parameters": parameters, "source": source, "model": model}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def load(path: Path, key: str) -> dict[str, Any] | None:
    """The stored fields when `path` holds scores for `key`, else None (absent, stale or unreadable)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("key") != key or data.get("format") != FORMAT:
        return None
    return data


def save(path: Path, key: str, fields: dict[str, Any]) -> None:
    """Write atomically; a failure only costs the next start the recomputation."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps({"format": FORMAT, "key": key, **fields}), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("cannot store the known-good scores in %s: %s", path, exc)
