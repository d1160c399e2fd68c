"""Few-shot normal references: the memory bank finds defects that zero-shot misses, banks are saved/loaded per
source and rebuilt when the references change, bad references are named, and thresholds calibrate."""

from __future__ import annotations

import re

import cv2
import numpy as np
import pytest
import torch
from safetensors import safe_open
from sklearn.metrics import roc_auc_score

import model.baselines  # noqa: F401  (registers the training-free models)
from model import fewshot
from model.detector import Prediction
from model.factory import create_detector
from model.fewshot import (
    FewShotDetector,
    PatchFeatureExtractor,
    ReferenceBank,
    ReferencesError,
    calibrate_threshold,
    with_references,
)
from model.preprocess import fast_transform
from tests.model.golden import tiny_backbone

SMALL = 224


@pytest.fixture(scope="module")
def backbone(golden_dir):
    return tiny_backbone(golden_dir)


@pytest.fixture(scope="module")
def clip_small(backbone):
    return create_detector("clip", backbone=backbone, image_size=SMALL, device="cpu")


# -- a synthetic inspection: an aligned repeated texture (a fixed camera on a fabric/part) with pasted defects -----

def _tile(seed: int, period: int, cells: int) -> np.ndarray:
    cells_rgb = np.random.default_rng(seed).integers(0, 256, (cells, cells, 3)).astype(np.uint8)
    return cv2.resize(cells_rgb, (period, period), interpolation=cv2.INTER_CUBIC)


