"""PatchCore on the real EfficientNet-Lite0 weights: parity with anomalib 2.7.0 (../shared/golden/patchcore), the
coreset's recall against the full bank, the chunked neighbour search, frozen BatchNorm, generic timm backbones,
banks saved and checked, and the errors bad references get."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model import create_detector
from model.fewshot import ReferenceBank, ReferencesError
from model.patchcore import (
    BackboneError,
    PatchcoreBank,
    build_patchcore,
    clip_to_tf,
    greedy_coreset,
    nearest_neighbor,
)
from model.patchcore.backbone import lite_weights_file
from model.preprocess import OPENAI_MEAN, OPENAI_STD
from tests.conftest import require

FEATURE_TOL = 1e-4  # relative to each tensor's max (the golden README's tolerances)
SCORE_TOL = 1e-3


@pytest.fixture(scope="module")
def patchcore_golden(shared_dir: Path) -> Path:
    path = shared_dir / "golden" / "patchcore"
    require((path / "expected.safetensors").is_file(), f"{path}/expected.safetensors is absent")
    return path


@pytest.fixture(scope="module")
def expected(patchcore_golden: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(patchcore_golden / "expected.safetensors"))


@pytest.fixture(scope="module")
def lite0():
    return build_patchcore(device="cpu")


def tf_to_clip(images: torch.Tensor) -> torch.Tensor:
    """The project's input normalisation of TF-normalised images (inverse of clip_to_tf)."""
    mean = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    return ((images * 0.5 + 0.5) - mean) / std


def relative(actual: torch.Tensor, wanted: torch.Tensor) -> float:
    return float((actual.float() - wanted.float()).abs().max() / wanted.float().abs().max())


