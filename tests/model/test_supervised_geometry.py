"""The learned head on the "fit" frame geometry (model/supervised/frames.py): real magnetic_tile frames of
different sizes, each fed at its own aspect ratio (short side to the model size), train a head and come back with
maps at each frame's own size. Real Lite0 weights, 128 px, a few frames: fast on 2 cores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model import create_detector
from model.checkpoints import CheckpointError
from model.datasets import discover
from model.geometry import make_geometry
from model.preprocess import decode_image
from model.supervised import HeadTrainingConfig, PatchcoreHeadDetector, fit_head
from model.supervised.frames import frame_training_inputs, load_frame, load_training_frames_geometry

SIZE = 128
FAST = HeadTrainingConfig(steps=30, synthetic_per_reference=1)


def distinct_sizes(samples: list, count: int) -> list:
    """The first `count` samples (by path) whose frames have pairwise different (height, width)."""
    chosen, seen = [], set()
    for sample in sorted(samples, key=lambda s: str(s.path)):
        hw = decode_image(sample.path).shape[:2]
        if hw not in seen:
            seen.add(hw)
            chosen.append(sample)
        if len(chosen) == count:
            break
    return chosen


@pytest.fixture(scope="module")
def tiles(samples_dir: Path) -> dict[str, list]:
    samples = [s for s in discover(samples_dir, split="test") if s.category == "magnetic_tile"]
    good = distinct_sizes([s for s in samples if s.label == 0], 6)
    defects = distinct_sizes([s for s in samples if s.label == 1 and s.has_mask], 3)
    return {"references": good[:4], "normals": good[4:], "defects": defects}


def fit_detector() -> PatchcoreHeadDetector:
    return create_detector("patchcore-head", references_later=True, image_size=SIZE, device="cpu",
                           geometry=make_geometry("fit"))


@pytest.mark.shared
def test_head_trains_and_predicts_on_fit_frames_of_their_own_sizes(tiles: dict[str, list]) -> None:
    detector = fit_detector()
    geometry = detector.geometry
    references = [load_frame(s.path, geometry, SIZE) for s in tiles["references"]]
    assert len({tuple(r.shape) for r in references}) > 1  # rectangular inputs of several shapes, not squares
    assert all(min(r.shape[-2:]) == SIZE for r in references)
    images, masks, has_mask = load_training_frames_geometry(tiles["defects"], geometry, SIZE, weak=False)
    # the masks are cut exactly like their frames, and mark the defect
    assert [tuple(m.shape) for m in masks] == [tuple(i.shape[-2:]) for i in images]
    assert all(0 < float(m.mean()) < 0.5 for m in masks)

    detector.set_references([r.unsqueeze(0) for r in references])  # a bank of the frames' own shapes
    buckets, counts = frame_training_inputs(detector.patchcore, references, images, masks, has_mask,
                                            synthetic_per_reference=1, seed=0)
    assert counts == {"normal": 4, "synthetic": 4, "anomalous_masked": 3, "anomalous_weak": 0}
    assert len(buckets) > 1 and sum(b.labels.numel() for b in buckets) == 11  # one item set per grid shape

    checkpoint = fit_head(detector, references, images, masks, has_mask, FAST)
    assert checkpoint.metadata["geometry"] == "fit"
    assert checkpoint.metadata["items"]["anomalous_masked"] == 3
    squash = create_detector("patchcore-head", references_later=True, image_size=SIZE, device="cpu")
    with pytest.raises(CheckpointError, match="trained on resize 'fit' frames, this detector uses resize 'squash'"):
        squash.set_checkpoint(checkpoint)

    frames = [decode_image(s.path) for s in tiles["normals"] + tiles["defects"]]
    scores, maps = detector.predict_frames(frames)
    assert [m.shape for m in maps] == [f.shape[:2] for f in frames]  # each map at its frame's own size
    assert np.all(np.isfinite(scores)) and np.all((scores >= 0) & (scores <= 1))
    assert all(float(m.min()) >= 0 and float(m.max()) <= 1 for m in maps)
    # the trained defects score above the unseen good frames, and their maps peak inside the defect
    assert float(scores[2:].min()) > float(scores[:2].max())
    for frame_map, sample in zip(maps[2:], tiles["defects"], strict=True):
        mask = np.asarray(decode_image(sample.mask_path).max(axis=2) > 0)
        assert float(frame_map[mask].max()) >= float(np.quantile(frame_map, 0.99))

    # the same frames squashed: the squash detector's maps are the model's square
    with torch.inference_mode():
        square = detector.predict(torch.stack(references[:1]))
    assert square.maps.shape[-2:] == references[0].shape[-2:]


def mini_category(samples_dir: Path, root: Path, normals: int, defects: int) -> Path:
    """A dataset folder of links to the first magnetic_tile frames (by name): good ones and cracks with masks."""
    source = samples_dir / "magnetic_tile"
    for kind, count in (("good", normals), ("crack", defects)):
        (root / "magnetic_tile" / "test" / kind).mkdir(parents=True)
        for image in sorted((source / "test" / kind).iterdir())[:count]:
            (root / "magnetic_tile" / "test" / kind / image.name).symlink_to(image)
            if kind != "good":
                mask = source / "ground_truth" / kind / f"{image.stem}_mask.png"
                (root / "magnetic_tile" / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
                (root / "magnetic_tile" / "ground_truth" / kind / mask.name).symlink_to(mask)
    return root


@pytest.mark.shared
@pytest.mark.slow
def test_eval_resize_fit_evaluates_the_head_on_fit(samples_dir: Path, tmp_path: Path, capsys) -> None:
    """`anomalyd eval --model patchcore --shots K --train-anomalies N --resize fit` trains and scores the head on
    fit frames: its AUROC is the model path's (fit_head on fit frames, predict_frames)."""
    import json

    from sklearn.metrics import roc_auc_score

    from daemon.cli import main
    from model.kshot import kshot_split
    from model.mixed_supervision import mixed_split

    data = mini_category(samples_dir, tmp_path / "data", 10, 8)
    assert main(["eval", "--data", str(data), "--model", "patchcore", "--categories", "magnetic_tile",
                 "--device", "cpu", "--shots", "2", "--train-anomalies", "2", "--seed", "0", "--json",
                 "--resize", "fit"]) == 0
    printed = json.loads(capsys.readouterr().out)["patchcore"]["per_category"]["magnetic_tile"]

    split = kshot_split(discover(data, split="test"), 2, 0)
    mixed = mixed_split(split.tests, 2, 0)
    detector = create_detector("patchcore-head", references_later=True, device="cpu", geometry=make_geometry("fit"))
    size = detector.image_size
    references = [load_frame(s.path, detector.geometry, size) for s in split.references["magnetic_tile"]]
    frames, masks, has_mask = load_training_frames_geometry(mixed.train_anomalies["magnetic_tile"], detector.geometry,
                                                            size, weak=False)
    fit_head(detector, references, frames, masks, has_mask, HeadTrainingConfig(seed=0))
    tests = mixed.tests["magnetic_tile"]
    scores, _ = detector.predict_frames([decode_image(s.path) for s in tests])
    auroc = roc_auc_score([s.label for s in tests], scores)
    assert printed["image_auroc"] == pytest.approx(auroc, abs=1e-6)
    assert printed["n_images"] == len(tests)


