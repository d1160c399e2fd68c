"""Drift watch: tell a changed line (new variant, moved camera, new lighting) from a flood of real defects.

Both make many frames score high. They differ in where: a defect, even a large one, leaves most of the part as it
was, so most of the frame's patches still find a close match among the normal frames and only a region scores
high; after a change of the line almost every patch of every frame has no close match. The statistic is therefore
the share of a frame's patches that score above the normal patch level (the `patch_quantile` quantile of the
patch scores of known-normal frames: with 0.95, about 5 % of a normal frame's patches; on the shared samples
defective frames reach 5-14 % (cubes) and 13-36 % (metal_plate), a foreign product ~100 %).

A one-sided CUSUM (Page's test) accumulates the excess of that share over `expected + allowance` and signals a
drift once the sum reaches `limit`: one frame with a whole-frame change does not fire, a sustained run does
(with the defaults, 4-5 frames that are 90 % unmatched). Frames below the allowance pull the sum back to 0, so a
defect flood (shares well below `expected + allowance`) never accumulates and its frames keep raising alerts.
One event per onset: the watch stays in drift until the sum has fallen back to 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PATCH_QUANTILE = 0.95
ALLOWANCE = 0.35  # a frame adds to the sum only when more than 40 % of its patches are unmatched
LIMIT = 2.0


@dataclass(frozen=True)
class DriftEvent:
    frame: int  # the index (frames seen by the watch) at which the drift started
    detected_at: int  # the frame at which it was signalled
    share: float  # mean unmatched share over the frames since the start


class DriftWatch:
    """Page's CUSUM on the share of unmatched patches per frame (see the module docstring)."""

    def __init__(self, *, patch_quantile: float = PATCH_QUANTILE, allowance: float = ALLOWANCE,
                 limit: float = LIMIT) -> None:
        self.patch_quantile = float(patch_quantile)
        self.expected = 1.0 - self.patch_quantile
        self.allowance = float(allowance)
        self.limit = float(limit)
        self.level: float | None = None  # the normal patch level
        self.sum = 0.0
        self.frames = 0
        self.start: int | None = None  # first frame of the current excursion
        self.shares: list[float] = []  # of the current excursion
        self.drifting = False
        self.events: list[DriftEvent] = []

    def calibrate(self, normal_patch_scores: torch.Tensor) -> None:
        """The normal patch level from the patch scores of known-normal frames (any shape)."""
        self.level = float(normal_patch_scores.flatten().float().quantile(self.patch_quantile))

    def unmatched_share(self, patch_scores: torch.Tensor) -> float:
        if self.level is None:
            raise RuntimeError("the drift watch has no normal patch level yet: calibrate it first")
        return float((patch_scores > self.level).float().mean())

    def update(self, patch_scores: torch.Tensor) -> DriftEvent | None:
        """Account one frame's patch scores; the event when this frame makes the drift signal, else None."""
        share = self.unmatched_share(patch_scores)
        index, self.frames = self.frames, self.frames + 1
        step = share - self.expected - self.allowance
        self.sum = max(0.0, self.sum + step)
        if self.sum == 0.0:
            self.start, self.shares, self.drifting = None, [], False
            return None
        if self.start is None:
            self.start = index
        self.shares.append(share)
        if self.drifting or self.sum < self.limit:
            return None
        self.drifting = True
        event = DriftEvent(frame=self.start, detected_at=index, share=sum(self.shares) / len(self.shares))
        self.events.append(event)
        return event
