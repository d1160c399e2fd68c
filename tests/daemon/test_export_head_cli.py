"""`anomalyd export --model patchcore-head --head FILE --references DIR` through the real command line (in-process
`main`): a head trained on real metal_plate frames (../shared, linked, 64 px) passes the parity gate, its version
carries the head's digest, and `predict --export` on ONNX Runtime gives the scores `predict --head` gives."""

from __future__ import annotations

import json

import numpy as np
import pytest

from daemon.cli import main
from tests.model.test_supervised_export import SIZE, plate_files, trained_head

pytestmark = pytest.mark.shared


def test_export_a_trained_head_from_the_cli(samples_dir, tmp_path, capsys):
    good, defective, _ = plate_files(samples_dir)
    head_file = tmp_path / "head.safetensors"
    detector = trained_head(samples_dir)
    detector.checkpoint.save(head_file)
    refs, frames = tmp_path / "refs", tmp_path / "frames"
    for folder, files in ((refs, good[:4]), (frames, good[40:42] + defective[40:42])):
        folder.mkdir()
        for file in files:
            (folder / file.name).symlink_to(file.resolve())
    out = tmp_path / "head-export"
    common = ["--model", "patchcore-head", "--head", str(head_file), "--references", str(refs), "--image-size",
              str(SIZE), "--device", "cpu"]
    assert main(["export", *common, "--output", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["model"] == "patchcore-head" and summary["engine"] == "onnxruntime"
    assert summary["version"].startswith(f"patchcore-head-h{detector.checkpoint.digest()}-")
    assert all(summary["max_abs_diff"][k] <= summary["tolerance"][k] == 1e-4 for k in ("scores", "maps"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["details"]["n_references"] == 4 and manifest["details"]["trained"]

    torch_out, engine_out = tmp_path / "torch.npz", tmp_path / "engine.npz"
    assert main(["predict", *common, "--output", str(torch_out), str(frames)]) == 0
    assert main(["predict", "--export", str(out), "--engine", "onnxruntime", "--output", str(engine_out),
                 str(frames)]) == 0
    torch_scores, engine_scores = np.load(torch_out)["scores"], np.load(engine_out)["scores"]
    assert len(torch_scores) == 4 and engine_scores == pytest.approx(torch_scores, abs=1e-4)
    assert np.load(engine_out)["maps"].shape[0] == 4
