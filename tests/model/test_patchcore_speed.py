"""Issue 24's exact speed levers for PatchCore's frame path: the map as two matrix products
(model/patchcore/maps.py) and BatchNorm folded into the backbone's convolutions (model/patchcore/fold.py). Both
must give the scores and maps of the code before them (max |delta| <= 1e-4): checked against
`PatchcoreModel.anomaly_maps` (the convolution) and an unfolded backbone on real Lite0 weights and real frames."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from model.patchcore import build_patchcore
from model.patchcore.backbone import TapExtractor, build_timm_backbone
from model.patchcore.fold import fold_batchnorm
from model.patchcore.maps import axis_matrix, upsampled_blurred
from model.patchcore.torch_model import PatchcoreModel
from tests.conftest import require

TOLERANCE = 1e-4


@pytest.mark.parametrize(("batch", "grid", "size", "sigma"), [
    (1, (32, 32), (256, 256), 4.0),  # squash at 256 px
    (3, (32, 48), (256, 384), 4.0),  # fit: a rectangle
    (2, (7, 9), (56, 80), 4.0),  # a ratio that is not a whole number: nearest picks uneven runs
    (2, (32, 32), (256, 256), 2.5),
])
def test_matrix_map_equals_the_convolution(batch: int, grid: tuple[int, int], size: tuple[int, int],
                                           sigma: float) -> None:
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(batch, grid[0] * grid[1], generator=generator) * 10
    scores[0, 5] = 60.0  # one hot patch: the blur's tails and the reflected borders matter
    model = PatchcoreModel.__new__(PatchcoreModel)
    model.sigma = sigma
    expected = PatchcoreModel.anomaly_maps(model, scores, grid, size)
    maps = upsampled_blurred(scores, grid, size, sigma)
    assert maps.shape == expected.shape == (batch, *size)
    assert float((maps - expected).abs().max()) <= 1e-5 * float(expected.abs().max())


def test_axis_matrix_rows_are_the_blur_of_nearest_upsampling() -> None:
    matrix = axis_matrix(4, 40, 1.0, torch.device("cpu"), torch.float64)
    assert matrix.shape == (40, 4)
    assert torch.allclose(matrix.sum(dim=1), torch.ones(40, dtype=torch.float64), atol=1e-12)  # kernel sums to 1
    assert int(matrix[:10].argmax(dim=1).max()) == 0 and int(matrix[30:].argmin(dim=1).min()) == 0


def test_fold_batchnorm_keeps_the_features_of_lite0() -> None:
    folded_net, _ = build_timm_backbone("efficientnet-lite0")
    plain_net, _ = build_timm_backbone("efficientnet-lite0")
    assert fold_batchnorm(folded_net) == 48  # stem + every block's convolutions
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded_net.blocks.modules())
    folded, plain = TapExtractor(folded_net, (4, 10)), TapExtractor(plain_net, (4, 10))
    images = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(1)) * 1.5
    with torch.inference_mode():
        for got, wanted in zip(folded(images), plain(images), strict=True):
            assert float((got - wanted).abs().max()) <= 1e-5 * float(wanted.abs().max())


def test_fold_batchnorm_skips_what_it_cannot_fold() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    assert fold_batchnorm(net) == 0  # not a known block: left as it is
    training = build_timm_backbone("efficientnet-lite0")[0]
    training.bn1.training = True  # batch statistics: not an affine map, never folded
    assert fold_batchnorm(training) == 47


@pytest.mark.shared
def test_detector_scores_and_maps_equal_the_code_before_the_levers(samples_dir: Path) -> None:
    """Real Lite0 weights, a full 16-reference hazelnut bank (16384 rows), real frames of any size through
    `predict_frames` (the daemon's path): the same scores and maps as an unfolded backbone with the map by
    convolution, each detector with its own bank from the same references."""
    import cv2

    from model.fewshot import load_reference_images
    from model.preprocess import decode_image

    category = samples_dir / "hazelnut"
    references = sorted((category / "train" / "good").glob("*"))[:16]
    tests = sorted((category / "test").glob("*/*"))
    tests = tests[:: max(1, len(tests) // 4)]  # a few of each kind of defect
    require(len(references) == 16 and len(tests) >= 2, f"{category} lacks 16 references and 2 test images")
    images = load_reference_images(references, 256)
    now = build_patchcore(max_bank_rows=0)
    now.set_references(images)
    before = build_patchcore(max_bank_rows=0)
    before.model = PatchcoreModel(TapExtractor(build_timm_backbone("efficientnet-lite0")[0], before.model.taps))
    before.set_references(images)
    assert now.model.memory_bank.shape == (16384, 152)
    assert float((now.model.memory_bank - before.model.memory_bank).abs().max()) <= TOLERANCE
    frames = [decode_image(path) for path in tests]
    frames.append(cv2.resize(frames[0], (671, 447), interpolation=cv2.INTER_AREA))  # 0.3 MP, as the bench's
    scores, maps = now.predict_frames(frames)
    with_convolution = before.model.anomaly_maps  # the baseline's map: the convolution, as before the levers

    def conv_predict_tf(images: torch.Tensor):
        from model.detector import Prediction

        embedding = before.model.embed(images.float())
        patch, where, flat = before.model.patch_scores(embedding)
        return Prediction(scores=before.model.image_scores(patch, where, flat),
                          maps=with_convolution(patch, tuple(embedding.shape[-2:]), tuple(images.shape[-2:])))

    before.predict_tf = conv_predict_tf
    wanted_scores, wanted_maps = before.predict_frames(frames)
    assert abs(scores - wanted_scores).max() <= TOLERANCE
    for got, wanted in zip(maps, wanted_maps, strict=True):
        assert got.shape == wanted.shape
        assert abs(got - wanted).max() <= TOLERANCE
    print("max |delta| score", abs(scores - wanted_scores).max(),
          "map", max(abs(g - w).max() for g, w in zip(maps, wanted_maps, strict=True)))
    assert abs(wanted_scores).max() > 1.0  # real distances, not a degenerate zero map
