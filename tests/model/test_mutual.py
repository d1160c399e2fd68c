"""Mutual scoring (model/mutual): the set-level scores and the online window, on synthetic patch embeddings
whose answers are known (the real-weights accuracy is tests/model/test_mutual_accuracy.py)."""

from __future__ import annotations

import math

import pytest
import torch

from model.mutual import MutualWindow, WindowLimits, mutual_patch_scores, smallest_mean

P, D = 64, 16


def normal_set(n: int, seed: int = 0) -> torch.Tensor:
    """n images of P patches drawn from one normal pattern (each patch position has its own mean)."""
    generator = torch.Generator().manual_seed(seed)
    pattern = torch.randn(P, D, generator=generator) * 3
    return pattern + 0.1 * torch.randn(n, P, D, generator=generator)


def test_smallest_mean_averages_the_smallest_fraction_of_finite_distances() -> None:
    distances = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, math.inf]])
    # 9 finite → ceil(0.3 * 9) = 3 smallest
    assert smallest_mean(distances, 0.3).item() == pytest.approx(2.0)
    assert smallest_mean(distances, 0.01).item() == pytest.approx(1.0)


def test_a_defect_stands_out_even_when_a_few_other_images_share_it() -> None:
    images = normal_set(12)
    defect = torch.full((D,), 8.0)
    for i in (0, 1, 2):  # the same defect at patch 5 in three images: 2 of each one's 11 others share it
        images[i, 5] += defect
    scores = mutual_patch_scores(images, fraction=0.3, query_images=5)
    assert scores.shape == (12, P)
    normal_max = scores[3:].max()
    for i in (0, 1, 2):
        assert scores[i, 5] > 5 * normal_max, (scores[i, 5], normal_max)
        assert scores[i].argmax() == 5
    # with MuSc's interval average, not the plain nearest image: the nearest alone would hide the shared defect
    assert scores[0, 5] > 5 * mutual_patch_scores(images, fraction=0.01)[0, 5]


def test_max_others_bounds_the_comparisons_and_keeps_the_answer() -> None:
    images = normal_set(20)
    images[7, 3] += 8.0
    full = mutual_patch_scores(images)
    capped = mutual_patch_scores(images, max_others=8)
    assert full[7].argmax() == capped[7].argmax() == 3
    assert capped[7, 3] == pytest.approx(full[7, 3].item(), rel=0.2)


def test_the_window_keeps_anomalous_frames_out_and_stays_within_its_bounds() -> None:
    now = [0.0]
    window = MutualWindow(WindowLimits(max_frames=6, max_bytes=1 << 20, max_age_s=100.0), min_frames=4,
                          clock=lambda: now[0])
    frames = normal_set(14)
    broken = frames[0].clone()
    broken[10] += 8.0

    def feed(patches: torch.Tensor) -> tuple[float, bool]:
        now[0] += 1
        score = float(window.patch_scores(patches).max())
        return score, window.offer(patches, score)

    # cold start: the first frames are admitted unjudged, a broken one among them too ...
    for patches in (frames[1], broken, frames[2], frames[3]):
        assert feed(patches)[1]
    # ... and dropped again when the window becomes ready and sees it against the others
    assert len(window) == 3 and window.excluded == 1 and not window.ready
    assert not any(torch.equal(f, broken) for f in window.frames)
    for i in range(4, 6):
        assert feed(frames[i])[1]
    assert window.ready and math.isfinite(window.distance_scale)
    level = window.normal_level()
    for _ in range(5):  # a run of the same broken part: none enters the window, each stays anomalous
        score, admitted = feed(broken)
        assert not admitted and score >= window.admit_ratio * level
    assert window.excluded == 6 and len(window) == 5
    for i in range(6, 14):  # normal frames again: admitted, the window keeps its newest max_frames
        assert feed(frames[i])[1]
    assert len(window) == 6 and torch.equal(window.frames[-1], frames[13])
    assert window.distances.shape == (6, 6, P)
    # the kept distances are those a fresh search gives: frame 0 of the window against the others
    fresh = torch.stack([torch.cdist(window.frames[0], other).amin(1) for other in window.frames[1:]], 1)
    assert torch.allclose(window.distances[0, 1:].t(), fresh, atol=1e-3)
    # memory bound: embeddings and distances of at most what max_bytes holds
    per_frame = P * D * 4
    small = MutualWindow(WindowLimits(max_frames=50, max_bytes=3 * per_frame + 9 * P * 4), clock=lambda: now[0])
    for i in range(6):
        small.offer(frames[i], 0.0)
    assert len(small) == 3 and small.nbytes <= 3 * per_frame + 9 * P * 4
    # time bound: frames older than max_age_s leave
    now[0] += 101
    window.evict()
    assert len(window) == 0 and not window.ready and window.distance_scale == math.inf


def test_window_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        WindowLimits(max_frames=0)
