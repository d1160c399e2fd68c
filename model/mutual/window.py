"""The online form of mutual scoring: a bounded rolling window of recent frames' patch embeddings.

Each new frame is scored against the window's frames (`scoring.nearest_per_image`, then MuSc's interval
average over them) and enters the window only when it is not judged anomalous, so a run of bad parts does not
become the "normal" the next frames are compared with. The window is bounded three ways: at most `max_frames`
frames, at most `max_bytes` of embeddings and neighbour distances (float32), and no frame older than `max_age_s`;
the oldest frame leaves first. The per-frame cost is linear in the window's size (bench/bench_mutual.py).

The window keeps the nearest-patch distances between its own frames (both ways, (n, n, P)), so it knows each
frame's leave-one-out score against the others at every step, at the price of a second search per admitted frame:

- the line's normal level is the median of those leave-one-out scores; a frame is alerted when its score
  reaches `alert_ratio` times that level and kept out of the window from `admit_ratio` (lower) times on (scores of
  frames met while the window was small are not used, so the cold start does not inflate the level);
- when the cold start ends (`min_frames` frames in), the frames admitted unjudged that look anomalous against the
  others are dropped again (once: pruning at every step would shrink the window to its tightest cluster).

`distance_scale` turns the rule into the daemon's 0-1 convention (daemon/detectors/scale.py, 1 - exp(-raw / d0)): the
alert point maps to 0.5. Until `min_frames` frames are in, nothing is judged (scale infinite: scores 0).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from model.mutual.scoring import WINDOW_FRACTION, nearest_per_image, smallest_mean
from model.patchcore.torch_model import nearest_neighbor

# A frame is alerted (0.5 on the daemon's scale) when its raw image score reaches ALERT_RATIO times the window's
# median leave-one-out score, and kept out of the window from ADMIT_RATIO times on: stricter, so that defects
# that stay under the alert point do not enter the window and teach it their look (cubes on the shared samples,
# colour variants mixed: good frames 0.7-1.5x, defective ones 1.2-2.3x; docs/models.md).
ALERT_RATIO = 1.5
ADMIT_RATIO = 1.35
MIN_FRAMES = 8  # frames the window needs before it judges (and keeps out) any frame

ImageScore = Callable[[torch.Tensor], torch.Tensor]  # (B, P) patch scores → (B,) image scores


def max_score(patch_scores: torch.Tensor) -> torch.Tensor:
    return patch_scores.amax(dim=1)


@dataclass(frozen=True)
class WindowLimits:
    max_frames: int = 32
    max_bytes: int = 64 << 20
    max_age_s: float = 3600.0

    def __post_init__(self) -> None:
        if self.max_frames < 1 or self.max_bytes < 1 or self.max_age_s <= 0:
            raise ValueError(f"window limits must be positive: {self}")


class MutualWindow:
    """A bounded window of normal-looking frames (see the module docstring). Not thread-safe: one per source."""

    def __init__(self, limits: WindowLimits = WindowLimits(), *, fraction: float = WINDOW_FRACTION,
                 admit_ratio: float = ADMIT_RATIO, alert_ratio: float = ALERT_RATIO, min_frames: int = MIN_FRAMES,
                 image_score: ImageScore = max_score, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.fraction = float(fraction)
        self.admit_ratio = float(admit_ratio)
        self.alert_ratio = float(alert_ratio)
        self.min_frames = max(2, int(min_frames))
        self.image_score = image_score
        self.clock = clock
        self.frames: list[torch.Tensor] = []  # (P, D) each, oldest first
        self.added_at: list[float] = []
        self.distances = torch.empty(0, 0, 0)  # (n, n, P): patch p of frame i → nearest patch of frame j
        self.own_scores = torch.empty(0)  # (n,) leave-one-out image scores
        self.own_patch_scores = torch.empty(0, 0)  # (n, P) leave-one-out patch scores
        self.excluded = 0  # frames kept out (or dropped again) since the start
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None  # (patches, their (P, n) distances)
        self._pruned = False  # the cold start's members were checked (once)

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def nbytes(self) -> int:
        return sum(f.numel() * f.element_size() for f in self.frames) + self.distances.numel() * 4

    @property
    def ready(self) -> bool:
        return len(self.frames) >= min(self.min_frames, self.limits.max_frames)

    def normal_level(self) -> float | None:
        """Median leave-one-out image score of the window's frames (None until the window is ready)."""
        if not self.ready or self.own_scores.numel() == 0:
            return None
        return float(self.own_scores.median())

    @property
    def distance_scale(self) -> float:
        """d0 of 1 - exp(-raw / d0) that puts the alert point (alert_ratio x normal level) at 0.5; infinite
        (every score 0: not judged) while the window is not ready."""
        level = self.normal_level()
        return self.alert_ratio * level / math.log(2.0) if level else math.inf

    # -- scoring ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def patch_scores(self, patches: torch.Tensor) -> torch.Tensor:
        """(P, D) → (P,) raw mutual scores against the window's frames (zeros with an empty window)."""
        if not self.frames:
            self._last = (patches, patches.new_empty(patches.shape[0], 0))
            return patches.new_zeros(patches.shape[0])
        distances = nearest_per_image(patches, self.frames)
        self._last = (patches, distances)
        return smallest_mean(distances, self.fraction)

    def judge(self, image_score: float) -> bool:
        """Whether a frame of this raw score is anomalous for the window (False while it is not ready)."""
        level = self.normal_level()
        return level is not None and image_score >= self.admit_ratio * level

    # -- membership ------------------------------------------------------------------------------------------------
    def evict(self, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        while self.frames and now - self.added_at[0] > self.limits.max_age_s:
            self._drop(0)
        while len(self.frames) > self.limits.max_frames:
            self._drop(0)
        while len(self.frames) > 1 and self.nbytes > self.limits.max_bytes:
            self._drop(0)

    def _drop(self, index: int) -> None:
        del self.frames[index], self.added_at[index]
        keep = [i for i in range(self.distances.shape[0]) if i != index]
        self.distances = self.distances[keep][:, keep]
        self._last = None

    @torch.no_grad()
    def offer(self, patches: torch.Tensor, image_score: float) -> bool:
        """Admit the frame unless it is judged anomalous (by `image_score`, its raw score against the window);
        returns whether it was admitted."""
        now = self.clock()
        self.evict(now)
        if self.judge(image_score):
            self.excluded += 1
            return False
        was_ready = self.ready
        cached = self._last is not None and self._last[0] is patches and self._last[1].shape[1] == len(self.frames)
        patches = patches.detach().float().contiguous()
        if cached:
            forward = self._last[1]
        else:
            forward = nearest_per_image(patches, self.frames) if self.frames else patches.new_empty(len(patches), 0)
        n, p = len(self.frames), patches.shape[0]
        grown = torch.full((n + 1, n + 1, p), math.inf)
        if n:
            grown[:n, :n] = self.distances
            grown[n, :n] = forward.t().cpu()
            backward = nearest_neighbor(torch.cat(self.frames), patches)[0]  # each window patch → the new frame
            grown[:n, n] = backward.reshape(n, p).cpu()
        self.distances = grown
        self.frames.append(patches)
        self.added_at.append(now)
        self._last = None
        self.evict(now)
        self._rescore(prune=self.ready and not was_ready and not self._pruned)
        return True

    def _rescore(self, prune: bool = False) -> None:
        """Leave-one-out scores of the window's frames; `prune` (once, when the cold start ends): drop those that
        look anomalous against the others (a defective part among the first frames)."""
        n = len(self.frames)
        if n < 2:
            self.own_scores, self.own_patch_scores = torch.zeros(n), torch.empty(0, 0)
            return
        patch = smallest_mean(self.distances.permute(0, 2, 1).reshape(n * self.distances.shape[2], n),
                              self.fraction).reshape(n, -1)
        self.own_patch_scores = patch
        self.own_scores = self.image_score(patch).float().cpu()
        if not prune:
            return
        self._pruned = True
        level = float(self.own_scores.median())
        outliers = [i for i in range(n) if float(self.own_scores[i]) >= self.admit_ratio * level]
        for index in reversed(outliers):
            self._drop(index)
            self.excluded += 1
        if outliers:
            self._rescore()