def test_thin_crack_changes_only_a_thin_line_and_masks_it() -> None:
    from model.supervised.frames import thin_crack

    rgb = np.full((96, 160, 3), 120, np.uint8)
    for seed in range(6):
        out, mask = thin_crack(rgb, np.random.default_rng(seed))
        changed = np.abs(out.astype(int) - rgb.astype(int)).max(axis=2) > 0
        assert mask.any() and np.array_equal(changed, mask.astype(bool))  # outside the mask: the input exactly
        assert mask.mean() < 0.05  # a thin line, not a blob
        rows, cols = np.nonzero(mask)
        assert max(np.ptp(rows), np.ptp(cols)) >= 0.1 * 96  # long: at least a tenth of the short side


@pytest.mark.shared
def test_train_resize_fit_trains_a_fit_head(samples_dir: Path, tmp_path: Path, capsys) -> None:
    """`anomalyd train --model patchcore-head --resize fit`: the head trains on each frame at its own aspect ratio
    (the checkpoint records fit), a fit detector takes it and scores frames of their own sizes; a squash detector
    refuses it (tiles: tests/model/test_supervised_tile.py)."""
    from daemon.cli import main

    data = mini_category(samples_dir, tmp_path / "data", normals=6, defects=3)
    output = tmp_path / "head.safetensors"
    common = ["train", "--model", "patchcore-head", "--data", str(data), "--image-size", str(SIZE),
              "--seed", "0", "--device", "cpu"]
    assert main([*common, "--output", str(output), "--resize", "fit"]) == 0
    from model.supervised.detector import HeadCheckpoint

    checkpoint = HeadCheckpoint.load(output)
    assert checkpoint.metadata["geometry"] == "fit"
    assert checkpoint.metadata["items"]["anomalous_masked"] == 3
    good = sorted((data / "magnetic_tile" / "test" / "good").iterdir())
    detector = create_detector("patchcore-head", head=output, references=[str(p) for p in good[:4]],
                               image_size=SIZE, device="cpu", geometry=make_geometry("fit"))
    frames = [decode_image(p) for p in sorted((data / "magnetic_tile" / "test" / "crack").iterdir())]
    scores, maps = detector.predict_frames(frames)
    assert [m.shape for m in maps] == [f.shape[:2] for f in frames] and np.all((scores >= 0) & (scores <= 1))
    with pytest.raises(CheckpointError, match="trained on resize 'fit'"):
        create_detector("patchcore-head", head=output, references_later=True, image_size=SIZE, device="cpu")

