"""AdaCLIP against the official implementation's outputs on the tiny random CLIP (../shared/golden/adaclip), plus
batching, HSF, checkpoints and bad input.

Tolerances (golden README): maps 1e-4 abs, image scores 1e-5, losses 1e-4 rel, gradients and updated parameters
1e-3 rel (max abs difference over max abs expected, per tensor). One caveat for the updated parameters: AdamW's
first step moves each element by lr · g / (|g| + eps) ≈ ±lr, so an element whose true gradient is zero up to float32
rounding (|g| ~ 1e-7 of the tensor's largest) takes a sign that only rounding decides, in the official code as here;
such elements are left out of the updated-parameter comparison, and the optimiser itself is checked exactly by
applying it to the fixture's own gradients.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import pytest
import torch

from model import create_detector, load_backbone
from model.adaclip import (
    AdaCLIPDetector,
    ClassNameError,
    adaclip_loss,
    build_adaclip,
    build_optimizer,
    export_official,
    kmeans,
    kmeans_plus_plus,
    load_adaclip_checkpoint,
    save_adaclip,
    training_step,
)
from model.checkpoints import CheckpointError
from tests.conftest import require

NOISE_FLOOR = 1e-5  # |expected grad| below this fraction of the tensor's largest: AdamW's sign is rounding noise


def _rel(actual: torch.Tensor, wanted: torch.Tensor) -> float:
    return ((actual - wanted).abs().max() / wanted.abs().max()).item()


@pytest.fixture(scope="module")
def ada_dir(golden_dir: Path) -> Path:
    path = golden_dir.parent / "adaclip"
    require((path / "expected.safetensors").is_file(), f"{path}/expected.safetensors is absent")
    return path


@cache
def _load_expected(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "expected.safetensors"))


@pytest.fixture(scope="module")
def expected(ada_dir):
    return _load_expected(ada_dir)


@pytest.fixture(scope="module")
def expected_json(ada_dir):
    return json.loads((ada_dir / "expected.json").read_text())


@pytest.fixture(scope="module")
def inputs(golden_dir):
    return _load_expected(golden_dir)


@pytest.fixture(scope="module")
def backbone_files(golden_dir):
    return golden_dir / "tiny_clip_openai_fp16.safetensors", golden_dir / "tiny-clip-24L.json"


@pytest.fixture(scope="module")
def backbone(backbone_files):
    weights, config = backbone_files
    return load_backbone(weights, config=config, quick_gelu=False)  # AdaCLIP's tower: nn.GELU


@pytest.fixture(scope="module")
def official_pth(ada_dir):
    return ada_dir / "adaclip_prompts_official_format.pth"


@pytest.fixture(scope="module")
def model(backbone, official_pth):
    return build_adaclip(backbone, load_adaclip_checkpoint(official_pth))


@pytest.fixture(scope="module")
def batch_output(model, inputs, expected_json):
    with torch.no_grad():
        output = model(inputs["inputs/images"], expected_json["class_names"])
        maps = model.anomaly_maps(output)
    return output, maps


# -- parity -------------------------------------------------------------------------------------------------------
def test_image_scores(batch_output, expected):
    output, _ = batch_output
    torch.testing.assert_close(output.scores, expected["image_scores"], atol=1e-5, rtol=0)


def test_anomaly_maps(batch_output, expected):
    _, maps = batch_output
    assert maps.shape == (4, 518, 518)
    torch.testing.assert_close(maps, expected["anomaly_maps"], atol=1e-4, rtol=0)


def test_text_features_per_image(batch_output, expected):
    output, _ = batch_output
    torch.testing.assert_close(output.text_features, expected["text_features"], atol=1e-5, rtol=0)


def test_text_depends_on_the_image_and_batches_exactly(model):
    # Two images of the same class get different text features through their dynamic prompts.
    image_features = torch.randn(2, model.backbone.embed_dim, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        dynamic = model.dynamic_text_prompt_generator.stacked(image_features)
        both = model.encode_text(["bottle", "bottle"], dynamic)
        second = model.encode_text(["bottle"], dynamic[1:])
    assert both.shape == (2, model.backbone.embed_dim, 2)
    assert (both[0] - both[1]).abs().max() > 1e-3
    torch.testing.assert_close(both[1:], second, atol=1e-6, rtol=0)


def test_training_step_matches_official(backbone, official_pth, inputs, expected, expected_json):
    model = build_adaclip(backbone, load_adaclip_checkpoint(official_pth))
    optimizer = build_optimizer(model)
    loss = training_step(model, optimizer, inputs["inputs/images"][:1], expected_json["class_names"][:1],
                         inputs["inputs/labels"][:1], inputs["inputs/masks"][:1])
    wanted = expected_json["train_step_image0"]
    assert loss.total.item() == pytest.approx(wanted["total"], rel=1e-4)
    assert loss.classification.item() == pytest.approx(wanted["classification_focal"], rel=1e-4)
    assert len(loss.per_tap) == 4
    for got, want in zip(loss.per_tap, wanted["per_layer_focal_dice_normaldice"], strict=True):
        assert got == pytest.approx(want, rel=1e-4)

    checked = 0
    for name, param in model.learned_named_parameters():
        after = expected[f"after_step/{name}"]
        grad = expected.get(f"grad/{name}")
        if grad is None:
            # The text prompts of block 0 are never spliced in: no gradient, and AdamW leaves them alone.
            assert param.grad is None, name
            torch.testing.assert_close(param.detach(), after, atol=0, rtol=0)
            continue
        assert _rel(param.grad, grad) < 1e-3, name
        decided = grad.abs() > NOISE_FLOOR * grad.abs().max()
        assert decided.float().mean() > 0.99, name
        difference = ((param.detach() - after).abs() * decided).max() / after.abs().max()
        assert difference.item() < 1e-3, name
        checked += 1
    assert checked == 37


def test_optimizer_reproduces_official_update(backbone, official_pth, expected):
    """AdamW settings (lr 0.01, betas (0.5, 0.999), decay 0.01) on the fixture's own gradients."""
    model = build_adaclip(backbone, load_adaclip_checkpoint(official_pth))
    optimizer = build_optimizer(model)
    for name, param in model.learned_named_parameters():
        grad = expected.get(f"grad/{name}")
        param.grad = None if grad is None else grad.clone()
    optimizer.step()
    for name, param in model.learned_named_parameters():
        torch.testing.assert_close(param.detach(), expected[f"after_step/{name}"], atol=1e-7, rtol=1e-6)


