"""The online form of mutual scoring: a bounded rolling window of recent frames' patch embeddings.

Each new frame is scored against the window's frames (`scoring.nearest_per_image`, then MuSc's interval
average over them) and enters the window only when it is not judged anomalous, so a run of bad parts does not
become the "normal" the next frames are compared with. The window is bounded three ways: at most `max_frames`
frames, at most `max_bytes` of embeddings (float32), and no frame older than `max_age_s`; the oldest frame leaves
first. The per-frame cost is linear in the window's size (bench/bench_mutual.py measures it).

The window also carries its own score scale: the line's normal level is the median raw image score of the frames
it admitted, and a frame is anomalous when its raw score reaches `admit_ratio` times that level. `distance_scale`
turns that into the daemon's 0-1 convention (daemon/scale.py, 1 - exp(-raw / d0)): the rule's boundary maps to 0.5.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from model.mutual.scoring import FRACTION, nearest_per_image, smallest_mean

# A frame is kept out of the window when its raw image score reaches this multiple of the window's median score
# (measured on the shared samples: good parts of a category sit within ~1.2x of their median, defective ones from
# ~1.3x up; docs/models.md).
ADMIT_RATIO = 1.3
MIN_FRAMES = 3  # scored frames the window needs before it judges (and keeps out) any frame


@dataclass(frozen=True)
class WindowLimits:
    max_frames: int = 32
    max_bytes: int = 64 << 20
    max_age_s: float = 3600.0

    def __post_init__(self) -> None:
        if self.max_frames < 1 or self.max_bytes < 1 or self.max_age_s <= 0:
            raise ValueError(f"window limits must be positive: {self}")


@dataclass
class WindowFrame:
    patches: torch.Tensor  # (P, D)
    score: float  # raw image score it had when it was admitted (nan: admitted unscored, during the warm-up)
    added_at: float


@dataclass(frozen=True)
class WindowVerdict:
    patch_scores: torch.Tensor  # (P,) raw mutual scores; zeros when the window was empty
    image_score: float  # raw
    admitted: bool
    window_frames: int  # frames it was scored against


class MutualWindow:
    """A bounded window of normal-looking frames (see the module docstring). Not thread-safe: one per source."""

    def __init__(self, limits: WindowLimits = WindowLimits(), *, fraction: float = FRACTION,
                 admit_ratio: float = ADMIT_RATIO, min_frames: int = MIN_FRAMES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.fraction = float(fraction)
        self.admit_ratio = float(admit_ratio)
        self.min_frames = int(min_frames)
        self.clock = clock
        self.frames: deque[WindowFrame] = deque()
        self.excluded = 0  # frames kept out since the start

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def nbytes(self) -> int:
        return sum(f.patches.numel() * f.patches.element_size() for f in self.frames)

    def normal_level(self) -> float | None:
        """Median raw image score of the admitted, scored frames (None before there are any)."""
        scores = sorted(f.score for f in self.frames if not math.isnan(f.score))
        return scores[len(scores) // 2] if scores else None

    @property
    def ready(self) -> bool:
        """Whether enough scored frames give a normal level to judge new frames by."""
        return sum(not math.isnan(f.score) for f in self.frames) >= min(self.min_frames, self.limits.max_frames)

    @property
    def distance_scale(self) -> float:
        """d0 of 1 - exp(-raw / d0) that puts the exclusion point (admit_ratio x normal level) at 0.5; infinite
        (every score 0: not judged) while the window is not ready."""
        level = self.normal_level()
        return self.admit_ratio * level / math.log(2.0) if self.ready and level else math.inf

    def evict(self, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        while self.frames and now - self.frames[0].added_at > self.limits.max_age_s:
            self.frames.popleft()
        while len(self.frames) > self.limits.max_frames:
            self.frames.popleft()
        while len(self.frames) > 1 and self.nbytes > self.limits.max_bytes:
            self.frames.popleft()

    @torch.no_grad()
    def patch_scores(self, patches: torch.Tensor) -> torch.Tensor:
        """(P, D) → (P,) raw mutual scores against the window's frames (zeros with an empty window)."""
        if not self.frames:
            return patches.new_zeros(patches.shape[0])
        distances = nearest_per_image(patches, [f.patches for f in self.frames])
        return smallest_mean(distances, self.fraction)

    def judge(self, image_score: float) -> bool:
        """Whether a frame of this raw score is anomalous for the window (False while it is not ready)."""
        level = self.normal_level()
        return self.ready and level is not None and image_score >= self.admit_ratio * level

    def offer(self, patches: torch.Tensor, image_score: float, *, scored: bool = True) -> bool:
        """Admit the frame unless it is judged anomalous; returns whether it was admitted."""
        now = self.clock()
        self.evict(now)
        if scored and self.judge(image_score):
            self.excluded += 1
            return False
        frame_bytes = patches.numel() * patches.element_size()
        if frame_bytes > self.limits.max_bytes:
            raise ValueError(f"one frame's embeddings take {frame_bytes} bytes, over the window's limit "
                             f"{self.limits.max_bytes}")
        self.frames.append(WindowFrame(patches.detach().float().contiguous(),
                                       float(image_score) if scored else math.nan, now))
        self.evict(now)
        return True
