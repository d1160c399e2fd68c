"""`anomalyd export --model patchcore` with its bank, through the real command line (in-process `main`): the export
passes the parity gate, carries the reference digest in its version, and `predict --export` gives the scores that
`predict --references` gives. Real EfficientNet-Lite0 weights at 64 px on synthetic textures (no ../shared)."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from daemon.cli import main


def _texture(seed: int) -> np.ndarray:
    base = cv2.resize(np.random.default_rng(7).integers(0, 256, (12, 12, 3)).astype(np.uint8), (96, 96),
                      interpolation=cv2.INTER_CUBIC).astype(np.int16)
    return np.clip(base + np.random.default_rng(seed).integers(-4, 5, base.shape), 0, 255).astype(np.uint8)


def test_export_patchcore_with_its_bank_from_the_cli(tmp_path, capsys):
    refs, frames = tmp_path / "refs", tmp_path / "frames"
    refs.mkdir()
    frames.mkdir()
    for index in range(3):
        assert cv2.imwrite(str(refs / f"ref{index}.png"), _texture(100 + index))
    good, bad = _texture(5), _texture(6)
    cv2.circle(bad, (48, 48), 10, (0, 0, 255), -1)
    assert cv2.imwrite(str(frames / "good.png"), good) and cv2.imwrite(str(frames / "bad.png"), bad)
    out = tmp_path / "patchcore-export"
    common = ["--model", "patchcore", "--image-size", "64", "--device", "cpu"]
    assert main(["export", *common, "--references", str(refs), "--output", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "+ref-" in summary["version"] and summary["version"].endswith("-k3")
    assert summary["max_abs_diff"]["scores"] <= summary["tolerance"]["scores"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"] == "patchcore" and manifest["details"]["n_references"] == 3

    torch_out, engine_out = tmp_path / "torch.npz", tmp_path / "engine.npz"
    assert main(["predict", *common, "--references", str(refs), "--output", str(torch_out), str(frames)]) == 0
    assert main(["predict", "--export", str(out), "--engine", "onnxruntime", "--output", str(engine_out),
                 str(frames)]) == 0
    torch_scores, engine_scores = np.load(torch_out)["scores"], np.load(engine_out)["scores"]
    assert engine_scores == pytest.approx(torch_scores, abs=1e-3)
    names = [str(p).rsplit("/", 1)[-1] for p in np.load(torch_out)["paths"]]
    assert torch_scores[names.index("bad.png")] > torch_scores[names.index("good.png")]