# -- batching, detector, class names ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def detector(backbone_files, official_pth):
    weights, config = backbone_files
    # `layers` is the common CLI option: a single tap does not fit four patch heads and is ignored.
    return create_detector("adaclip", backbone=weights, backbone_config=config, prompts=official_pth,
                           class_name="bottle", hsf=False, device="cpu", dtype="float32", layers=(24,))


def test_batch_equals_single_calls(detector, batch_output, inputs, expected):
    output, maps = batch_output
    images = inputs["inputs/images"]
    assert isinstance(detector, AdaCLIPDetector)
    assert detector.model.taps == (6, 12, 18, 24)
    assert not detector.model.quick_gelu
    # Image 0 with the configured default class, image 3 with an explicit class name.
    single = [detector.predict(images[:1]), detector.predict(images[3:4], class_names=["magnetic_tile"])]
    for row, prediction in zip((0, 3), single, strict=True):
        torch.testing.assert_close(prediction.scores[0], output.scores[row], atol=1e-6, rtol=0)
        torch.testing.assert_close(prediction.maps[0], maps[row], atol=1e-5, rtol=0)
        torch.testing.assert_close(prediction.scores[0], expected["image_scores"][row], atol=1e-5, rtol=0)
    assert detector.version.startswith("adaclip-")


