"""`anomalyd export` and `predict/eval --engine` through the real command line (in-process `main`)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from daemon.cli import main
from tests.model import golden

pytestmark = pytest.mark.shared

SIZE = "56"


def _tiny(golden_dir) -> list[str]:
    weights, config = golden.backbone_files(golden_dir)
    return ["--backbone", str(weights), "--backbone-config", str(config), "--image-size", SIZE]


def _inputs(golden_dir) -> list[str]:
    return [str(golden_dir / name) for name in golden.expected_json(golden_dir)["input_files"]][:3]


def test_export_then_predict_with_the_export_matches_torch(golden_dir, tmp_path, capsys):
    out = tmp_path / "clip-export"
    code = main(["export", "--model", "clip", *_tiny(golden_dir), "--class-names", "bottle,hazelnut",
                 "--check-images", _inputs(golden_dir)[0], "--output", str(out), "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["engine"] == "onnxruntime" and summary["max_abs_diff"]["maps"] <= summary["tolerance"]["maps"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parity"]["images"][-1] == "0.png" and manifest["classes"] == ["bottle", "hazelnut"]

    torch_out, engine_out = tmp_path / "torch.npz", tmp_path / "engine.npz"
    assert main(["predict", *_tiny(golden_dir), "--model", "clip", "--class-name", "hazelnut",
                 "--output", str(torch_out), *_inputs(golden_dir)]) == 0
    assert main(["predict", "--export", str(out), "--class-name", "hazelnut", "--output", str(engine_out),
                 *_inputs(golden_dir)]) == 0
    expected, found = np.load(torch_out), np.load(engine_out)
    assert str(found["model_version"]) == str(expected["model_version"])
    np.testing.assert_allclose(found["scores"], expected["scores"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(found["maps"], expected["maps"], atol=1e-4, rtol=0)


def test_predict_engine_exports_on_the_fly(golden_dir, tmp_path):
    prompts = ["--prompts", str(golden_dir / "prompts_official_format.pth")]
    torch_out, engine_out = tmp_path / "torch.npz", tmp_path / "engine.npz"
    assert main(["predict", *_tiny(golden_dir), *prompts, "--output", str(torch_out), *_inputs(golden_dir)]) == 0
    assert main(["predict", *_tiny(golden_dir), *prompts, "--engine", "openvino", "--batch-size", "2",
                 "--output", str(engine_out), *_inputs(golden_dir)]) == 0
    expected, found = np.load(torch_out), np.load(engine_out)
    np.testing.assert_allclose(found["scores"], expected["scores"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(found["maps"], expected["maps"], atol=1e-4, rtol=0)


def test_eval_on_an_engine_gives_the_torch_metrics(golden_dir, samples_dir, tmp_path, capsys):
    prompts = ["--prompts", str(golden_dir / "prompts_official_format.pth")]
    common = ["eval", "--data", str(samples_dir), *_tiny(golden_dir), *prompts, "--categories", "bottle",
              "--limit", "4", "--json"]
    assert main(common) == 0
    expected = json.loads(capsys.readouterr().out)
    assert main([*common, "--engine", "onnxruntime"]) == 0
    found = json.loads(capsys.readouterr().out)
    metrics = {k: v for k, v in expected["anomalyclip"]["mean"].items() if isinstance(v, float)}
    assert "pixel_auroc" in metrics
    assert {k: found["anomalyclip"]["mean"][k] for k in metrics} == pytest.approx(metrics, abs=1e-3)


def test_bad_export_requests(golden_dir, tmp_path, capsys):
    prompts = ["--prompts", str(golden_dir / "prompts_official_format.pth")]
    assert main(["export", *_tiny(golden_dir), *prompts, "--opset", "12", "--output", str(tmp_path / "x")]) == 1
    assert "opset 12 is not supported" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # a usage error: exports are float32
        main(["export", *_tiny(golden_dir), *prompts, "--dtype", "bfloat16", "--output", str(tmp_path / "x")])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["export", *_tiny(golden_dir), "--format", "tflite", "--output", str(tmp_path / "x")])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["predict", *_tiny(golden_dir), "--engine", "tensorrt", str(golden_dir / "inputs" / "0.png")])
    assert exc.value.code == 2
    assert main(["predict", "--export", str(tmp_path), str(golden_dir / "inputs" / "0.png")]) == 1
    assert "not an anomalyd export" in capsys.readouterr().err
