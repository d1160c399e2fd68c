"""Zero-label start: a source with no references is inspected by mutual scoring on its own recent frames.

A source configured with `references = "auto"` (or any source when `[model].name = "mutual"`) gets, while its
managed reference folder (`<[storage].dir>/references/<source id>`) is empty, its own `mutual` detector
(model/mutual: PatchCore's Lite0 features, a bounded rolling window of that source's normal-looking frames, each
new frame scored against it). The model weights are loaded once and shared; every source has its own window.
When references arrive in the managed folder (an operator adds frames through the API or `anomalyd references
add`), the reference manager builds the configured model on them (PatchCore) and swaps it in, like any change of
references; the new model version on the inspections records the switch.

Scores are on the daemon's 0-1 scale (daemon/scale.py, rule "mutual"): the window's own scale puts the point where
it keeps a frame out (1.5x the median leave-one-out score of the frames it holds) at 0.5, the default `threshold`.
"""

from __future__ import annotations

import threading
from typing import Any

from daemon.scale import scaled

AUTO = "auto"
_SHARED: dict[tuple, Any] = {}  # (device, dtype, options) → the mutual model whose weights every source shares
_SHARED_LOCK = threading.Lock()


def zero_label(settings: Any, base: Any, source_id: str, files: list) -> bool:
    """Whether `source_id` is inspected by mutual scoring now."""
    if getattr(base, "forks_per_source", False):  # [model].name = "mutual": every source, references or not
        return True
    cfg = next((s for s in settings.sources if s.id == source_id), None)
    return not files and cfg is not None and cfg.references == AUTO


def mutual_detector(settings: Any, base: Any, options: dict[str, Any]) -> Any:
    """A mutual detector with an empty window of its own, on the daemon's 0-1 scale."""
    if getattr(base, "forks_per_source", False):
        return scaled(getattr(base, "raw", base).fork())
    r = settings.runtime
    key = (str(r.device), str(r.dtype), tuple(sorted((k, str(v)) for k, v in options.items())))
    with _SHARED_LOCK:
        if key not in _SHARED:
            from model import create_detector

            _SHARED[key] = create_detector("mutual", device=r.device, dtype=r.dtype, **options)
        shared = _SHARED[key]
    return scaled(shared.fork())