def test_missing_class_name_is_a_clear_error(model, inputs):
    detector = AdaCLIPDetector(model, device=torch.device("cpu"), dtype=torch.float32, version="test")
    images = inputs["inputs/images"][:2]
    with pytest.raises(ClassNameError, match=r"class_names=.*class_name="):
        detector.predict(images)
    with pytest.raises(ClassNameError, match="1 class names for a batch of 2"):
        detector.predict(images, class_names=["bottle"])
    with pytest.raises(ClassNameError, match="non-empty"):
        detector.predict(images, class_names=["bottle", ""])


def test_wrong_image_size_is_rejected(model):
    with pytest.raises(ValueError, match="518"):
        model(torch.zeros(1, 3, 224, 224), ["bottle"])


# -- HSF ----------------------------------------------------------------------------------------------------------
def test_kmeans_matches_sklearn_from_the_same_seeds():
    from sklearn.cluster import KMeans

    generator = torch.Generator().manual_seed(0)
    data = torch.randn(2, 100, 16, generator=generator, dtype=torch.float64)
    data[:, :50] += 3.0
    labels = kmeans(data, 20, seed=7)
    seeds = kmeans_plus_plus(data, 20, seed=7)
    for b in range(2):
        reference = KMeans(n_clusters=20, init=seeds[b].numpy(), n_init=1, tol=0.0, max_iter=300,
                           algorithm="lloyd").fit(data[b].numpy())
        assert labels[b].tolist() == reference.labels_.tolist()


def test_kmeans_is_deterministic_and_per_image():
    generator = torch.Generator().manual_seed(1)
    data = torch.randn(4, 100, 8, generator=generator)
    labels = kmeans(data, 20)
    assert torch.equal(labels, kmeans(data, 20))
    for b in range(4):
        assert torch.equal(kmeans(data[b : b + 1], 20)[0], labels[b])
    # Well-separated blobs are recovered exactly.
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    truth = torch.arange(3).repeat_interleave(20)
    blobs = (centres[truth] + 0.1 * torch.randn(60, 2, generator=generator)).unsqueeze(0)
    found = kmeans(blobs, 3)[0]
    assert all(len(set(found[truth == c].tolist())) == 1 for c in range(3))
    assert len(set(found.tolist())) == 3


def test_hsf_fuses_clustered_patches_into_the_image_score(model, batch_output, inputs, expected_json):
    output, _ = batch_output
    row = 2
    clustered = model.hybrid_semantic_fusion([f[row : row + 1] for f in output.patch_features],
                                             [t[row : row + 1] for t in output.tap_logits])
    assert clustered.shape == (1, model.backbone.embed_dim)
    assert clustered.norm(dim=-1).item() == pytest.approx(1.0, abs=1e-5)
    fused = torch.nn.functional.normalize(0.2 * clustered + 0.8 * output.global_features[row : row + 1], dim=-1)
    wanted = (100 * fused @ output.text_features[row]).softmax(dim=-1)[0, 1]
    model.use_hsf = True
    try:
        with torch.no_grad():
            hsf = model(inputs["inputs/images"][row : row + 1], expected_json["class_names"][row : row + 1])
    finally:
        model.use_hsf = False
    torch.testing.assert_close(hsf.scores[0], wanted, atol=1e-5, rtol=0)
    assert abs(hsf.scores[0].item() - output.scores[row].item()) > 1e-4  # HSF changes the score
    torch.testing.assert_close(hsf.tap_logits[0][0], output.tap_logits[0][row], atol=1e-4, rtol=0)  # maps unchanged


# -- checkpoints --------------------------------------------------------------------------------------------------
def test_official_checkpoint_round_trip(model, official_pth, tmp_path):
    original = torch.load(official_pth, weights_only=True)
    exported = export_official(model, tmp_path / "pretrained_tiny.pth")
    again = torch.load(exported, weights_only=True)
    assert sorted(again) == sorted(original)
    for key, value in original.items():
        torch.testing.assert_close(again[key], value, atol=0, rtol=0)