def _texture(tile: np.ndarray, size: int, rng: np.random.Generator, shift: bool = False) -> np.ndarray:
    reps = size // tile.shape[0] + 2
    big = np.tile(tile, (reps, reps, 1))
    dy, dx = rng.integers(0, tile.shape[0], 2) if shift else (0, 0)
    noisy = big[dy : dy + size, dx : dx + size].astype(np.int16) + rng.integers(-8, 9, (size, size, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)


def _inspection(size: int, n_defective: int, n_references: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    good, other = _tile(1, 28, 7), _tile(2, 20, 5)
    references = [_texture(good, size, rng) for _ in range(n_references)]
    images, masks = [], []
    for _ in range(n_defective):
        image, mask = _texture(good, size, rng), np.zeros((size, size), np.uint8)
        foreign = _texture(other, size, rng, shift=True)
        for _ in range(2):  # two patches of a different texture
            h, w = rng.integers(50, 90, 2)
            y, x = rng.integers(0, size - h), rng.integers(0, size - w)
            image[y : y + h, x : x + w] = foreign[y : y + h, x : x + w]
            mask[y : y + h, x : x + w] = 1
        images.append(image)
        masks.append(mask)
    clean = _texture(good, size, rng)
    return references, images, np.stack(masks) if masks else np.zeros((0, size, size), np.uint8), clean


def _to_batch(images: list[np.ndarray], size: int) -> torch.Tensor:
    return torch.stack([fast_transform(image, size) for image in images])


def test_few_shot_finds_defects_zero_shot_misses(backbone):
    size = 518
    references, defective, masks, clean = _inspection(size, n_defective=2, n_references=4)
    base = create_detector("clip", backbone=backbone, image_size=size, device="cpu")
    extractor = PatchFeatureExtractor(backbone, size)
    assert extractor.layers == (6, 12, 18, 24)
    bank = ReferenceBank.build(extractor, _to_batch(references, size))
    detector = FewShotDetector(base, bank, extractor)

    batch = _to_batch([*defective, clean], size)
    zero_shot = base.predict(batch)
    few_shot = detector.predict(batch)
    auroc_zero = roc_auc_score(masks.ravel(), zero_shot.maps[:2].numpy().ravel())
    auroc_few = roc_auc_score(masks.ravel(), few_shot.maps[:2].numpy().ravel())
    # Measured: zero-shot 0.59, few-shot (combined with zero-shot, weight 0.5) 0.97, few-shot alone 1.0.
    assert auroc_few >= 0.8 and auroc_few > auroc_zero + 0.1, (auroc_zero, auroc_few)
    assert roc_auc_score(masks.ravel(), detector.few_shot_maps(batch[:2]).numpy().ravel()) >= 0.9
    # Image scores: the clean frame scores below both defective ones once references are used.
    assert few_shot.scores[2] < few_shot.scores[:2].min()
    assert few_shot.maps.shape == (3, size, size) and few_shot.scores.shape == (3,)
    assert float(few_shot.scores.min()) >= 0.0 and float(few_shot.scores.max()) <= 1.0
    assert detector.name == "clip" and detector.version.startswith(base.version + "+ref-")


def test_a_reference_matches_itself(backbone, clip_small):
    references, _, _, _ = _inspection(SMALL, n_defective=0, n_references=2)
    batch = _to_batch(references, SMALL)
    extractor = PatchFeatureExtractor(backbone, SMALL, layers=(2, 4), kind="raw")
    detector = FewShotDetector(clip_small, ReferenceBank.build(extractor, batch), extractor, zero_shot_weight=0.25)
    assert detector.few_shot_maps(batch).abs().max() < 1e-3  # nearest neighbour distance 0
    combined, zero_shot = detector.predict(batch[:1]), clip_small.predict(batch[:1])
    torch.testing.assert_close(combined.maps, 0.25 * zero_shot.maps, atol=1e-3, rtol=0)


def _write_references(folder, count: int, seed: int = 0):
    folder.mkdir(parents=True, exist_ok=True)
    references, _, _, _ = _inspection(SMALL, n_defective=0, n_references=count, seed=seed)
    for index, image in enumerate(references):
        cv2.imwrite(str(folder / f"good_{index}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    return sorted(folder.glob("*.png"))


def test_bank_is_cached_per_source_and_rebuilt_when_references_change(clip_small, tmp_path, monkeypatch):
    folder = tmp_path / "refs"
    files = _write_references(folder, 2)
    cache = tmp_path / "sources" / "line1-cam2.safetensors"

    detector = with_references(clip_small, folder, cache_path=cache, layers=(3, 6))
    assert cache.is_file()
    with safe_open(str(cache), framework="pt") as handle:
        meta = handle.metadata()
        assert handle.get_tensor("layer_0").shape == (2 * 16 * 16, 128)
    assert meta["backbone"] == clip_small.backbone.name and meta["image_size"] == "224"
    assert meta["layers"] == "3,6" and meta["n_references"] == "2" and meta["kind"] == "proj"
    assert meta["digest"] == fewshot.references_digest(files) and len(meta["digest"]) == 16
    first_version = detector.version

    # Same files and model: the cached bank is used, nothing is rebuilt.
    def no_build(*args, **kwargs):
        raise AssertionError("bank rebuilt although the references did not change")

    monkeypatch.setattr(ReferenceBank, "build", no_build)
    again = with_references(clip_small, folder, cache_path=cache, layers=(3, 6))
    assert again.version == first_version
    monkeypatch.undo()

    # A reference changes: the digest differs and the bank is rebuilt and saved again.
    _write_references(tmp_path / "other", 1, seed=5)
    (tmp_path / "other" / "good_0.png").replace(folder / "good_1.png")
    rebuilt = with_references(clip_small, folder, cache_path=cache, layers=(3, 6))
    assert rebuilt.version != first_version
    assert ReferenceBank.load(cache).digest == fewshot.references_digest(sorted(folder.glob("*.png")))

    # The saved bank itself can be passed as the references.
    from_file = with_references(clip_small, cache, layers=(3, 6))
    torch.testing.assert_close(from_file.bank.features[0], rebuilt.bank.features[0], atol=1e-2, rtol=0)


def test_bad_references_are_named(backbone, clip_small, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    with pytest.raises(ReferencesError, match=re.escape(f"reference folder {empty} holds no images")):
        with_references(clip_small, empty)
    with pytest.raises(ReferencesError, match=r"missing\.png does not exist"):
        with_references(clip_small, [tmp_path / "missing.png"])
    broken = tmp_path / "broken" / "good.png"
    broken.parent.mkdir()
    broken.write_bytes(b"\x89PNG not really")
    with pytest.raises(ReferencesError, match=r"good\.png"):
        with_references(clip_small, broken.parent)
    many = _write_references(tmp_path / "many", 3)
    with pytest.raises(ReferencesError, match="3 reference images given, at most 2"):
        with_references(clip_small, many, max_references=2)

    # A bank built for another image size (or backbone) is refused with the value named.
    bank_448 = ReferenceBank.build(PatchFeatureExtractor(backbone, 448, layers=(3, 6)), torch.zeros(1, 3, 448, 448))
    path = bank_448.save(tmp_path / "bank448.safetensors")
    with pytest.raises(ReferencesError, match="image_size '448', but the detector uses '224'"):
        with_references(clip_small, path, layers=(3, 6))
    bank_448.metadata["image_size"] = "224"
    bank_448.metadata["backbone"] = "ViT-B-16/openai"
    path = bank_448.save(tmp_path / "bank_other.safetensors")
    with pytest.raises(ReferencesError, match="backbone 'ViT-B-16/openai'"):
        with_references(clip_small, path, layers=(3, 6))


class _FixedScores:
    """A stand-in detector whose image scores are given by the first pixel of each image."""

    name = "fixed"
    version = "fixed-1"
    image_size = 8
    device = torch.device("cpu")
    seen_classes = None

    def predict(self, images, class_names=None):
        self.seen_classes = class_names
        return Prediction(scores=images[:, 0, 0, 0].clone(), maps=torch.zeros(images.shape[0], 8, 8))


def test_calibrate_threshold():
    values = torch.tensor([0.10, 0.20, 0.30, 0.25, 0.15, 0.40, 0.35, 0.05, 0.22, 0.18])
    images = torch.zeros(10, 3, 8, 8)
    images[:, 0, 0, 0] = values
    detector = _FixedScores()
    expected = float(np.quantile(values.numpy().astype(np.float64), 0.99))
    assert calibrate_threshold(detector, images, batch_size=3) == pytest.approx(expected)
    assert calibrate_threshold(detector, images, method="max", margin=0.05) == pytest.approx(0.45)
    # An iterable of single images or of batches gives the same answer; the class name reaches the detector.
    assert calibrate_threshold(detector, list(images), quantile=0.5, class_name="pcb") == pytest.approx(
        float(np.quantile(values.numpy().astype(np.float64), 0.5)))
    assert detector.seen_classes is not None and set(detector.seen_classes) == {"pcb"}
    assert calibrate_threshold(detector, [images[:4], images[4:]], method="max") == pytest.approx(0.40)
    with pytest.raises(ValueError, match="no known-good images"):
        calibrate_threshold(detector, [])
    with pytest.raises(ValueError, match="calibration method 'p99'"):
        calibrate_threshold(detector, images, method="p99")
