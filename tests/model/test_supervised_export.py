"""patchcore-head exported (model/supervised/export.py through adapters/export.py's parity gate): a head trained on
real metal_plate frames (../shared, 64 px, real EfficientNet-Lite0 weights) runs on ONNX Runtime and OpenVINO with
PyTorch's scores and maps; the export carries the trained head, not the untrained one; a fit-geometry detector and a
detector without references are refused with the reason."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from adapters.export import ExportError, export_detector, load_export
from model import create_detector
from model.geometry import make_geometry
from model.preprocess import decode_image, fast_transform
from model.supervised import HeadTrainingConfig, PatchcoreHeadDetector, fit_head

pytestmark = pytest.mark.shared

SIZE = 64


def plate_files(samples_dir: Path) -> tuple[list[Path], list[Path], Path]:
    root = samples_dir / "metal_plate"
    return (sorted((root / "test" / "good").glob("*.png")), sorted((root / "test" / "defect").glob("*.png")),
            root / "ground_truth" / "defect")


def load(files: list[Path]) -> torch.Tensor:
    return torch.stack([fast_transform(decode_image(f), SIZE) for f in files])


def mask_of(folder: Path, frame: Path) -> torch.Tensor:
    mask = cv2.imread(str(folder / f"{frame.stem}_mask.png"), cv2.IMREAD_GRAYSCALE)
    return torch.from_numpy(cv2.resize(mask, (SIZE, SIZE), interpolation=cv2.INTER_NEAREST) > 127).float()


def trained_head(samples_dir: Path) -> PatchcoreHeadDetector:
    """A head trained in seconds on 4 references, 4 labelled defects (2 with masks) and 2 labelled normals."""
    good, defective, masks = plate_files(samples_dir)
    detector = create_detector("patchcore-head", references_later=True, image_size=SIZE, device="cpu")
    fit_head(detector, load(good[:4]), load(defective[:4]), torch.stack([mask_of(masks, f) for f in defective[:4]]),
             torch.tensor([True, True, False, False]), HeadTrainingConfig(steps=30, synthetic_per_reference=1),
             normals=load(good[4:6]))
    return detector


@pytest.fixture(scope="module")
def head(samples_dir) -> PatchcoreHeadDetector:
    return trained_head(samples_dir)


def test_trained_head_on_onnxruntime_reproduces_pytorch(head, samples_dir, tmp_path):
    good, defective, _ = plate_files(samples_dir)
    manifest = export_detector(head, tmp_path / "head", check_images=defective[10:12])
    assert manifest["model"] == "patchcore-head" and manifest["version"] == head.version
    assert manifest["version"].startswith("patchcore-head-h") and "-h0-" not in manifest["version"]
    details = manifest["details"]
    assert details["trained"] and details["head_digest"] == head.checkpoint.digest()
    assert details["bank_rows"] == head.bank.rows.shape[0] and details["n_references"] == 4
    parity = manifest["parity"]
    assert parity["engine"] == "onnxruntime" and parity["images"][-2:] == [f.name for f in defective[10:12]]
    assert all(parity["max_abs_diff"][k] <= manifest["tolerance"][k] == 1e-4 for k in ("scores", "maps"))
    assert manifest["threshold_scale"]["scores"] == [0.0, 1.0]

    images = load(good[20:23] + defective[20:23])  # frames neither trained on nor checked by the gate
    engine = load_export(tmp_path / "head", image_size=SIZE)
    expected, found = head.predict(images), engine.predict(images)
    assert found.maps.shape == (6, SIZE, SIZE)
    np.testing.assert_allclose(found.scores, expected.scores, atol=1e-4, rtol=0)
    np.testing.assert_allclose(found.maps, expected.maps, atol=1e-4, rtol=0)
    np.testing.assert_allclose(engine.predict(images[4:]).scores, expected.scores[4:], atol=1e-4, rtol=0)
    assert float(found.maps.min()) >= 0.0 and float(found.maps.max()) <= 1.0

    # The graph holds the trained head: the untrained one on the same bank scores these frames otherwise.
    untrained = PatchcoreHeadDetector(head.patchcore, head.untrained_checkpoint())
    assert float((untrained.predict(images).scores - found.scores).abs().max()) > 1e-2


def test_trained_head_on_openvino_passes_the_gate(head, tmp_path):
    manifest = export_detector(head, tmp_path / "ov", export_format="openvino")
    assert manifest["parity"]["engine"] == "openvino" and (tmp_path / "ov" / "model.xml").is_file()
    assert all(manifest["parity"]["max_abs_diff"][k] <= 1e-4 for k in ("scores", "maps"))


def test_untrained_head_exports_and_ranks_like_patchcore(samples_dir, tmp_path):
    good, defective, _ = plate_files(samples_dir)
    detector = create_detector("patchcore-head", references=load(good[:4]), image_size=SIZE, device="cpu")
    manifest = export_detector(detector, tmp_path / "h0")
    assert "-h0-" in manifest["version"] and manifest["details"]["trained"] is False
    images = load(good[30:33] + defective[30:33])
    found = load_export(tmp_path / "h0", image_size=SIZE).predict(images)
    np.testing.assert_allclose(found.scores, detector.predict(images).scores, atol=1e-4, rtol=0)
    # the untrained head PyTorch made on its first predict keeps the name: the daemon's export and thresholds too
    assert detector.version == manifest["version"]
    patchcore = detector.patchcore.predict(images)
    # an increasing function of PatchCore's distance cell by cell: the maps' maxima rank frames alike
    assert np.argsort(found.maps.flatten(1).amax(1).numpy()).tolist() == \
        np.argsort(patchcore.maps.flatten(1).amax(1).numpy()).tolist()


def test_what_cannot_be_exported_is_refused_with_the_reason(samples_dir, tmp_path):
    good, _, _ = plate_files(samples_dir)
    without_bank = create_detector("patchcore-head", references_later=True, image_size=SIZE, device="cpu")
    with pytest.raises(ExportError, match="without a memory bank cannot be exported: give it normal references"):
        export_detector(without_bank, tmp_path / "none")
    fit = create_detector("patchcore-head", references_later=True, image_size=SIZE, device="cpu",
                          geometry=make_geometry("fit"))
    fit.set_references([load(good[:1])])
    with pytest.raises(ExportError, match=r"resize 'fit' cannot be exported: an export is a fixed square graph"):
        export_detector(fit, tmp_path / "fit")
    assert not (tmp_path / "none").exists() and not (tmp_path / "fit").exists()
