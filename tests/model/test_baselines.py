"""Training-free baselines (CLIP, CLIP-AC, WinCLIP) on the tiny random golden backbone: shapes, ranges, batching,
class names, and WinCLIP's window encoding and harmonic aggregation. Random weights make the scores meaningless as
detections; these tests check behaviour, not accuracy."""

from __future__ import annotations

import pytest
import torch

from model import baselines
from model._transformer import embed_patches
from model.factory import create_detector, list_models
from tests.model.golden import tiny_backbone

SIZE = 224  # 16 x 16 patches
WINCLIP_SIZE = 112  # 8 x 8 patches: 49 + 36 windows per image keep WinCLIP cheap on CPU


@pytest.fixture(scope="module")
def backbone(golden_dir):
    return tiny_backbone(golden_dir)


def _images(size: int) -> torch.Tensor:
    return torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def images():
    return _images(SIZE)


@pytest.fixture(scope="module")
def detectors(backbone):
    # No prompts file: the baselines need none; options they do not use (prompts, layers) are ignored.
    return {
        name: create_detector(name, backbone=backbone, image_size=WINCLIP_SIZE if name == "winclip" else SIZE,
                              device="cpu", prompts="unused.pth", layers=(24,))
        for name in ("clip", "clip-ac", "winclip")
    }


def test_models_are_registered():
    assert {"clip", "clip-ac", "winclip"} <= set(list_models())


@pytest.mark.parametrize("name", ["clip", "clip-ac", "winclip"])
def test_baselines_give_scores_and_maps(detectors, name):
    detector = detectors[name]
    size = detector.image_size
    prediction = detector.predict(_images(size))
    assert detector.name == name and name in detector.version
    assert prediction.scores.shape == (3,) and prediction.scores.dtype == torch.float32
    assert prediction.maps.shape == (3, size, size) and prediction.maps.dtype == torch.float32
    for values in (prediction.scores, prediction.maps):
        assert torch.isfinite(values).all()
        assert values.min() >= 0.0 and values.max() <= 1.0
    # Maps vary over the image (they are not a broadcast image score) and differ between images.
    assert prediction.maps[0].std() > 0
    assert not torch.allclose(prediction.maps[0], prediction.maps[1])


