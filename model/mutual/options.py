"""Mutual scoring's options: PatchCore's backbone and taps, the offline comparison set and the window of each
source's recent frames; torch-free (model/options.py). The daemon sets the window from `[mutual]`."""

from __future__ import annotations

from dataclasses import dataclass

from model.options import option
from model.patchcore.options import BackboneOptions

# Offline: each image is compared with at most this many others of its set (spread evenly over it); MuSc's
# aggregation needs a few dozen, and the cost is linear in it (cubes: 188 images x 32 others ≈ 60 s, 1 thread).
MAX_OTHERS = 32


@dataclass(frozen=True)
class MutualOptions(BackboneOptions):
    max_others: int | None = option(MAX_OTHERS, "offline: the most other images each image is compared with",
                                    minimum=1)
    window_frames: int | None = option(None, "the most frames a source's window holds (default: the window's)",
                                       minimum=1)
    window_max_bytes: int | None = option(None, "the most bytes of features a source's window holds", minimum=1)
    window_max_age_s: float | None = option(None, "the oldest frame a source's window keeps, in seconds", minimum=0)
