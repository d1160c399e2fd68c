"""Unit tests of the model core's building blocks: Gaussian filter, position tables, checkpoints, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from model import (
    BackboneError,
    CheckpointError,
    build_anomalyclip,
    create_detector,
    load_backbone,
    load_prompts,
    save_official,
    save_prompts,
)
from model._backbone import resize_position_embedding
from model.gaussian import gaussian_blur
from tests.model import golden


@pytest.mark.parametrize(("shape", "sigma"), [((3, 64, 80), 4.0), ((1, 37, 37), 1.5), ((2, 518, 518), 4.0)])
def test_gaussian_blur_matches_scipy(shape, sigma):
    rng = np.random.default_rng(0)
    maps = rng.random(shape, dtype=np.float32)
    maps[:, :5, :5] = 3.0  # a corner peak exercises the border rule
    expected = np.stack([gaussian_filter(m, sigma=sigma) for m in maps])
    actual = gaussian_blur(torch.from_numpy(maps), sigma).numpy()
    np.testing.assert_allclose(actual, expected, atol=2e-6)


def test_resize_position_embedding_bilinear_keeps_cls_and_grid():
    pos = torch.randn(1 + 24 * 24, 16)
    resized = resize_position_embedding(pos, 37, "bilinear")
    assert resized.shape == (1 + 37 * 37, 16)
    torch.testing.assert_close(resized[0], pos[0])
    assert resize_position_embedding(pos, 24) is pos
    # bilinear and bicubic differ: the mode is part of each method's definition
    assert not torch.allclose(resized, resize_position_embedding(pos, 37, "bicubic"))


def test_prompt_checkpoint_round_trips(golden_dir, tmp_path):
    original = golden.prompts(golden_dir)
    own = save_prompts(tmp_path / "p.safetensors", original.state, {"layers": [24], "training_data": "golden"})
    official = save_official(tmp_path / "p.pth", original.state)
    for path in (own, official):
        loaded = load_prompts(path)
        assert loaded.state.keys() == original.state.keys()
        for key, value in original.state.items():
            assert torch.equal(loaded.state[key], value), key
    assert load_prompts(own).metadata["training_data"] == "golden"
    assert load_prompts(own).metadata["format"] == "anomalyd-prompts"
    reread = torch.load(official, weights_only=True)
    assert set(reread) == {"prompt_learner"}


def test_wrong_prompt_shapes_are_named(golden_dir, tmp_path):
    state = dict(golden.prompts(golden_dir).state)
    state["ctx_neg"] = torch.zeros(1, 1, 10, 128)
    bad = save_official(tmp_path / "bad.pth", state)
    with pytest.raises(CheckpointError, match="ctx_neg"):
        build_anomalyclip(golden.tiny_backbone(golden_dir), load_prompts(bad))
    state = {k: v[..., :64] if v.is_floating_point() else v for k, v in golden.prompts(golden_dir).state.items()}
    wrong_width = save_official(tmp_path / "narrow.pth", state)
    with pytest.raises(CheckpointError, match="width 64"):
        build_anomalyclip(golden.tiny_backbone(golden_dir), load_prompts(wrong_width))


def test_unreadable_checkpoints(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"junk\.pth"):
        load_prompts(junk)
    other = tmp_path / "other.pth"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(CheckpointError, match="prompt_learner"):
        load_prompts(other)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_prompts(tmp_path / "missing.pth")


def test_backbone_errors_name_the_problem(golden_dir, tmp_path):
    weights, config = golden.backbone_files(golden_dir)
    with pytest.raises(BackboneError, match="unknown backbone 'ViT-Nope'"):
        load_backbone("ViT-Nope")
    cfg = json.loads(config.read_text())
    cfg["vision_cfg"]["layers"] = 12
    small = tmp_path / "small.json"
    small.write_text(json.dumps(cfg))
    with pytest.raises(BackboneError, match=r"unexpected keys .*resblocks\.12"):
        load_backbone(weights, config=small)
    cfg = json.loads(config.read_text())
    cfg["embed_dim"] = 64
    narrow = tmp_path / "narrow.json"
    narrow.write_text(json.dumps(cfg))
    with pytest.raises(BackboneError, match=r"shape mismatches .*text_projection"):
        load_backbone(weights, config=narrow)


def test_backbone_without_config_is_inferred(golden_dir):
    weights, _ = golden.backbone_files(golden_dir)
    inferred = load_backbone(weights)  # sizes read off the OpenAI-layout state dict
    assert (inferred.vision_width, inferred.vision_layers, inferred.patch_size) == (128, 24, 14)
    assert inferred.quick_gelu


def test_create_detector_validates_options(golden_dir):
    weights, config = golden.backbone_files(golden_dir)
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        create_detector("nope")
    with pytest.raises(ValueError, match="dtype 'float8'"):
        create_detector("anomalyclip", dtype="float8")
    with pytest.raises(CheckpointError, match="needs learned prompts"):
        create_detector("anomalyclip", backbone=weights, backbone_config=config, device="cpu")
    with pytest.raises(ValueError, match="layers"):
        create_detector("anomalyclip", backbone=weights, backbone_config=config, device="cpu",
                        prompts=golden_dir / "prompts_official_format.pth", layers=(0, 30))


def test_detector_predicts_batches(golden_dir):
    weights, config = golden.backbone_files(golden_dir)
    detector = create_detector("anomalyclip", backbone=weights, backbone_config=config, device="cpu",
                               prompts=golden_dir / "prompts_official_format.pth")
    prediction = detector.predict(golden.expected(golden_dir)["inputs/images"][:2])
    assert prediction.scores.shape == (2,) and prediction.maps.shape == (2, 518, 518)
    torch.testing.assert_close(prediction.scores, golden.expected(golden_dir)["L24/image_scores"][:2], atol=1e-5, rtol=0)
    assert detector.version.startswith("anomalyclip-")


def test_openai_weights_get_quickgelu_and_adaclip_can_ask_for_gelu(golden_dir, monkeypatch):
    """open_clip's ViT-L-14-336 config builds nn.GELU; OpenAI's weights need QuickGELU, AdaCLIP's nn.GELU."""
    import open_clip

    calls = []
    tiny = json.loads(golden.backbone_files(golden_dir)[1].read_text())

    def fake_create_model(name, *, pretrained, cache_dir, force_quick_gelu, precision):
        calls.append((name, pretrained, force_quick_gelu))
        return open_clip.model.CLIP(**{**tiny, "quick_gelu": force_quick_gelu})

    monkeypatch.setattr(open_clip, "create_model", fake_create_model)
    assert load_backbone("ViT-L-14-336", pretrained="openai").quick_gelu
    assert not load_backbone("ViT-L-14-336", pretrained="openai", quick_gelu=False).quick_gelu
    assert calls == [("ViT-L-14-336", "openai", True), ("ViT-L-14-336", "openai", False)]