@pytest.mark.parametrize("name", ["clip", "winclip"])
def test_batch_equals_single_calls(detectors, name):
    detector = detectors[name]
    images = _images(detector.image_size)
    classes = ["object", "screw"]
    batch = detector.predict(images[:2], classes)
    for index, class_name in enumerate(classes):
        single = detector.predict(images[index : index + 1], [class_name])
        torch.testing.assert_close(batch.scores[index : index + 1], single.scores, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(batch.maps[index : index + 1], single.maps, atol=1e-5, rtol=1e-4)


def test_class_names_select_the_text(detectors, images):
    detector = detectors["clip-ac"]
    default = detector.predict(images[:2])
    explicit = detector.predict(images[:2], ["object", "object"])
    other = detector.predict(images[:2], ["hazelnut", "hazelnut"])
    torch.testing.assert_close(default.scores, explicit.scores)
    assert not torch.allclose(default.scores, other.scores)
    with pytest.raises(ValueError, match="2 class names for a batch of 3"):
        detector.predict(images, ["a", "b"])


def test_class_name_option_sets_the_default(backbone, images, detectors):
    detector = create_detector("clip", backbone=backbone, image_size=SIZE, device="cpu", class_name="hazelnut")
    torch.testing.assert_close(detector.predict(images[:1]).scores,
                               detectors["clip"].predict(images[:1], ["hazelnut"]).scores)


def test_prompt_ensemble_is_winclips_composition():
    normal, anomalous = baselines.prompt_ensemble("metal nut")
    assert len(normal) == 7 * 21 and len(anomalous) == 4 * 21
    assert "a photo of a flawless metal nut for visual inspection." in normal
    assert "a close-up photo of a metal nut with defect." in anomalous
    assert baselines.prompt_ensemble("pill", ensemble=False) == (["normal pill"], ["anomalous pill"])


def test_truncated_text_encoder_matches_open_clip(backbone):
    import open_clip

    tokens = open_clip.tokenize(["a photo of a flawless bottle.", "damaged bottle", "x"])
    with torch.no_grad():
        expected = backbone.clip.encode_text(tokens)
        actual = baselines.encode_text_causal(backbone.clip, tokens)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def test_window_indices_and_harmonic_aggregation_by_hand():
    windows = baselines.window_indices(3, 2)
    assert windows.tolist() == [[0, 1, 3, 4], [1, 2, 4, 5], [3, 4, 6, 7], [4, 5, 7, 8]]
    scores = torch.tensor([[1.0, 0.75, 0.5, 0.25]])
    # Patch p's score: (number of windows covering p) / sum over those windows of 1 / score.
    h = {
        0: 1.0,
        1: 2 / (1 / 1.0 + 1 / 0.75),
        2: 0.75,
        3: 2 / (1 / 1.0 + 1 / 0.5),
        4: 4 / (1 / 1.0 + 1 / 0.75 + 1 / 0.5 + 1 / 0.25),
        5: 2 / (1 / 0.75 + 1 / 0.25),
        6: 0.5,
        7: 2 / (1 / 0.5 + 1 / 0.25),
        8: 0.25,
    }
    expected = torch.tensor([[h[p] for p in range(9)]])
    torch.testing.assert_close(baselines.harmonic_aggregation(scores, windows, 9), expected)
    # Batched rows are independent; a zero score drags the patches it covers to (almost) zero, not to NaN.
    both = baselines.harmonic_aggregation(torch.tensor([[1.0, 0.75, 0.5, 0.25], [0.0, 1.0, 1.0, 1.0]]), windows, 9)
    torch.testing.assert_close(both[0], expected[0])
    assert torch.isfinite(both).all() and both[1, 0] < 1e-6 and both[1, 8] == pytest.approx(1.0)


def test_winclip_window_sees_only_its_patches(detectors):
    model = detectors["winclip"].model
    patch = model.backbone.patch_size
    original = _images(WINCLIP_SIZE)[:1]
    changed = original.clone()
    changed[..., 5 * patch :, 5 * patch :] += 1.0  # far from the top-left 3x3 window
    with torch.no_grad():
        embedded = [embed_patches(model.clip.visual, x, model.vision_pos) for x in (original, changed)]
        windows = model.windows(3)
        first = [model.encode_windows(e, windows[:1]) for e in embedded]
        last = [model.encode_windows(e, windows[-1:]) for e in embedded]
    torch.testing.assert_close(first[0], first[1])  # the top-left window ignores patches outside it
    assert not torch.allclose(last[0], last[1])  # the bottom-right window covers the change


def test_winclip_combines_scales_harmonically(detectors):
    model = detectors["winclip"].model
    images = _images(WINCLIP_SIZE)
    with torch.no_grad():
        image_scores, window_scores = model.score_windows(images[:2], ["object", "object"])
        _, maps = model.predict(images[:2], ["object", "object"])
    n_patches = model.grid**2
    per_scale = [image_scores[:, None].expand(-1, n_patches)] + [
        baselines.harmonic_aggregation(window_scores[k], model.windows(k), n_patches) for k in model.scales
    ]
    expected = len(per_scale) / sum(1.0 / s for s in per_scale)
    torch.testing.assert_close(maps, model.upsample(expected))
    assert window_scores[2].shape == (2, 7 * 7) and window_scores[3].shape == (2, 6 * 6)


def test_bad_sizes_are_named(backbone):
    with pytest.raises(ValueError, match="image size 230 is not a multiple of the patch size 14"):
        create_detector("clip", backbone=backbone, image_size=230, device="cpu")
    with pytest.raises(ValueError, match="window scale 40"):
        create_detector("winclip", backbone=backbone, image_size=WINCLIP_SIZE, device="cpu", scales=(2, 40))
    detector = create_detector("clip", backbone=backbone, image_size=SIZE, device="cpu")
    with pytest.raises(ValueError, match=r"expects \(B, 3, 224, 224\)"):
        detector.predict(torch.zeros(1, 3, 112, 112))


@pytest.mark.parametrize("name", ["clip", "clip-ac", "winclip"])
def test_version_of_names_the_version_create_gives_without_building(golden_dir, name):
    """`ModelFamily.version_of` (the daemon builds its detector once, daemon/learning/versions.py): from the backbone
    file's digest alone, the version `create` gives; an open_clip name or a loaded backbone: None (build to name)."""
    from model.factory import get_family

    weights, config = golden_dir / "tiny_clip_openai_fp16.safetensors", golden_dir / "tiny-clip-24L.json"
    size = WINCLIP_SIZE if name == "winclip" else SIZE
    version_of = get_family(name).version_of
    named = version_of(backbone=str(weights), image_size=size, prompts=None, class_name=None)
    built = create_detector(name, backbone=str(weights), backbone_config=str(config), image_size=size, device="cpu")
    assert named == built.version and named.startswith(f"{name}-tiny_clip_openai_fp16-")
    assert version_of(backbone="ViT-L-14-336", image_size=size) is None
    assert version_of(backbone=tiny_backbone(golden_dir), image_size=size) is None
