"""`anomalyd predict | train | eval | weights` through the real command line (in-process `main`)."""

from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pytest

from daemon.cli import main
from tests.model import golden


def _tiny(golden_dir, size=None):
    weights, config = golden.backbone_files(golden_dir)
    args = ["--backbone", str(weights), "--backbone-config", str(config)]
    return args + (["--image-size", str(size)] if size else [])


def test_predict_reproduces_the_golden_maps(golden_dir, tmp_path):
    """The issue's acceptance command: maps in model space and scores equal the official outputs."""
    out = tmp_path / "out.npz"
    inputs = [str(golden_dir / name) for name in golden.expected_json(golden_dir)["input_files"]]
    code = main(["predict", *_tiny(golden_dir), "--prompts", str(golden_dir / "prompts_official_format.pth"),
                 "--layers", "6,12,18,24", "--reference-preprocessing", "--map-size", "model",
                 "--output", str(out), *inputs])
    assert code == 0
    result = np.load(out)
    expected = golden.expected(golden_dir)
    assert list(result["paths"]) == inputs
    np.testing.assert_allclose(result["scores"], expected["L6-12-18-24/image_scores"].numpy(), atol=1e-5)
    np.testing.assert_allclose(result["maps"], expected["L6-12-18-24/anomaly_maps"].numpy(), atol=1e-4)


def test_predict_reports_bad_files_and_scores_the_rest(golden_dir, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    rgb = np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)
    cv2.imwrite(str(folder / "ok.png"), rgb)
    cv2.imwrite(str(folder / "gray.png"), rgb[:, :, 0])
    cv2.imwrite(str(folder / "deep.png"), rgb.astype(np.uint16) * 257)
    cv2.imwrite(str(folder / "rgba.png"), np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)]))
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "corrupt.png").write_bytes((folder / "ok.png").read_bytes()[:100])
    out = tmp_path / "out.npz"
    code = main(["predict", *_tiny(golden_dir, 112), "--prompts", str(golden_dir / "prompts_official_format.pth"),
                 "--map-size", "input", "--overlays", str(tmp_path / "ov"), "--output", str(out), str(folder)])
    assert code == 0
    result = np.load(out)
    assert sorted(p.rsplit("/", 1)[1] for p in result["paths"]) == ["deep.png", "gray.png", "ok.png", "rgba.png"]
    assert result["maps"].shape == (4, 60, 80)
    errors = " ".join(result["errors"])
    assert "empty.jpg" in errors and "corrupt.png" in errors
    assert "empty.jpg" in capsys.readouterr().err
    assert len(list((tmp_path / "ov").glob("*.jpg"))) == 4


def test_usage_errors_exit_2(golden_dir, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["predict", "--model", "nope", str(tmp_path)])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["predict", *_tiny(golden_dir), str(tmp_path / "missing.png")])
    assert exc.value.code == 2


def test_runtime_errors_exit_1_with_a_clear_message(golden_dir, tmp_path, capsys):
    image = golden_dir / "inputs" / "0.png"
    assert main(["predict", *_tiny(golden_dir), "--prompts", str(tmp_path / "none.pth"), str(image)]) == 1
    assert "none.pth does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_writes_the_report(golden_dir, samples_dir, tmp_path, capsys):
    report = tmp_path / "report"
    code = main(["eval", "--data", str(samples_dir), *_tiny(golden_dir, 112), "--categories", "bottle,cubes",
                 "--limit", "6", "--prompts", str(golden_dir / "prompts_official_format.pth"),
                 "--report", str(report), "--overlays", "2"])
    assert code == 0
    metrics = json.loads((report / "metrics.json").read_text())
    per_category = metrics["models"]["anomalyclip"]["per_category"]
    assert set(per_category) == {"bottle", "cubes"}
    assert per_category["bottle"]["n_images"] == 6
    assert "| bottle |" in capsys.readouterr().out
    assert (report / "curves" / "anomalyclip" / "bottle_image_roc.png").is_file()
    assert len(list((report / "overlays" / "anomalyclip" / "bottle").glob("*.jpg"))) == 2


@pytest.mark.slow
def test_train_then_resume_on_a_folder(golden_dir, samples_dir, tmp_path):
    data = tmp_path / "data" / "bottle"
    shutil.copytree(samples_dir / "bottle", data)
    output = tmp_path / "prompts.safetensors"
    args = ["train", "--data", str(data), *_tiny(golden_dir, 112), "--output", str(output), "--batch-size", "8"]
    assert main([*args, "--epochs", "1"]) == 0
    assert main([*args, "--epochs", "2"]) == 0  # resumes after epoch 1
    from model import load_prompts

    meta = load_prompts(output).metadata
    assert meta["epochs_done"] == 2 and len(meta["history"]) == 2
    assert meta["class_names"] == ["bottle"]
    # the trained prompts are usable for prediction
    out = tmp_path / "out.npz"
    assert main(["predict", *_tiny(golden_dir, 112), "--prompts", str(output), "--output", str(out),
                 str(data / "test" / "good")]) == 0
    assert np.load(out)["scores"].shape == (9,)


def test_weights_fetch_offline_says_what_to_download_and_where(tmp_path, monkeypatch, capsys):
    from adapters import weights
    from tests.services import free_port

    monkeypatch.setenv("ANOMALYD_CACHE", str(tmp_path / "cache"))
    from dataclasses import replace

    known = weights.released()
    unreachable = replace(known["anomalyclip-visa"], url=f"http://127.0.0.1:{free_port()}/epoch_15.pth")
    monkeypatch.setattr(weights, "released", lambda: {**known, "anomalyclip-visa": unreachable})
    code = main(["weights", "fetch", "--skip-backbone", "--prompts", "anomalyclip-visa"])
    err = capsys.readouterr().err
    assert code == 1
    assert "could not download" in err and str(tmp_path / "cache" / "prompts" / "anomalyclip-visa.pth") in err


def test_named_prompts_must_be_fetched_first(tmp_path, monkeypatch):
    from adapters.weights import WeightsError, resolve_prompts

    monkeypatch.setenv("ANOMALYD_CACHE", str(tmp_path))
    with pytest.raises(WeightsError, match="anomalyd weights fetch"):
        resolve_prompts("anomalyclip-mvtec")
