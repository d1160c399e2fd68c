"""`anomalyd eval --model patchcore --shots K --seed S` through the real command line (in-process `main`) on a real
category: the printed metrics are those of the model path (model/kshot.py's split, references → memory bank, the
test set scored), and a K no reference pool can give is a usage error naming the category and its pool."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from daemon.cli import main
from model import create_detector
from model.dataset_loading import load_image, load_mask
from model.datasets import discover
from model.kshot import kshot_split

CATEGORY = "bottle"  # 13 test images after the pool is held out: fast on 2 cores
SHOTS, SEED = 1, 1  # seed 0 draws another reference: pixel AUROC 0.98915 instead of 0.98855


def _eval(samples_dir: Path, *extra: str) -> int:
    return main(["eval", "--data", str(samples_dir), "--model", "patchcore", "--categories", CATEGORY,
                 "--device", "cpu", *extra])


@pytest.mark.shared
@pytest.mark.slow
def test_kshot_eval_prints_the_model_paths_metrics(samples_dir: Path, capsys) -> None:
    assert _eval(samples_dir, "--shots", str(SHOTS), "--seed", str(SEED), "--json") == 0
    printed = json.loads(capsys.readouterr().out)["patchcore"]["per_category"][CATEGORY]

    # The same protocol by hand: the split, a bank from the K references, every test image scored.
    tests_all = [s for s in discover(samples_dir, split="test") if s.category == CATEGORY]
    split = kshot_split(tests_all, SHOTS, SEED, train_samples=discover(samples_dir, split="train"))
    detector = create_detector("patchcore", references_later=True, device="cpu")
    size = detector.image_size
    detector.load_references([s.path for s in split.references[CATEGORY]],
                             transform=lambda path, side: load_image(path, side, "fast"))
    tests = split.tests[CATEGORY]
    with torch.no_grad():
        prediction = detector.predict(torch.stack([load_image(s.path, size, "fast") for s in tests]))
    labels = np.array([s.label for s in tests])
    image_auroc = roc_auc_score(labels, prediction.scores.numpy())
    masks = np.stack([load_mask(s, size).numpy() for s in tests]) > 0.5
    pixel_auroc = roc_auc_score(masks.reshape(-1), prediction.maps.float().numpy().reshape(-1))

    assert (printed["n_images"], printed["n_anomalous"]) == (len(tests), int(labels.sum()))
    assert printed["image_auroc"] == pytest.approx(image_auroc, abs=1e-9)
    # The pixel AUROC fingerprints the reference drawn: another seed's bank moves it by ~6e-4.
    assert printed["pixel_auroc"] == pytest.approx(pixel_auroc, abs=1e-5)
    # Real defects found with the real Lite0 weights (measured 1.0 / 0.9885).
    assert printed["image_auroc"] >= 0.95 and printed["pixel_auroc"] >= 0.97


@pytest.mark.shared
def test_more_shots_than_the_pool_is_a_usage_error_naming_the_pool(samples_dir: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        _eval(samples_dir, "--shots", "9")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"{CATEGORY} left out of the 9-shot evaluation" in err and "reference pool of" in err
    assert "--shots 9: no category has enough normal images for references" in err
    with pytest.raises(SystemExit) as exc:
        _eval(samples_dir, "--shots", "-1")
    assert exc.value.code == 2
    assert "--shots -1: expected at least 1 reference image" in capsys.readouterr().err


@pytest.mark.shared
def test_patchcore_eval_without_shots_says_it_needs_references(samples_dir: Path, capsys) -> None:
    assert _eval(samples_dir) == 1
    assert "patchcore needs normal references" in capsys.readouterr().err


@pytest.mark.shared
@pytest.mark.slow
def test_kshot_eval_reports_the_operating_point_of_the_daemons_rule(samples_dir: Path, tmp_path, capsys) -> None:
    """FRR achieved and miss rate at the threshold the daemon's rule derives from the K references alone."""
    from daemon.references.calibration import frr_bound

    report = tmp_path / "report"
    assert _eval(samples_dir, "--shots", "3", "--seed", "0", "--json", "--report", str(report), "--overlays", "0",
                 "--false-reject-rate", "0.01") == 0
    printed = json.loads(capsys.readouterr().out)["patchcore"]
    point = printed["operating_point"][CATEGORY]
    saved = json.loads((report / "operating_point.json").read_text())
    scores = saved["scores"]["patchcore"][CATEGORY]
    # the daemon's bound on the references' known-good scores (2 held out of 3, each with 8 views)
    assert len(scores["known_good"]) == point["known_good"] == 3 * 9
    assert point["threshold"] == pytest.approx(frr_bound(scores["known_good"], 0.01).value + 1e-6)
    labels, test = np.array(scores["labels"]), np.array(scores["test"])
    assert (point["normals"], point["anomalies"]) == (int((labels == 0).sum()), int((labels == 1).sum()))
    assert point["normals"] + point["anomalies"] == printed["per_category"][CATEGORY]["n_images"]
    assert point["false_rejects"] == int(((test >= point["threshold"]) & (labels == 0)).sum())
    assert point["missed"] == int(((test < point["threshold"]) & (labels == 1)).sum())
    assert point["miss_rate"] == pytest.approx(point["missed"] / point["anomalies"])
