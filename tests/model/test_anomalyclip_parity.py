"""AnomalyCLIP against the official implementation's outputs on the tiny random CLIP (../shared/golden).

Tolerances (golden README): maps and token probabilities 1e-4 abs, image scores 1e-5, losses 1e-4 rel, gradients
and updated parameters 1e-3 rel (max abs difference over max abs expected, per tensor: the deep prompts are
rounded through fp16 as the official code does, so single elements can sit on the other side of an fp16 rounding).
"""

from __future__ import annotations

import pytest
import torch

from model import build_anomalyclip
from model.anomalyclip.loss import glocal_loss
from model.preprocess import load_reference
from tests.model import golden


def _rel(actual: torch.Tensor, wanted: torch.Tensor) -> float:
    return ((actual - wanted).abs().max() / wanted.abs().max()).item()


@pytest.fixture(scope="module", params=list(golden.TAP_SETS))
def tap_model(request, golden_dir):
    model = build_anomalyclip(golden.tiny_backbone(golden_dir), golden.prompts(golden_dir),
                              layers=golden.TAP_SETS[request.param])
    return request.param, model


@pytest.fixture(scope="module")
def outputs(tap_model, golden_dir):
    name, model = tap_model
    images = golden.expected(golden_dir)["inputs/images"]
    with torch.no_grad():
        out = model(images)
        maps = model.anomaly_maps(out.token_probs)
    return name, model, out, maps


def test_text_features(golden_dir):
    model = build_anomalyclip(golden.tiny_backbone(golden_dir), golden.prompts(golden_dir))
    with torch.no_grad():
        text = model.text_features()
    torch.testing.assert_close(text, golden.expected(golden_dir)["text_features"], atol=1e-5, rtol=0)


def test_image_scores(outputs, golden_dir):
    name, _, out, _ = outputs
    torch.testing.assert_close(out.scores, golden.expected(golden_dir)[f"{name}/image_scores"], atol=1e-5, rtol=0)


def test_token_probabilities(outputs, golden_dir):
    name, _, out, _ = outputs
    torch.testing.assert_close(out.token_probs, golden.expected(golden_dir)[f"{name}/token_probs"], atol=1e-4, rtol=0)


def test_anomaly_maps(outputs, golden_dir):
    name, _, _, maps = outputs
    torch.testing.assert_close(maps, golden.expected(golden_dir)[f"{name}/anomaly_maps"], atol=1e-4, rtol=0)


def test_batch_equals_single_images(outputs, golden_dir):
    _, model, out, maps = outputs
    images = golden.expected(golden_dir)["inputs/images"]
    with torch.no_grad():
        for index in (0, 3):
            scores, single_maps = model.predict(images[index : index + 1])
            torch.testing.assert_close(scores[0], out.scores[index], atol=1e-6, rtol=0)
            torch.testing.assert_close(single_maps[0], maps[index], atol=1e-5, rtol=0)


def test_raw_inputs_through_reference_preprocessing(golden_dir):
    """From the raw files: the PIL path reproduces the preprocessed tensors and hence the maps."""
    exp = golden.expected(golden_dir)
    files = golden.expected_json(golden_dir)["input_files"]
    images = torch.stack([load_reference(golden_dir / name, 518) for name in files])
    torch.testing.assert_close(images, exp["inputs/images"], atol=1e-5, rtol=0)
    model = build_anomalyclip(golden.tiny_backbone(golden_dir), golden.prompts(golden_dir), layers=(24,))
    scores, maps = model.predict(images)
    torch.testing.assert_close(scores, exp["L24/image_scores"], atol=1e-5, rtol=0)
    torch.testing.assert_close(maps, exp["L24/anomaly_maps"], atol=1e-4, rtol=0)


def test_one_training_step(golden_dir):
    """Losses, gradients and parameters after one Adam step on the four images (taps 6/12/18/24)."""
    exp = golden.expected(golden_dir)
    want = golden.expected_json(golden_dir)["train_step"]
    model = build_anomalyclip(golden.tiny_backbone(golden_dir), golden.prompts(golden_dir), layers=(6, 12, 18, 24))
    model.train()
    optimizer = torch.optim.Adam(model.prompt_learner.parameters(), lr=1e-3, betas=(0.5, 0.999))
    out = model(exp["inputs/images"], with_probabilities=True)
    loss = glocal_loss(out.image_logits, exp["inputs/labels"], out.probabilities, exp["inputs/masks"].float())

    assert loss.image.item() == pytest.approx(want["image_loss"], rel=1e-4)
    assert loss.local.item() == pytest.approx(want["local_loss_times_4"], rel=1e-4)
    for got, wanted in zip(loss.per_tap, want["per_layer_focal_dice_normaldice"], strict=True):
        assert got == pytest.approx(tuple(wanted), rel=1e-4)

    optimizer.zero_grad()
    loss.total.backward()
    params = dict(model.prompt_learner.named_parameters())
    grad_keys = [k for k in exp if k.startswith("grad/")]
    assert len(grad_keys) == 10
    for key in grad_keys:
        assert _rel(params[key.removeprefix("grad/")].grad, exp[key]) < 1e-3, key
    optimizer.step()
    for key in (k for k in exp if k.startswith("after_step/")):
        assert _rel(params[key.removeprefix("after_step/")].detach(), exp[key]) < 1e-3, key
