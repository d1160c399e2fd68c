"""The PatchCore calibration rule (daemon/references/manager.py): held-out references plus lightly perturbed views of them
(shifted, turned, exposed), d0 from the references' own scores only, and a threshold a shifted live frame passes.
Real EfficientNet-Lite0 weights (a normal dependency) at 64 px on synthetic textures: fast, no ../shared."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from daemon.detectors.scale import scale_outputs
from daemon.references.calibration import quantile_thresholds
from model.known_good import calibration_views
from model.patchcore import build_patchcore, clip_to_tf
from model.patchcore.known_good import leave_one_out_scores, patchcore_embeddings, patchcore_known_good
from model.preprocess import fast_transform

SIZE = 64


def _dot(x: int, y: int, size: int = 100) -> np.ndarray:
    image = np.zeros((size, size, 3), np.uint8)
    image[y, x] = 255
    return image


def _where(image: np.ndarray) -> tuple[float, float]:
    weights = image[..., 0].astype(np.float64)
    ys, xs = np.indices(weights.shape)
    return float((xs * weights).sum() / weights.sum()), float((ys * weights).sum() / weights.sum())


def test_calibration_views_shift_turn_and_expose():
    views = calibration_views(_dot(70, 50), shift=0.02, degrees=5.0, gain=0.05)
    assert len(views) == 8 and all(v.shape == (100, 100, 3) and v.dtype == np.uint8 for v in views)
    # 2 % of 100 px each way along each axis
    assert [_where(v) for v in views[:4]] == [pytest.approx(p, abs=0.01) for p in ((72, 50), (68, 50), (70, 52),
                                                                                    (70, 48))]
    # ±5° about the centre: the dot 20 px right of it moves ~1.7 px up or down
    (x1, y1), (x2, y2) = _where(views[4]), _where(views[5])
    assert x1 == pytest.approx(50 + 20 * np.cos(np.radians(5)), abs=0.3) and x2 == pytest.approx(x1, abs=0.05)
    assert y1 == pytest.approx(50 - 20 * np.sin(np.radians(5)), abs=0.3)
    assert y2 == pytest.approx(50 + 20 * np.sin(np.radians(5)), abs=0.3)
    grey = np.full((10, 10, 3), 100, np.uint8)
    bright, dark = calibration_views(grey)[6:]
    assert int(bright[0, 0, 0]) == 105 and int(dark[0, 0, 0]) == 95


def _texture(dx: int, dy: int, seed: int) -> np.ndarray:
    """One fixed-camera scene (a smooth texture) seen with the part dx, dy pixels off, a little sensor noise."""
    base = cv2.resize(np.random.default_rng(7).integers(0, 256, (12, 12, 3)).astype(np.uint8), (160, 160),
                      interpolation=cv2.INTER_CUBIC)
    frame = base[20 + dy:148 + dy, 20 + dx:148 + dx].astype(np.int16)
    frame += np.random.default_rng(seed).integers(-4, 5, frame.shape)
    return np.clip(frame, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def detector():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return build_patchcore(image_size=SIZE, max_bank_rows=None)


def test_known_good_scores_hold_out_views_and_keep_d0(tmp_path, detector):
    files = []
    for i, (dx, dy) in enumerate(((0, 0), (1, 0), (0, 1), (1, 1))):
        files.append(tmp_path / f"ref{i}.png")
        assert cv2.imwrite(str(files[-1]), cv2.cvtColor(_texture(dx, dy, i), cv2.COLOR_RGB2BGR))
    known = patchcore_known_good(detector, files, limit=3)
    assert (known.held_out, known.views) == (3, 24) and len(known.scores) == len(known.maxima) == 27
    own, own_maxima = leave_one_out_scores(detector.model, patchcore_embeddings(detector, files), SIZE, 3)
    # d0 is the references' own median: the (higher) view scores do not move the scale
    assert known.distance_scale == pytest.approx(float(np.median(own)))
    assert known.scores[0::9] == pytest.approx(own) and known.maxima[0::9] == pytest.approx(own_maxima)
    # a view of reference 0 scores as it would against the bank of references 1-3, computed directly
    view = fast_transform(calibration_views(_texture(0, 0, 0))[0], SIZE)[None]
    embeddings = patchcore_embeddings(detector, files)
    detector.model.set_memory_bank(torch.cat([detector.model.flatten(e) for e in embeddings[1:]]))
    embedding = detector.model.embed(clip_to_tf(view))
    patch, where, flat = detector.model.patch_scores(embedding)
    assert known.scores[1] == pytest.approx(float(detector.model.image_scores(patch, where, flat)[0]), rel=1e-4)
    # the views are harder than the held-out references themselves: that is what widens the calibration
    assert np.mean(known.scores) > np.mean(own)
    assert "3 references" in known.describe() and "24 shifted/turned/exposed views" in known.describe()


def test_threshold_from_views_passes_shifted_live_frames_that_leave_one_out_rejects(tmp_path, detector):
    """The fault the rule fixes: references that hardly move give a threshold the line's normal position jitter
    exceeds; with the views in the calibration the same jittered good frames pass. (What it costs in missed
    defects is measured on real ones: bench/calibration_patchcore.py, tests/daemon/test_e2e_patchcore.py.)"""
    offsets = ((0, 0), (1, 0), (0, 1), (1, 1), (0, 0), (1, 0))
    files = []
    for i, (dx, dy) in enumerate(offsets):
        files.append(tmp_path / f"ref{i}.png")
        assert cv2.imwrite(str(files[-1]), cv2.cvtColor(_texture(dx, dy, i), cv2.COLOR_RGB2BGR))
    detector.load_references(files)
    known = patchcore_known_good(detector, files)
    detector.distance_scale = known.distance_scale
    held_out = known.held_out

    def thresholds(scores, maxima):
        s, m = scale_outputs(detector, torch.tensor(scores), torch.tensor(maxima))
        return quantile_thresholds(s.tolist(), m.tolist(), 0.005)[0]

    only_references = thresholds(known.scores[::9][:held_out], known.maxima[::9][:held_out])
    with_views = thresholds(known.scores, known.maxima)
    live = [_texture(dx, dy, 100 + i) for i, (dx, dy) in enumerate(((3, 0), (-3, 0), (0, 3), (0, -3), (2, 2)))]
    prediction = detector.predict(torch.stack([fast_transform(f, SIZE) for f in live]))
    good, _ = scale_outputs(detector, prediction.scores, prediction.maps)
    assert with_views > only_references
    assert int((good >= only_references).sum()) >= 2, (good, only_references)
    assert int((good >= with_views).sum()) == 0, (good, with_views)
