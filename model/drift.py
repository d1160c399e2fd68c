"""Drift watch: tell a changed line (new variant, moved camera, new lighting) from a flood of real defects.

Plain statistics on per-patch scores, no family's maths: mutual scoring feeds it its window's patch scores
(model/mutual/detector.py) and the daemon's reference drift watch a reference detector's 0-1 maps
(daemon/detectors/drift_watch.py).

Both make many frames score high. They differ in where and how often: a defect, even a large one, leaves most of
the part as it was, so most of the frame's patches still find a close match among the normal frames and only a
region scores high, and in a defect flood normal parts keep coming between the broken ones; after a change of the
line (another variant, a moved camera, other light) a large part of *every* frame has no close match. The statistic
is the share of a frame's patches that score above the normal patch level (the `patch_quantile` quantile of the
patch scores of known-normal frames: with 0.95, about 5 % of a normal frame's patches). Measured on the shared
samples against a window of good frames (docs/models.md, bench/drift_cases.py): cubes good 0-10 %, cubes
defective 10-17 %, metal_plate defective 9-45 %, cubes of another colour 20-52 %, 25 % brighter cubes 21-27 %,
another product ~95 %.

A one-sided CUSUM (Page's test) accumulates the excess of that share (capped at `cap`) over `expected +
allowance` and signals a drift once the sum reaches `limit`. A frame whose share is under `expected + allowance`,
or that the detector did not alert (mutual scoring tells the watch), looks normal and sets the sum back to 0
(`reset`): in a flood of half broken parts the good ones keep resetting it, so the flood is alerted, not taken for
a drift, while a change of the line leaves no normal-looking frame. The cap
keeps a single odd frame (or two) from signalling on its own: with the defaults a drift needs at least 3 frames
(another product: 3; another cube colour: 4-10; 25 % more light: 10), and a run of about 8 broken metal plates in a
row. One event per onset. Once in drift, the watch ends it after `end_after` normal-looking frames in a row: 1 by
default (mutual scoring, whose drift holds alerts back: its end must come as soon as parts match again, or a flood
of broken parts taken for a change stays hidden longer: measured on every-plate-broken metal plates, 14 alerts held
back with 3 against 4 with 1); the reference drift watch, which holds no alert back, takes 3
(daemon/detectors/drift_watch.py), so a stream alternating products against one product's references is one drift
rather than one every 3-4 frames (measured on the pipeline bench's mixed stream).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

PATCH_QUANTILE = 0.95
ALLOWANCE = 0.10  # a frame adds to the sum only when more than 15 % of its patches are unmatched
LIMIT = 1.0
CAP = 0.5  # a frame adds at most CAP - expected - allowance (0.35): a drift takes at least 3 frames
END_AFTER = 1  # normal-looking frames in a row that end a drift (more: hysteresis, see the module docstring)


@dataclass(frozen=True)
class DriftEvent:
    frame: int  # the index (frames seen by the watch) at which the drift started
    detected_at: int  # the frame at which it was signalled
    share: float  # mean unmatched share over the frames since the start


class DriftWatch:
    """Page's CUSUM on the share of unmatched patches per frame (see the module docstring)."""

    def __init__(self, *, patch_quantile: float = PATCH_QUANTILE, allowance: float = ALLOWANCE,
                 limit: float = LIMIT, cap: float = CAP, reset: bool = True, expected: float | None = None,
                 end_after: int = END_AFTER) -> None:
        if int(end_after) < 1:
            raise ValueError(f"end_after {end_after!r}: a drift ends after at least 1 normal-looking frame")
        self.patch_quantile = float(patch_quantile)
        # the share of a normal frame above the level (a level set from elsewhere, `expected`: say what it is)
        self.expected = 1.0 - self.patch_quantile if expected is None else float(expected)
        self.allowance = float(allowance)
        self.limit = float(limit)
        self.cap = float(cap)
        self.reset = bool(reset)  # a normal-looking frame ends the excursion
        self.end_after = int(end_after)
        self.calm = 0  # normal-looking frames in a row while in drift
        self.level: float | None = None  # the normal patch level
        self.sum = 0.0
        self.frames = 0
        self.start: int | None = None  # first frame of the current excursion
        self.shares: list[float] = []  # of the current excursion
        self.drifting = False
        self.events: list[DriftEvent] = []
        self.last_share: float | None = None  # of the last frame

    def calibrate(self, normal_patch_scores: torch.Tensor) -> None:
        """The normal patch level from the patch scores of known-normal frames (any shape)."""
        self.level = float(normal_patch_scores.flatten().float().quantile(self.patch_quantile))

    def unmatched_share(self, patch_scores: torch.Tensor) -> float:
        if self.level is None:
            raise RuntimeError("the drift watch has no normal patch level yet: calibrate it first")
        return float((patch_scores > self.level).float().mean())

    def update(self, patch_scores: torch.Tensor, alerted: bool | None = None) -> DriftEvent | None:
        """Account one frame's patch scores; the event when this frame makes the drift signal, else None.
        `alerted` False (the detector judged the frame normal): it looks normal whatever its share (a drift
        replaces a flood of alerts; frames that raise none are not part of one)."""
        share = self.last_share = self.unmatched_share(patch_scores)
        index, self.frames = self.frames, self.frames + 1
        step = min(share, self.cap) - self.expected - self.allowance
        if alerted is False:
            step = min(step, -self.allowance)
        self.sum = 0.0 if self.reset and step < 0 else max(0.0, self.sum + step)
        if self.sum == 0.0:
            if self.drifting:
                self.calm += 1
                if self.calm < self.end_after:
                    return None  # still in drift until `end_after` normal-looking frames in a row
            self.start, self.shares, self.drifting, self.calm = None, [], False, 0
            return None
        self.calm = 0
        if self.start is None:
            self.start = index
        self.shares.append(share)
        if self.drifting or self.sum < self.limit:
            return None
        self.drifting = True
        event = DriftEvent(frame=self.start, detected_at=index, share=sum(self.shares) / len(self.shares))
        self.events.append(event)
        return event

    def note(self, patch_scores: torch.Tensor, alerted: bool | None = None) -> dict[str, Any]:
        """`update`, told as the per-frame note the daemon reads (`Prediction.notes`, daemon/zero_label/drift.py): the frame's
        index, its unmatched share, whether the watch is in drift, the excursion's first frame, a `drift_event` when
        this frame signals one, `drift_cleared` when this frame ends one."""
        was_drifting = self.drifting
        event = self.update(patch_scores, alerted)
        note: dict[str, Any] = {"drift_index": self.frames - 1, "drifting": self.drifting,
                                "excursion_start": self.start, "unmatched_share": round(float(self.last_share), 4)}
        if was_drifting and not self.drifting:
            note["drift_cleared"] = True
        if event is not None:
            note["drift_event"] = {"frame": event.frame, "detected_at": event.detected_at, "share": event.share}
        return note
