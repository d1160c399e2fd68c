"""The learned head on PatchCore (model/supervised/, model "patchcore-head") on the real Lite0 weights, 64 px.

A scene where PatchCore alone is wrong both ways: the references are a plain texture; a benign dark stripe (a
"false alarm": labelled normal) is far from every reference patch, and the defect is a small bright spot. After
training on a few labelled frames, fresh stripe frames score below fresh defect frames, and the map peaks on
the defect."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model import create_detector
from model.checkpoints import CheckpointError
from model.factory import get_family
from model.mixed_supervision import mixed_split, operating_point
from model.preprocess import OPENAI_MEAN, OPENAI_STD
from model.supervised import HeadCheckpoint, HeadTrainingConfig, PatchcoreHeadDetector, fit_head

SIZE = 64
FAST = HeadTrainingConfig(steps=60, synthetic_per_reference=1)


def texture(rng: np.random.Generator) -> np.ndarray:
    base = 120 + 20 * np.sin(np.arange(SIZE) / 3.0 + rng.uniform(0, 6))[None, :] + rng.normal(0, 6, (SIZE, SIZE))
    return np.repeat(base[..., None], 3, axis=2).clip(0, 255).astype(np.uint8)


def stripe(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = rgb.copy()
    row = int(rng.integers(8, SIZE - 16))
    out[row:row + 6] = 30
    return out


def spot(rgb: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    out, mask = rgb.copy(), np.zeros((SIZE, SIZE), np.float32)
    y, x = (int(v) for v in rng.integers(8, SIZE - 16, 2))
    out[y:y + 7, x:x + 7] = (250, 40, 40)
    mask[y:y + 7, x:x + 7] = 1
    return out, mask


def to_input(arrays: list[np.ndarray]) -> torch.Tensor:
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
    return (pixels - torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_STD).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def scene() -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(0)
    references = [texture(rng) for _ in range(6)]
    spots = [spot(texture(rng), rng) for _ in range(12)]
    return {
        "references": to_input(references),
        "false_alarms": to_input([stripe(texture(rng), rng) for _ in range(4)]),
        "defects": to_input([s[0] for s in spots[:4]]),
        "masks": torch.from_numpy(np.stack([s[1] for s in spots[:4]])),
        "fresh_stripes": to_input([stripe(texture(rng), rng) for _ in range(6)]),
        "fresh_defects": to_input([s[0] for s in spots[4:]]),
        "fresh_masks": torch.from_numpy(np.stack([s[1] for s in spots[4:]])),
        "fresh_normals": to_input([texture(rng) for _ in range(6)]),
    }


def head_detector() -> PatchcoreHeadDetector:
    return create_detector("patchcore-head", references_later=True, image_size=SIZE, device="cpu")


def test_registered_family_and_untrained_head_ranks_like_patchcore(scene) -> None:
    family = get_family("patchcore-head")
    assert family.caps.needs_references and not family.caps.clip_backbone and family.checkpoint is not None
    detector = head_detector()
    detector.set_references(scene["references"])
    images = torch.cat([scene["fresh_normals"], scene["fresh_stripes"], scene["fresh_defects"]])
    prediction = detector.predict(images)
    assert prediction.maps.shape == (images.shape[0], SIZE, SIZE)
    assert float(prediction.scores.min()) >= 0 and float(prediction.scores.max()) <= 1
    assert float(prediction.maps.min()) >= 0 and float(prediction.maps.max()) <= 1
    # untrained: a monotone function of the mean of the top-k log(1 + PatchCore cell distance / d0)
    pc = detector.patchcore
    embedding = pc.model.embed(_tf(images))
    cells = pc.model.patch_scores(embedding)[0]
    z = torch.log1p(cells / detector.checkpoint.distance_scale)
    topk = z.topk(detector.head.top_k, dim=1).values.mean(1)
    assert torch.equal(torch.argsort(prediction.scores), torch.argsort(topk))


def _tf(images: torch.Tensor) -> torch.Tensor:
    from model.patchcore import clip_to_tf

    return clip_to_tf(images)


def test_labels_fix_a_false_alarm_and_keep_catching_the_defect(scene) -> None:
    detector = head_detector()
    detector.set_references(scene["references"])
    before = detector.predict(torch.cat([scene["fresh_stripes"], scene["fresh_defects"]])).scores
    # PatchCore alone: the benign stripe scores at least as high as some defects (a false alarm)
    assert float(before[:6].max()) >= float(before[6:].min())
    fit_head(detector, scene["references"], scene["defects"], scene["masks"], torch.ones(4, dtype=torch.bool),
             FAST, normals=scene["false_alarms"])
    after = detector.predict(torch.cat([scene["fresh_stripes"], scene["fresh_defects"], scene["fresh_normals"]]))
    stripes, defects, normals = after.scores[:6], after.scores[6:14], after.scores[14:]
    assert float(torch.cat([stripes, normals]).max()) < float(defects.min())
    # the map peaks inside the defect
    peaks = after.maps[6:14].flatten(1).argmax(1)
    assert bool(scene["fresh_masks"].flatten(1).gather(1, peaks[:, None]).all())


def test_training_is_deterministic_given_the_seed_and_checkpoint_round_trips(scene, tmp_path: Path) -> None:
    runs = []
    for seed in (3, 3, 4):
        detector = head_detector()
        config = HeadTrainingConfig(steps=10, synthetic_per_reference=1, seed=seed)
        runs.append((detector, fit_head(detector, scene["references"], scene["defects"], scene["masks"],
                                        torch.tensor([True, True, False, False]), config)))
    (first, a), (_, b), (_, c) = runs
    assert all(torch.equal(a.head.state_dict()[k], b.head.state_dict()[k]) for k in a.head.state_dict())
    assert a.digest() == b.digest() != c.digest()
    assert a.metadata["items"] == {"normal": 6, "anomalous_masked": 2, "anomalous_weak": 2, "synthetic": 6}
    path = a.save(tmp_path / "head.safetensors")
    loaded = create_detector("patchcore-head", head=path, references=scene["references"], image_size=SIZE,
                             device="cpu")
    images = scene["fresh_defects"]
    assert torch.allclose(loaded.predict(images).scores, first.predict(images).scores, atol=1e-6)
    assert loaded.version == first.version and "-h" + a.digest() in loaded.version
    with pytest.raises(CheckpointError, match="image_size"):
        create_detector("patchcore-head", head=path, references_later=True, image_size=96, device="cpu")
    (tmp_path / "bad.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"bad\.safetensors"):
        HeadCheckpoint.load(tmp_path / "bad.safetensors")


def test_mixed_split_keeps_one_test_set_for_every_n_and_operating_point() -> None:
    from model.datasets import Sample

    items = [Sample(Path(f"/x/{i:02d}.png"), "c", "good" if i < 10 else "bad", int(i >= 10), None, False)
             for i in range(30)]
    splits = [mixed_split({"c": items}, n, seed=0) for n in (0, 4, 16)]
    assert [len(s.train_anomalies["c"]) for s in splits] == [0, 4, 10]  # the pool: half of the 20 defects
    assert splits[0].tests == splits[1].tests == splits[2].tests
    assert len(splits[0].tests["c"]) == 20 and not set(splits[2].train_anomalies["c"]) & set(splits[0].tests["c"])
    # 200 normals at 0.5 %: one may exceed the threshold; defects at or below it are missed
    labels = [0] * 200 + [1] * 4
    scores = [*list(np.linspace(0, 1, 200)), 0.2, 0.996, 0.999, 2.0]
    point = operating_point(labels, scores, 0.005)
    assert point["threshold"] == pytest.approx(np.linspace(0, 1, 200)[-2])
    assert point["missed"] == 1 and point["miss_rate"] == 0.25 and point["false_reject_rate"] == 0.005


def test_anomalyd_train_fits_a_head_from_a_labelled_folder(scene, tmp_path: Path) -> None:
    """`anomalyd train --model patchcore-head` on a folder: normals (references + labelled false alarms), defects
    with masks and one without; the written head catches fresh defects above fresh false alarms."""
    from PIL import Image

    from daemon.cli import main

    def save(tensor: torch.Tensor, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(to_rgb_array(tensor)).save(path)

    root = tmp_path / "data" / "plate"
    for i, image in enumerate(scene["references"]):
        save(image, root / "test" / "good" / f"ref{i}.png")
    for i, image in enumerate(scene["false_alarms"]):
        save(image, root / "test" / "good" / f"stripe{i}.png")
    for i, image in enumerate(scene["defects"]):
        save(image, root / "test" / "spot" / f"spot{i}.png")
        if i < 3:  # the last defect carries its image label only
            mask_path = root / "ground_truth" / "spot" / f"spot{i}_mask.png"
            mask_path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray((scene["masks"][i].numpy() * 255).astype(np.uint8)).save(mask_path)
    output = tmp_path / "head.safetensors"
    references = ",".join(str(root / "test" / "good" / f"ref{i}.png") for i in range(6))
    assert main(["train", "--model", "patchcore-head", "--data", str(tmp_path / "data"), "--output", str(output),
                 "--image-size", str(SIZE), "--references", references, "--seed", "0", "--device", "cpu"]) == 0
    checkpoint = HeadCheckpoint.load(output)
    assert checkpoint.metadata["items"] == {"normal": 6, "synthetic": 18, "anomalous_masked": 3, "anomalous_weak": 1,
                                            "normal_labelled": 4}
    detector = create_detector("patchcore-head", head=output, references=scene["references"], image_size=SIZE,
                               device="cpu")
    scores = detector.predict(torch.cat([scene["fresh_stripes"], scene["fresh_defects"]])).scores
    assert float(scores[:6].max()) < float(scores[6:].min())


def to_rgb_array(image: torch.Tensor) -> np.ndarray:
    pixels = image * torch.tensor(OPENAI_STD).view(3, 1, 1) + torch.tensor(OPENAI_MEAN).view(3, 1, 1)
    return (pixels * 255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
