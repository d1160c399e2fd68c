"""Exports (ONNX Runtime, OpenVINO) of every model on the tiny golden CLIP: the parity gate, the exported engine
against PyTorch on real images, and every kind of unusable export refused with a message naming why."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from adapters.export import (
    ExportedDetector,
    ExportError,
    check_inputs,
    export_detector,
    load_export,
    read_manifest,
)
from model import create_detector
from model.preprocess import decode_image, fast_transform
from tests.model import golden

pytestmark = pytest.mark.shared

SIZE = 56  # a 4x4 patch grid: the smallest that holds WinCLIP's 3x3 windows, and quick to trace
CLASSES = ["bottle", "hazelnut"]


def tiny_options(golden_dir: Path, name: str) -> dict:
    weights, config = golden.backbone_files(golden_dir)
    options = {"backbone": str(weights), "backbone_config": str(config), "image_size": SIZE, "device": "cpu"}
    if name == "anomalyclip":
        options.update(prompts=str(golden_dir / "prompts_official_format.pth"), layers=(6, 12, 18, 24))
    if name == "adaclip":
        options.update(prompts=str(golden_dir.parent / "adaclip" / "adaclip_prompts_official_format.pth"),
                       class_name="bottle")
    return options


def tiny_detector(golden_dir: Path, name: str, **extra):
    return create_detector(name, **{**tiny_options(golden_dir, name), **extra})


def real_images(samples_dir: Path, count: int = 3) -> torch.Tensor:
    files = sorted(p for p in (samples_dir / "bottle" / "test").rglob("*.*") if "ground_truth" not in p.parts)
    files = files[:: max(1, len(files) // count)][:count]
    return torch.stack([fast_transform(decode_image(f), SIZE) for f in files])


@pytest.fixture(scope="module")
def exports(golden_dir, tmp_path_factory):
    """One ONNX export per model (made lazily, shared by the tests of this module)."""
    made: dict[str, tuple] = {}

    def get(name: str, export_format: str = "onnx"):
        key = f"{name}-{export_format}"
        if key not in made:
            detector = tiny_detector(golden_dir, name)
            folder = tmp_path_factory.mktemp("exports") / key
            sources = {"backbone": tiny_options(golden_dir, name)["backbone"]}
            manifest = export_detector(detector, folder, export_format=export_format, class_names=CLASSES,
                                       sources=sources)
            made[key] = (detector, folder, manifest)
        return made[key]

    return get


@pytest.mark.parametrize("name", ["anomalyclip", "clip", "clip-ac", "winclip", "adaclip"])
def test_onnx_export_reproduces_pytorch(name, exports, samples_dir):
    detector, folder, manifest = exports(name)
    # the manifest describes the export and what the gate measured
    assert manifest["model"] == name and manifest["version"] == detector.version
    assert manifest["image_size"] == SIZE and manifest["opset"] == 17
    assert manifest["input_names"][0] == "images" and manifest["output_names"] == ["scores", "maps"]
    assert manifest["file_digests"][manifest["files"]["graph"]]
    assert manifest["source_digests"]["backbone"].startswith("sha256:")
    parity = manifest["parity"]
    assert parity["engine"] == "onnxruntime" and len(parity["images"]) == 4
    assert all(parity["max_abs_diff"][k] <= manifest["tolerance"][k] for k in ("scores", "maps"))
    if name == "anomalyclip":
        assert manifest["input_names"] == ["images"]  # its text features are constants of the graph
    else:
        assert manifest["classes"] == CLASSES
    # the loaded export matches PyTorch on real images, batch of 3 with mixed classes, and batch of 1
    engine = load_export(folder, image_size=SIZE, version=detector.version)
    images = real_images(samples_dir)
    names = ["bottle", "hazelnut", "bottle"]
    expected = detector.predict(images, names)
    found = engine.predict(images, names)
    assert found.maps.shape == (3, SIZE, SIZE) and found.scores.shape == (3,)
    tolerance = manifest["tolerance"]
    np.testing.assert_allclose(found.scores, expected.scores, atol=tolerance["scores"], rtol=0)
    np.testing.assert_allclose(found.maps, expected.maps, atol=tolerance["maps"], rtol=0)
    one = engine.predict(images[1:2], ["hazelnut"])
    np.testing.assert_allclose(one.maps, expected.maps[1:2], atol=tolerance["maps"], rtol=0)
    if name != "anomalyclip":  # class-aware: another class really gives other results
        other = engine.predict(images[:1], ["hazelnut"])
        assert not torch.allclose(other.scores, found.scores[:1])


def test_unknown_class_is_refused_by_text_models_and_tokenised_by_adaclip(exports, samples_dir):
    _, folder, _ = exports("clip")
    with pytest.raises(ExportError, match=r"class name 'cable' is not in this export"):
        load_export(folder).predict(real_images(samples_dir, 1), ["cable"])
    detector, folder, _ = exports("adaclip")
    images = real_images(samples_dir, 1)
    found = load_export(folder).predict(images, ["cable"])  # AdaCLIP's class input is only token ids
    np.testing.assert_allclose(found.maps, detector.predict(images, ["cable"]).maps, atol=2e-4, rtol=0)


@pytest.mark.parametrize("name", ["anomalyclip", "adaclip"])
def test_openvino_export_reproduces_pytorch(name, exports, samples_dir):
    detector, folder, manifest = exports(name, "openvino")
    assert manifest["files"]["graph"] == "model.xml" and "model.bin" in manifest["file_digests"]
    assert manifest["parity"]["engine"] == "openvino"
    engine = load_export(folder)
    assert engine.engine == "openvino"
    images = real_images(samples_dir, 2)
    expected, found = detector.predict(images, ["bottle"] * 2), engine.predict(images, ["bottle"] * 2)
    np.testing.assert_allclose(found.maps, expected.maps, atol=manifest["tolerance"]["maps"], rtol=0)
    with pytest.raises(ExportError, match="cannot run on onnxruntime"):
        load_export(folder, "onnxruntime")


def test_onnx_export_runs_on_openvino_too(exports, samples_dir):
    detector, folder, manifest = exports("anomalyclip")
    engine = load_export(folder, "openvino")
    images = real_images(samples_dir, 2)
    np.testing.assert_allclose(engine.predict(images).scores, detector.predict(images).scores,
                               atol=manifest["tolerance"]["scores"], rtol=0)


def test_fewshot_references_are_folded_into_the_graph(golden_dir, samples_dir, tmp_path):
    references = sorted((samples_dir / "bottle" / "test" / "good").glob("*.*"))[:2]
    detector = tiny_detector(golden_dir, "clip", references=[str(p) for p in references], class_name="bottle")
    manifest = export_detector(detector, tmp_path / "fs", class_names=["bottle"])
    assert manifest["details"]["references"]["n_references"] == 2
    engine = load_export(tmp_path / "fs")
    images = real_images(samples_dir, 2)
    expected, found = detector.predict(images, ["bottle"] * 2), engine.predict(images, ["bottle"] * 2)
    np.testing.assert_allclose(found.maps, expected.maps, atol=manifest["tolerance"]["maps"], rtol=0)
    np.testing.assert_allclose(found.scores, expected.scores, atol=manifest["tolerance"]["scores"], rtol=0)
    assert engine.version == detector.version and "+ref-" in engine.version


# ------------------------------------------------------------------------------------------------ refusals
def _copy(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(folder, target)
    return target


def _edit_manifest(folder: Path, **changes) -> None:
    manifest = read_manifest(folder)
    manifest.update(changes)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_corrupted_or_mismatched_exports_are_refused(exports, tmp_path):
    _, folder, _ = exports("anomalyclip")
    copy = _copy(folder, tmp_path)
    data = bytearray((copy / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ExportError, match=r"digest mismatch for model.onnx"):
        load_export(copy)
    shutil.rmtree(copy)

    cases = {
        "format": ("anomalyd-export/0", r"export format 'anomalyd-export/0'"),
        "anomalyd_version": ("0.0.1", r"exported by anomalyd 0.0.1, this is anomalyd"),
        "opset": (9, r"opset 9 is not supported"),
    }
    for key, (value, message) in cases.items():
        copy = _copy(folder, tmp_path)
        _edit_manifest(copy, **{key: value})
        with pytest.raises(ExportError, match=message):
            load_export(copy)
        shutil.rmtree(copy)

    with pytest.raises(ExportError, match=rf"takes {SIZE} px images, but 112 px were asked for"):
        load_export(folder, image_size=112)
    with pytest.raises(ExportError, match=r"is model version .* not 'other'"):
        load_export(folder, version="other")
    with pytest.raises(ExportError, match=r"engine 'tensorrt' is not supported"):
        load_export(folder, "tensorrt")
    with pytest.raises(ExportError, match=r"source weights changed since the export \(backbone digest"):
        load_export(folder, sources={"backbone": str(golden_dir_file(folder))})
    with pytest.raises(ExportError, match="not an anomalyd export"):
        load_export(tmp_path)
    engine = load_export(folder)
    with pytest.raises(ValueError, match=r"the export expects \(B, 3, 56, 56\)"):
        engine.predict(torch.zeros(1, 3, 112, 112))


def golden_dir_file(folder: Path) -> Path:
    return folder / "model.onnx"  # any file whose digest is not the backbone's


def test_bad_export_requests_are_refused(golden_dir, tmp_path):
    detector = tiny_detector(golden_dir, "anomalyclip")
    for opset in (13, 21):
        with pytest.raises(ExportError, match=rf"opset {opset} is not supported: expected 14..20"):
            export_detector(detector, tmp_path / "x", opset=opset)
    with pytest.raises(ExportError, match=r"export format 'tflite' is not supported"):
        export_detector(detector, tmp_path / "x", export_format="tflite")
    with pytest.raises(ExportError, match=r"engine 'tensorrt' is not supported"):
        export_detector(detector, tmp_path / "x", engine="tensorrt")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="is not an earlier export"):
        export_detector(detector, tmp_path / "busy")
    hsf = tiny_detector(golden_dir, "adaclip", hsf=True)
    with pytest.raises(ExportError, match=r"--hsf cannot be exported: .*k-means"):
        export_detector(hsf, tmp_path / "hsf")
    half = tiny_detector(golden_dir, "clip", dtype="bfloat16")
    with pytest.raises(ExportError, match="export runs in float32"):
        export_detector(half, tmp_path / "half")


def test_parity_gate_rejects_an_export_that_differs(golden_dir, tmp_path, monkeypatch):
    detector = tiny_detector(golden_dir, "anomalyclip")
    original = ExportedDetector.predict

    def drifting(self, images, class_names=None):  # an engine that is off by 1e-3 on the maps
        prediction = original(self, images, class_names)
        prediction.maps += 1e-3
        return prediction

    monkeypatch.setattr(ExportedDetector, "predict", drifting)
    with pytest.raises(ExportError, match=r"does not reproduce PyTorch: maps of 'noise' differ by 0.001"):
        export_detector(detector, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    assert not list(tmp_path.glob(".bad*"))  # the staging folder is gone too


def test_missing_engine_names_the_extra(monkeypatch):
    import builtins

    from adapters.export import require_engine

    real_import = builtins.__import__

    def no_openvino(name, *args, **kwargs):
        if name == "openvino":
            raise ImportError("No module named 'openvino'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_openvino)
    with pytest.raises(ExportError, match=r"engine openvino is not installed .*pip install 'anomalyd\[openvino\]'"):
        require_engine("openvino")


def test_check_inputs_include_given_images(samples_dir):
    files = sorted((samples_dir / "bottle" / "test" / "good").glob("*.*"))[:1]
    names, images = check_inputs(SIZE, files)
    assert names[:4] == ["noise", "gradient-square", "flat", "strong-noise"] and names[4] == files[0].name
    assert images.shape == (5, 3, SIZE, SIZE)
    assert not torch.equal(images[0], images[3])


def test_patchcore_lite0_export_reproduces_pytorch(samples_dir, tmp_path):
    """PatchCore on the real EfficientNet-Lite0 weights, its memory bank a constant of the graph."""
    references = sorted((samples_dir / "bottle" / "test" / "good").glob("*.*"))[:2]
    detector = create_detector("patchcore", references=[str(p) for p in references], image_size=64, device="cpu")
    manifest = export_detector(detector, tmp_path / "pc")
    assert manifest["model"] == "patchcore" and manifest["input_names"] == ["images"]
    assert manifest["details"]["bank_rows"] == detector.bank.rows.shape[0]
    assert manifest["threshold_scale"]["scores"] == "distance >= 0, unbounded"
    engine = load_export(tmp_path / "pc", image_size=64)
    files = sorted(p for p in (samples_dir / "bottle" / "test").rglob("*.*") if "good" not in p.parts)[:3]
    images = torch.stack([fast_transform(decode_image(f), 64) for f in files])
    expected, found = detector.predict(images), engine.predict(images)
    assert float(expected.scores.min()) > 0  # real distances, not a degenerate bank
    np.testing.assert_allclose(found.scores, expected.scores, atol=manifest["tolerance"]["scores"], rtol=0)
    np.testing.assert_allclose(found.maps, expected.maps, atol=manifest["tolerance"]["maps"], rtol=0)
    np.testing.assert_allclose(engine.predict(images[2:]).maps, expected.maps[2:], atol=1e-3, rtol=0)
