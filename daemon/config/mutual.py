"""`[mutual]`: the online window of mutual scoring (zero-label sources, `references = "auto"`, and every source
under `[model].name = "mutual"`; daemon/zero_label/start.py; the zero-label family's window, e.g. model/mutual/window.py).

    [mutual]
    window_frames = 32       # recent normal-looking frames each new frame is scored against
    window_max_mb = 64       # their patch embeddings and neighbour distances, at most
    window_max_age_s = 3600  # no frame older than this stays in the window
    propose_after = 50       # judged normal-looking frames before references are proposed
    propose_count = 8        # frames proposed (and approved by auto_accept)
    auto_accept = false      # approve the proposal without an operator (daemon/references/auto_accept.py)

A larger window follows a line's normal variation better and costs linearly more per frame
(bench/bench_mutual.py); the first `min(8, window_frames)` frames of a source fill it and get no decision.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class MutualConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    window_frames: int = Field(32, ge=2, le=4096)
    window_max_mb: int = Field(64, ge=1, le=65536)
    window_max_age_s: float = Field(3600.0, gt=0)
    propose_after: int = Field(50, ge=2, le=100_000)
    propose_count: int = Field(8, ge=2, le=256)
    auto_accept: bool = False

    def limits(self, family: str | None = None) -> Any:
        """The window's bounds as `family`'s `fork` takes them (its `ModelFamily.window_limits`; default family: the
        zero-label one, `model.factory.zero_label_family()`); None when it declares no such hook (its defaults).
        Imports the family on use: the config itself loads no model code."""
        from model.factory import get_family, zero_label_family

        make = get_family(family or zero_label_family()).window_limits
        if make is None:
            return None
        return make(max_frames=self.window_frames, max_bytes=self.window_max_mb << 20, max_age_s=self.window_max_age_s)
