"""`anomalyd eval --shots K --train-anomalies N [--weak]` through the real command line on a real category: the
defect pool leaves the test set for every N, the trained head's metrics are those of the model path
(`fit_head` on the same split, same seed), and the operating point counts the test defects."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from daemon.cli import main
from model import create_detector
from model.dataset_loading import load_image
from model.datasets import discover
from model.kshot import kshot_split
from model.mixed_supervision import mixed_split, operating_point
from model.supervised import HeadTrainingConfig, PatchcoreHeadDetector, fit_head
from model.supervised.evaluation import load_training_frames

CATEGORY = "bottle"
SHOTS, SEED, N = 1, 1, 2


def _eval(samples_dir: Path, *extra: str) -> int:
    return main(["eval", "--data", str(samples_dir), "--model", "patchcore", "--categories", CATEGORY,
                 "--device", "cpu", "--shots", str(SHOTS), "--seed", str(SEED), "--json", *extra])


@pytest.mark.shared
@pytest.mark.slow
def test_mixed_supervision_eval_prints_the_trained_heads_metrics(samples_dir: Path, capsys) -> None:
    assert _eval(samples_dir, "--train-anomalies", "0") == 0
    baseline = json.loads(capsys.readouterr().out)["patchcore"]
    assert _eval(samples_dir, "--train-anomalies", str(N), "--weak") == 0
    trained = json.loads(capsys.readouterr().out)["patchcore"]
    split = kshot_split([s for s in discover(samples_dir, split="test") if s.category == CATEGORY], SHOTS, SEED,
                        train_samples=discover(samples_dir, split="train"))
    mixed = mixed_split(split.tests, N, SEED)
    tests = mixed.tests[CATEGORY]
    labels = np.array([s.label for s in tests])
    for printed in (baseline, trained):  # one test set for every N: the pool is out of both
        assert printed["per_category"][CATEGORY]["n_images"] == len(tests) < len(split.tests[CATEGORY])
    assert len(mixed.train_anomalies[CATEGORY]) == N

    detector = PatchcoreHeadDetector(create_detector("patchcore", references_later=True, device="cpu"))
    size = detector.image_size
    references = torch.stack([load_image(s.path, size, "fast") for s in split.references[CATEGORY]])
    frames, masks, has_mask = load_training_frames(mixed.train_anomalies[CATEGORY], size, "fast", weak=True)
    assert not bool(has_mask.any())
    fit_head(detector, references, frames, masks, has_mask, HeadTrainingConfig(seed=SEED))
    scores = detector.predict(torch.stack([load_image(s.path, size, "fast") for s in tests])).scores.numpy()
    assert trained["per_category"][CATEGORY]["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
    point = trained["operating_point"][CATEGORY]
    assert point == pytest.approx(operating_point(labels, scores), abs=1e-6)
    assert point["defects"] == int(labels.sum()) and 0 <= point["missed"] <= point["defects"]


@pytest.mark.shared
def test_train_anomalies_without_shots_is_a_usage_error(samples_dir: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--data", str(samples_dir), "--model", "patchcore", "--categories", CATEGORY,
              "--train-anomalies", "4"])
    assert exc.value.code == 2
    assert "--train-anomalies needs --shots K" in capsys.readouterr().err


@pytest.mark.shared
def test_train_anomalies_on_a_family_without_few_shot_training_is_a_usage_error(samples_dir: Path, capsys) -> None:
    """The labelled training is the trained family's `LabelLearning.few_shot` (model/factory.py): a family without
    one is refused by name before any model is built."""
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--data", str(samples_dir), "--model", "winclip", "--categories", CATEGORY, "--device", "cpu",
              "--shots", str(SHOTS), "--train-anomalies", "2"])
    assert exc.value.code == 2
    assert "--train-anomalies: model 'winclip' does not learn from labelled defects" in capsys.readouterr().err