def test_anomalyd_checkpoint_records_activation_and_setup(model, backbone, tmp_path):
    path = save_adaclip(model, tmp_path / "adaclip.safetensors", class_names=["bottle", "hazelnut", "bottle"])
    checkpoint = load_adaclip_checkpoint(path)
    meta = checkpoint.metadata
    assert meta["format"] == "anomalyd-adaclip"
    assert meta["gelu"] == "gelu"
    assert meta["taps"] == [6, 12, 18, 24]
    assert meta["image_size"] == 518
    assert meta["class_names"] == ["bottle", "hazelnut"]
    assert meta["backbone"] == backbone.name
    rebuilt = build_adaclip(backbone, checkpoint)
    for name, value in model.learned_state_dict().items():
        torch.testing.assert_close(rebuilt.learned_state_dict()[name], value, atol=0, rtol=0)


def test_checkpoint_of_another_backbone_is_rejected(official_pth, backbone, tmp_path):
    state = torch.load(official_pth, weights_only=True)
    narrow = {k: v[..., :64] if v.ndim == 2 and "visual_prompter" in k else v for k, v in state.items()}
    narrow = {k: v[:, :64] if "patch_token_layer" in k and k.endswith("weight") else v for k, v in narrow.items()}
    path = tmp_path / "other_width.pth"
    torch.save(narrow, path)
    with pytest.raises(CheckpointError, match=r"other_width\.pth.*vision width 64.*another backbone"):
        build_adaclip(backbone, load_adaclip_checkpoint(path))


def test_incomplete_or_foreign_checkpoints_are_reported(official_pth, backbone, tmp_path):
    state = torch.load(official_pth, weights_only=True)
    partial = dict(state)
    del partial["clip_model.cls_token_layer.head.0.weight"]
    partial["clip_model.some_other_head.weight"] = torch.zeros(2)
    torch.save(partial, tmp_path / "partial.pth")
    checkpoint = load_adaclip_checkpoint(tmp_path / "partial.pth")
    assert checkpoint.unexpected == ["clip_model.some_other_head.weight"]
    with pytest.raises(CheckpointError, match=r"missing AdaCLIP tensors \['cls_token_layer.head.0.weight'\]"):
        build_adaclip(backbone, checkpoint)
    torch.save({"prompt_learner": {"ctx_pos": torch.zeros(1)}}, tmp_path / "anomalyclip.pth")
    with pytest.raises(CheckpointError, match="no AdaCLIP tensors"):
        load_adaclip_checkpoint(tmp_path / "anomalyclip.pth")


def test_activation_mismatch_is_rejected(model, backbone, tmp_path):
    path = save_adaclip(model, tmp_path / "quick.safetensors", metadata={"gelu": "quick_gelu"})
    with pytest.raises(CheckpointError, match=r"quick_gelu.*built with gelu"):
        build_adaclip(backbone, load_adaclip_checkpoint(path))


def test_loss_skips_images_without_masks(model, batch_output, inputs):
    output, _ = batch_output
    labels, masks = inputs["inputs/labels"], inputs["inputs/masks"]
    with_masks = torch.tensor([True, False, True, True])
    loss = adaclip_loss(model, output, labels, masks, has_mask=with_masks)
    subset = adaclip_loss(model, _rows(output, [0, 2, 3]), labels[[0, 2, 3]], masks[[0, 2, 3]])
    assert loss.segmentation.item() == pytest.approx(subset.segmentation.item(), rel=1e-5)
    no_masks = adaclip_loss(model, output, labels, None)
    assert no_masks.per_tap == [] and no_masks.total.item() == pytest.approx(loss.classification.item())


def _rows(output, rows):
    from dataclasses import replace

    return replace(output, image_probs=output.image_probs[rows], tap_logits=[t[rows] for t in output.tap_logits],
                   text_features=output.text_features[rows], global_features=output.global_features[rows],
                   patch_features=[p[rows] for p in output.patch_features])