def test_weights_are_the_fixtures_file(patchcore_golden: Path) -> None:
    meta = json.loads((patchcore_golden / "expected.json").read_text())
    path = lite_weights_file("efficientnet-lite0")
    assert path.name == meta["weights"]["file"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == meta["weights"]["sha256"]


@pytest.mark.shared
def test_parity_with_anomalib_patchcore(lite0, expected) -> None:
    model = lite0.model
    features = model.features(expected["test_inputs"])
    assert relative(features[0], expected["test_features.blocks.4"]) < FEATURE_TOL
    assert relative(features[1], expected["test_features.blocks.10"]) < FEATURE_TOL
    embedding = model.embed(expected["test_inputs"])
    assert relative(embedding, expected["test_embedding"]) < FEATURE_TOL
    bank = model.reference_embeddings(expected["reference_inputs"])
    assert bank.shape == expected["memory_bank"].shape
    assert relative(bank, expected["memory_bank"]) < FEATURE_TOL
    model.set_memory_bank(bank)
    scores, _, _ = model.patch_scores(embedding)
    assert relative(scores.reshape(-1, 32, 32), expected["patch_scores"]) < SCORE_TOL
    image_scores, maps = model(expected["test_inputs"])
    assert relative(image_scores, expected["image_scores"]) < SCORE_TOL
    assert relative(maps, expected["anomaly_maps"]) < SCORE_TOL
    # real detections: both defective cubes above both good ones
    assert image_scores[2:].min() > image_scores[:2].max() + 15


@pytest.mark.shared
def test_detector_on_project_inputs_matches_golden(expected) -> None:
    """Through create_detector with in-memory references in the project's (CLIP) normalisation."""
    detector = create_detector("patchcore", references=tf_to_clip(expected["reference_inputs"]), device="cpu")
    assert detector.bank.rows.shape == (4096, 152)  # full bank: 4 references x 32x32 patches
    prediction = detector.predict(tf_to_clip(expected["test_inputs"]))
    assert relative(prediction.scores, expected["image_scores"]) < SCORE_TOL
    assert relative(prediction.maps, expected["anomaly_maps"]) < SCORE_TOL
    assert prediction.maps.shape == (4, 256, 256)
    assert detector.version.startswith("patchcore-efficientnet-lite0-t4-10-s256+ref-")
    assert torch.allclose(clip_to_tf(tf_to_clip(expected["test_inputs"][:1])), expected["test_inputs"][:1],
                          atol=1e-5)


def test_backbone_stays_frozen_in_eval_mode(lite0) -> None:
    lite0.model.train()
    lite0.model.extractor.model.train(True)
    batch_norms = [m for m in lite0.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert batch_norms and not any(m.training for m in batch_norms)
    assert not any(p.requires_grad for p in lite0.model.parameters())
    before = batch_norms[0].running_mean.clone()
    lite0.build_bank(torch.randn(2, 3, 256, 256))
    assert torch.equal(batch_norms[0].running_mean, before)


def test_chunked_nearest_neighbour_equals_brute_force() -> None:
    generator = torch.Generator().manual_seed(0)
    queries, bank = torch.randn(300, 24, generator=generator), torch.randn(1000, 24, generator=generator)
    wanted = torch.cdist(queries, bank)
    distance, index = nearest_neighbor(queries, bank, max_elements=4096)  # forces chunks on both sides
    assert torch.allclose(distance, wanted.min(1).values, atol=1e-4)
    assert torch.equal(index, wanted.argmin(1))


@pytest.mark.shared
def test_coreset_recall_against_the_full_bank(lite0, expected) -> None:
    model = lite0.model
    full = model.reference_embeddings(expected["reference_inputs"])
    chosen = greedy_coreset(full, 410)  # 10 %, anomalib's default ratio
    assert torch.equal(chosen, greedy_coreset(full, 410)), "the coreset must be deterministic"
    assert len(set(chosen.tolist())) == 410
    queries = model.flatten(model.embed(expected["test_inputs"]))
    full_scores, _ = nearest_neighbor(queries, full)
    core_scores, _ = nearest_neighbor(queries, full[chosen])
    # recall of the anomalous patches: of the top 2 % patches by the full bank, the coreset keeps >= 90 % in its top 2 %
    top = max(1, int(0.02 * queries.shape[0]))
    recall = len(set(full_scores.topk(top).indices.tolist()) & set(core_scores.topk(top).indices.tolist())) / top
    assert recall >= 0.9, recall
    # image-level: the max patch distance moves by under 10 %, and the defective cubes stay above the good ones
    per_image_full = full_scores.reshape(4, -1).amax(1)
    per_image_core = core_scores.reshape(4, -1).amax(1)
    assert ((per_image_core - per_image_full).abs() / per_image_full).max() < 0.10
    assert per_image_core[2:].min() > per_image_core[:2].max()
    # greedy covers the bank better than a random subset of the same size
    covering = nearest_neighbor(full, full[chosen])[0].max()
    random_subset = torch.randperm(full.shape[0], generator=torch.Generator().manual_seed(1))[:410]
    assert covering < nearest_neighbor(full, full[random_subset])[0].max()


def test_large_banks_are_reduced_by_the_coreset(lite0) -> None:
    lite0.max_bank_rows = 1500
    try:
        bank = lite0.build_bank(torch.randn(2, 3, 256, 256))
    finally:
        lite0.max_bank_rows = 16384
    assert bank.rows.shape == (1500, 152)
    assert bank.metadata["full_rows"] == "2048"


def write_images(folder: Path, count: int, size: int = 64) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    files = []
    for index in range(count):
        path = folder / f"good_{index}.png"
        Image.fromarray(rng.integers(100, 140, (size, size, 3), dtype=np.uint8)).save(path)
        files.append(path)
    return files


def test_references_folder_bank_saved_reused_and_rebuilt(tmp_path: Path) -> None:
    folder = tmp_path / "refs"
    write_images(folder, 2)
    cache = tmp_path / "bank.safetensors"
    detector = create_detector("patchcore", references=folder, references_cache=cache, image_size=64, device="cpu")
    assert cache.is_file() and detector.bank.n_references == 2 and detector.bank.rows.shape == (2 * 64, 152)
    stamp = cache.stat().st_mtime_ns
    again = create_detector("patchcore", references=folder, references_cache=cache, image_size=64, device="cpu")
    assert cache.stat().st_mtime_ns == stamp and again.bank.digest == detector.bank.digest
    write_images(tmp_path / "more", 3)
    (tmp_path / "more" / "good_2.png").rename(folder / "good_2.png")
    rebuilt = create_detector("patchcore", references=folder, references_cache=cache, image_size=64, device="cpu")
    assert rebuilt.bank.n_references == 3 and rebuilt.bank.digest != detector.bank.digest
    # a saved bank is itself usable as references
    from_bank = create_detector("patchcore", references=cache, image_size=64, device="cpu")
    assert torch.equal(from_bank.bank.rows, rebuilt.bank.rows)
    images = torch.randn(2, 3, 64, 64)
    assert torch.allclose(from_bank.predict(images).scores, rebuilt.predict(images).scores)


def test_bank_size_option_rebuilds_the_cached_bank_and_names_the_version(tmp_path: Path) -> None:
    folder = tmp_path / "refs"
    write_images(folder, 2)
    cache = tmp_path / "bank.safetensors"
    full = create_detector("patchcore", references=folder, references_cache=cache, image_size=64, device="cpu")
    assert full.bank.rows.shape[0] == 128 and not full.version.endswith("-m100")
    reduced = create_detector("patchcore", references=folder, references_cache=cache, image_size=64, device="cpu",
                              max_bank_rows=100)
    # same files, other bank size: the cache is rebuilt, not reused, and the version (thresholds) differs
    assert reduced.bank.rows.shape[0] == 100 and reduced.version == full.version + "-m100"
    again = create_detector("patchcore", references=folder, references_cache=cache, image_size=64, device="cpu",
                            max_bank_rows=0)
    assert again.bank.rows.shape[0] == 128 and again.version == full.version


def test_patchcore_without_references_says_so() -> None:
    with pytest.raises(ReferencesError, match="patchcore needs normal references"):
        create_detector("patchcore", device="cpu")


def test_bad_references_are_named(tmp_path: Path, lite0) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ReferencesError, match=re.escape(str(empty))):
        create_detector("patchcore", references=empty, device="cpu")
    broken = tmp_path / "broken" / "frame.png"
    broken.parent.mkdir()
    broken.write_bytes(b"not an image")
    with pytest.raises(ReferencesError, match=re.escape("frame.png")):
        create_detector("patchcore", references=broken.parent, device="cpu")
    with pytest.raises(ReferencesError, match="128x128, the detector uses 256x256"):
        lite0.set_references(torch.zeros(2, 3, 128, 128))
    with pytest.raises(ReferencesError, match="1 channels given"):
        lite0.set_references(torch.zeros(2, 1, 256, 256))
    with pytest.raises(ReferencesError, match="at least one"):
        lite0.set_references(torch.zeros(0, 3, 256, 256))


def test_bank_of_another_model_is_refused(tmp_path: Path, lite0) -> None:
    other = build_patchcore(taps=(4, 8), image_size=64, device="cpu")
    path = other.build_bank(torch.randn(1, 3, 64, 64)).save(tmp_path / "other.safetensors")
    with pytest.raises(ReferencesError, match="taps '4,8', but the detector uses '4,10'"):
        lite0.load_references(path)
    resnet = build_patchcore(backbone="resnet18", weights="random", image_size=64, device="cpu")
    path = resnet.build_bank(torch.randn(1, 3, 64, 64)).save(tmp_path / "resnet.safetensors")
    with pytest.raises(ReferencesError, match="backbone 'resnet18'"):
        lite0.load_references(path)
    clip_bank = ReferenceBank(features=[torch.zeros(4, 8)], metadata={"format": "anomalyd-reference-bank/1"})
    path = clip_bank.save(tmp_path / "clip.safetensors")
    with pytest.raises(ReferencesError, match="not a PatchCore memory bank"):
        lite0.load_references(path)
    assert PatchcoreBank.load(tmp_path / "other.safetensors").metadata["taps"] == "4,8"


def test_any_timm_cnn_with_named_taps(tmp_path: Path) -> None:
    detector = build_patchcore(backbone="resnet18", weights="random", taps="layer2,layer3", image_size=64,
                               device="cpu")
    bank = detector.set_references(torch.randn(2, 3, 64, 64))
    assert bank.rows.shape == (2 * 8 * 8, 128 + 256)  # stride 8 grid, layer2 + layer3 channels
    assert detector.predict(torch.randn(1, 3, 64, 64)).maps.shape == (1, 64, 64)
    # weights from a local file, in either layout
    import timm

    net = timm.create_model("resnet18", pretrained=False)
    torch.save(net.state_dict(), tmp_path / "resnet18.pth")
    loaded = build_patchcore(backbone="resnet18", weights=tmp_path / "resnet18.pth", image_size=64, device="cpu")
    assert loaded.model.taps == ("layer2", "layer3") and loaded.weights == "resnet18.pth"
    with pytest.raises(BackboneError, match="needs weights"):
        build_patchcore(backbone="wide_resnet50_2")
    with pytest.raises(BackboneError, match="tap 'layer9'"):
        build_patchcore(backbone="resnet18", weights="random", taps="layer9")
    with pytest.raises(BackboneError, match="122 tensors, the architecture has 218: another network"):
        build_patchcore(backbone="resnet34", weights=tmp_path / "resnet18.pth")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.shared
def test_same_code_on_cuda(expected) -> None:
    detector = build_patchcore(device="cuda")
    detector.set_references(tf_to_clip(expected["reference_inputs"]))
    prediction = detector.predict(tf_to_clip(expected["test_inputs"]))
    assert relative(prediction.scores.cpu(), expected["image_scores"]) < 1e-2
