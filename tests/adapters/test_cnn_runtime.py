"""PatchCore's CNN trunk on ONNX Runtime (adapters/cnn_runtime.py): the daemon's default CPU runtime gives the same
scores and maps as PyTorch on real frames, square or not, and a trunk that fails the parity gate stays on PyTorch."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from adapters import cnn_runtime
from model.geometry import Geometry, predict_frames
from model.runtime import trunk_compiler, use_trunk_compiler

pytestmark = [pytest.mark.shared]


def _hazelnut(samples_dir, resize: str):
    import cv2

    from model.fewshot import load_reference_images
    from model.patchcore import build_patchcore

    category = samples_dir / "hazelnut"
    detector = build_patchcore(max_bank_rows=0, geometry=Geometry(resize))
    detector.set_references(load_reference_images(sorted((category / "train" / "good").glob("*.jpg"))[:4], 256))
    tests = sorted((category / "test").glob("*/*.jpg"))
    frames = [cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB) for f in (tests[0], tests[-1])]
    frames.append(frames[1][40:360, :])  # not square: a fit input of another shape on the same session
    return detector, frames


def _predict(detector, frames, geometry: Geometry):
    with torch.inference_mode():
        scores, maps = predict_frames(detector, frames, geometry)
    return np.asarray(scores, dtype=np.float64), [np.asarray(m, dtype=np.float64) for m in maps]


@pytest.mark.parametrize("resize", ["squash", "fit"])
def test_onnxruntime_trunk_gives_pytorch_scores_and_maps(samples_dir, resize):
    detector, frames = _hazelnut(samples_dir, resize)
    geometry = Geometry(resize)
    use_trunk_compiler(None)
    torch_scores, torch_maps = _predict(detector, frames, geometry)
    assert detector.model.extractor._runner is None
    assert cnn_runtime.choose("auto") == "onnxruntime" and trunk_compiler() is cnn_runtime.onnxruntime_trunk
    scores, maps = _predict(detector, frames, geometry)
    runner = detector.model.extractor._runner
    assert isinstance(runner, cnn_runtime.OnnxTrunk) and runner.parity <= cnn_runtime.PARITY_TOLERANCE
    assert np.abs(scores - torch_scores).max() <= 1e-4 * max(1.0, np.abs(torch_scores).max())
    for got, want in zip(maps, torch_maps, strict=True):
        assert got.shape == want.shape and np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())
    assert not np.allclose(scores[0], scores[1])  # real, different frames: the comparison is not of constants


def test_a_trunk_failing_the_parity_gate_stays_on_pytorch(samples_dir, monkeypatch, caplog):
    detector, frames = _hazelnut(samples_dir, "squash")
    use_trunk_compiler(None)
    want, _ = _predict(detector, frames, Geometry("squash"))
    monkeypatch.setattr(cnn_runtime, "_runners", {})
    monkeypatch.setattr(cnn_runtime, "PARITY_TOLERANCE", -1.0)  # nothing can pass
    cnn_runtime.choose("onnxruntime")
    with caplog.at_level(logging.WARNING, logger="anomalyd.cnn_runtime"):
        got, _ = _predict(detector, frames, Geometry("squash"))
    assert detector.model.extractor._runner is None
    assert "stays on PyTorch" in caplog.text
    assert cnn_runtime.in_effect().startswith("torch (ONNX Runtime refused")  # what health shows
    assert np.array_equal(got, want)


def test_a_runtime_failing_at_run_time_falls_back_to_pytorch(samples_dir, monkeypatch, caplog):
    """A fault of ONNX Runtime while inspecting (not caught by the gate) must not stop the line."""
    detector, frames = _hazelnut(samples_dir, "squash")
    use_trunk_compiler(None)
    want, _ = _predict(detector, frames, Geometry("squash"))
    monkeypatch.setattr(cnn_runtime, "_runners", {})
    cnn_runtime.choose("onnxruntime")
    _predict(detector, frames[:1], Geometry("squash"))  # compiled, through its gate
    runner = detector.model.extractor._runner
    assert isinstance(runner, cnn_runtime.OnnxTrunk) and cnn_runtime.in_effect() == "onnxruntime"

    class Broken:
        def run(self, *_args):
            raise RuntimeError("out of arena memory")

    monkeypatch.setattr(runner, "session", Broken())
    with caplog.at_level(logging.WARNING, logger="anomalyd.backbone"):
        got, _ = _predict(detector, frames, Geometry("squash"))
    assert "running on PyTorch from now on" in caplog.text
    assert np.array_equal(got, want) and detector.model.extractor._runner is None
    assert cnn_runtime.in_effect() == "torch (ONNX Runtime failed at run time: out of arena memory)"


def test_choosing_the_runtime():
    assert cnn_runtime.choose("torch") == "torch" and trunk_compiler() is None and cnn_runtime.in_effect() == "torch"
    with pytest.raises(ValueError, match="expected one of auto, torch, onnxruntime"):
        cnn_runtime.choose("tensorrt")
