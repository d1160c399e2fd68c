"""Mixed supervision on real weights: PatchCore (N = 0) against the learned head (model/supervised) with N labelled
defects per category, with masks and with image labels only (--weak), on one fixed test set per category.

The splits are those of `anomalyd eval --shots K --train-anomalies N --seed S` (model/kshot.py,
model/mixed_supervision.py): K references, a fixed pool of defects out of the test set for every N, N of it
drawn with the seed. The frozen features of the test set, the references (leave-one-out) and their synthetic
defects are computed once per category and shared by every row (the CLI recomputes them per run; the numbers are
the same: `fit_head` and the detector run the same functions). Image AUROC/AP, AUPRO (--pixel) and the miss rate
at the threshold for 0.5 % false rejects on the test normals (`operating_point`).

    OMP_NUM_THREADS=1 nice -n 19 python bench/supervised_patchcore.py --data ../shared/data/inspection-samples \\
        --categories magnetic_tile,metal_plate,cubes,hazelnut --shots 16 --anomalies 0,4,16 --seeds 0 --pixel \\
        [--resize fit] [--cache /tmp/head-bench]

`--resize fit` (or a training override) runs `run_category_fit`: each frame at its own fit shape, as
`anomalyd eval --resize fit` does.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.dataset_loading import load_image, load_mask
from model.datasets import DatasetError, discover
from model.gaussian import gaussian_blur
from model.kshot import kshot_split
from model.metrics import image_metrics, pixel_metrics
from model.mixed_supervision import POOL_SIZE, mixed_split, operating_point
from model.patchcore import build_patchcore, clip_to_tf
from model.supervised.evaluation import load_training_frames
from model.supervised.training import (
    HeadInputs,
    HeadTrainingConfig,
    bank_distances,
    embed_images,
    train_head,
    training_inputs,
)

SIZE = 256


@torch.no_grad()
def test_features(detector, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(embeddings, cell distances, PatchCore image scores) of the test images."""
    embeddings, distances, scores = [], [], []
    for start in range(0, images.shape[0], 8):
        embedding = detector.model.embed(clip_to_tf(images[start:start + 8])).float()
        cell, where, flat = detector.model.patch_scores(embedding)
        scores.append(detector.model.image_scores(cell, where, flat))
        embeddings.append(embedding)
        distances.append(cell.reshape(embedding.shape[0], *embedding.shape[-2:]))
    return torch.cat(embeddings), torch.cat(distances), torch.cat(scores)


def blurred_maps(cells: torch.Tensor) -> np.ndarray:
    maps = F.interpolate(cells.unsqueeze(1), size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return gaussian_blur(maps, 4.0, padding="reflect")[:, 0].numpy()


def metrics_row(labels: np.ndarray, scores: np.ndarray, cells: torch.Tensor | None, masks: list | None) -> dict:
    row = {**image_metrics(labels, scores), **operating_point(labels, scores)}
    known = [i for i, mask in enumerate(masks or []) if mask is not None]
    if cells is not None and masks is not None and any(masks[i].any() for i in known):  # a category with masks
        row.update(pixel_metrics([masks[i] for i in known], blurred_maps(cells[known])))
    return row


def grid_logits(head, embeddings: list[torch.Tensor], distances: list[torch.Tensor], d0: float) -> list[torch.Tensor]:
    """The head's cell logits of frames of their own grids, frames of one grid batched together."""
    out: list[torch.Tensor | None] = [None] * len(embeddings)
    by_grid: dict[tuple, list[int]] = {}
    for index, embedding in enumerate(embeddings):
        by_grid.setdefault(tuple(embedding.shape), []).append(index)
    with torch.no_grad():
        for indices in by_grid.values():
            for start in range(0, len(indices), 32):
                chunk = indices[start:start + 32]
                logits = head(torch.stack([embeddings[i] for i in chunk]), torch.stack([distances[i] for i in chunk]) / d0)
                for offset, index in enumerate(chunk):
                    out[index] = logits[offset]
    return out  # type: ignore[return-value]


def fit_features(detector, tests, pixel: bool, cache: Path | None) -> tuple:
    """(embeddings, cell distances, PatchCore image scores, masks) of the test frames on the detector's geometry,
    each frame its own shape (read from `cache` when it holds them)."""
    if cache is not None and cache.is_file():
        return torch.load(cache, weights_only=False)  # this script's own cache (NumPy masks in it)
    from model.geometry import frame_inputs
    from model.preprocess import decode_image
    from model.supervised.frames import embed_frames, frame_bank_distances, load_frame_mask

    embeddings, masks = [], []
    for start in range(0, len(tests), 16):
        frames = []
        for sample in tests[start:start + 16]:
            rgb = decode_image(sample.path)
            frames.append(frame_inputs(rgb, detector.geometry, SIZE)[0])
            wanted = sample.label == 0 or sample.has_mask  # cached whatever --pixel says
            masks.append(load_frame_mask(sample, detector.geometry, SIZE, rgb.shape[:2]).numpy() if wanted else None)
        embeddings += embed_frames(detector, frames)
    distances = frame_bank_distances(detector, embeddings)
    with torch.no_grad():
        scores = torch.stack([detector.model.image_scores(*detector.model.patch_scores(e.unsqueeze(0)))[0]
                              for e in embeddings])
    result = (embeddings, distances, scores, masks)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(result, cache)
    return result


def run_category_fit(data: Path, category: str, shots: int, seed: int, counts: list[int], pixel: bool,
                     resize: str, cache_dir: Path | None, config: HeadTrainingConfig,
                     train_seed: int | None = None) -> list[dict]:
    """`run_category` on a fit geometry: frames of their own shapes, masks cut like them; AUPRO on the inputs'
    grids (the CLI's is in each image's own pixels)."""
    from model.geometry import make_geometry
    from model.supervised.frames import (
        embed_frames,
        frame_bank_distances,
        frame_targets,
        frame_training_items,
        group_items,
        load_frame,
        load_training_frames_geometry,
    )

    samples = [s for s in discover(data, split="test") if s.category == category]
    try:
        train = [s for s in discover(data, split="train") if s.category == category]
    except DatasetError:
        train = []
    split = kshot_split(samples, shots, seed, train_samples=train)
    if category not in split.tests:
        print(f"{category}: skipped ({split.skipped.get(category)})", file=sys.stderr)
        return []
    tests = mixed_split(split.tests, 0, seed).tests[category]
    geometry = make_geometry(resize)
    detector = build_patchcore(image_size=SIZE, geometry=geometry)
    references = [load_frame(s.path, geometry, SIZE) for s in split.references[category]]
    detector.set_references([r.unsqueeze(0) for r in references])
    labels = np.array([s.label for s in tests])
    cache = cache_dir / f"{category}-{resize}-k{shots}-s{seed}.pt" if cache_dir else None
    embeddings, distances, patchcore_scores, masks = fit_features(detector, tests, pixel, cache)
    masks = masks if pixel else None
    train_seed = seed if train_seed is None else train_seed  # synthetic defects and mini-batches
    base, _ = frame_training_items(detector, references, [], [], torch.zeros(0, dtype=torch.bool),
                                   synthetic_per_reference=config.synthetic_per_reference, seed=train_seed,
                                   thin_per_reference=config.thin_per_reference)
    rows = []
    row = metrics_row_frames(labels, patchcore_scores.numpy(), distances if pixel else None, masks)
    rows.append({"category": category, "seed": seed, "N": 0, "mode": f"patchcore {resize}", **row})
    print(table_line(rows[-1]), flush=True)
    for n in (c for c in counts if c > 0):
        chosen = mixed_split(split.tests, n, seed).train_anomalies[category]
        for weak in (False, True):
            frames, frame_masks, has_mask = load_training_frames_geometry(chosen, geometry, SIZE, weak=weak)
            found = embed_frames(detector, frames)
            extra = (found, frame_bank_distances(detector, found), [1.0] * len(found),
                     [frame_targets(m, tuple(e.shape[-2:])) for m, e in zip(frame_masks, found, strict=True)],
                     [bool(m) for m in has_mask], [True] * len(found))
            # grouped after joining, so the items are in fit_head's order (the mini-batches draw by position)
            items = group_items(*(a + b for a, b in zip(base, extra, strict=True)))
            started = time.perf_counter()
            head, d0 = train_head(items, HeadTrainingConfig(**{**config.as_dict(), "seed": train_seed}))
            seconds = time.perf_counter() - started
            logits = grid_logits(head, embeddings, distances, d0)
            with torch.no_grad():
                scores = np.array([float(torch.sigmoid(head.image_logits(cell.unsqueeze(0)))[0]) for cell in logits])
            cells = [torch.sigmoid(cell) for cell in logits] if pixel else None
            row = metrics_row_frames(labels, scores, cells, masks)
            rows.append({"category": category, "seed": seed, "N": len(chosen),
                         "mode": f"{'weak' if weak else 'masks'} {resize}", "train_s": seconds, **row})
            print(table_line(rows[-1]), flush=True)
    return rows


def metrics_row_frames(labels: np.ndarray, scores: np.ndarray, cells: list | None, masks: list | None) -> dict:
    """`metrics_row` for frames of their own shapes (each map upsampled to its own input)."""
    row = {**image_metrics(labels, scores), **operating_point(labels, scores)}
    known = [i for i, mask in enumerate(masks or []) if mask is not None]
    if cells is not None and masks is not None and any(masks[i].any() for i in known):
        maps = []
        for i in known:
            cell = cells[i].float()[None, None]
            up = F.interpolate(cell, size=masks[i].shape, mode="bilinear", align_corners=False)
            maps.append(gaussian_blur(up, 4.0, padding="reflect")[0, 0].numpy())
        row.update(pixel_metrics([masks[i] for i in known], maps))
    return row


def run_category(data: Path, category: str, shots: int, seed: int, counts: list[int], pixel: bool,
                 pool: int = POOL_SIZE, extra_references: int = 0, overrides: dict | None = None) -> list[dict]:
    samples = [s for s in discover(data, split="test") if s.category == category]
    try:
        train = [s for s in discover(data, split="train") if s.category == category]
    except DatasetError:
        train = []
    split = kshot_split(samples, shots, seed, train_samples=train)
    if category not in split.tests:
        print(f"{category}: skipped ({split.skipped.get(category)})", file=sys.stderr)
        return []
    tests = mixed_split(split.tests, 0, seed, pool).tests[category]
    reference_samples = list(split.references[category])
    if extra_references:
        # a ceiling study: more normal references, taken out of the test normals (seeded), never scored
        goods = [s for s in tests if s.label == 0]
        random.Random(seed).shuffle(goods)
        moved = {s.path for s in goods[:extra_references]}
        reference_samples += goods[:extra_references]
        tests = [s for s in tests if s.path not in moved]
    detector = build_patchcore(image_size=SIZE)
    references = torch.stack([load_image(s.path, SIZE, "fast") for s in reference_samples])
    detector.set_references(references)
    images = torch.stack([load_image(s.path, SIZE, "fast") for s in tests])
    labels = np.array([s.label for s in tests])
    masks = [load_mask(s, SIZE).numpy() if s.label == 0 or s.has_mask else None for s in tests] if pixel else None
    embeddings, distances, patchcore_scores = test_features(detector, images)
    del images
    config = HeadTrainingConfig(seed=seed, **(overrides or {}))
    base = training_inputs(detector, references, torch.zeros(0, 3, SIZE, SIZE), torch.zeros(0, SIZE, SIZE),
                           torch.zeros(0, dtype=torch.bool), synthetic_per_reference=config.synthetic_per_reference,
                           seed=seed)
    rows = []
    row = metrics_row(labels, patchcore_scores.numpy(), distances if pixel else None, masks)
    rows.append({"category": category, "seed": seed, "N": 0, "mode": "patchcore", **row})
    print(table_line(rows[-1]), flush=True)
    for n in (c for c in counts if c > 0):
        chosen = mixed_split(split.tests, n, seed, pool).train_anomalies[category]
        for weak in (False, True):
            frames, frame_masks, has_mask = load_training_frames(chosen, SIZE, "fast", weak=weak)
            frame_embeddings = embed_images(detector, frames)
            extra = HeadInputs(frame_embeddings, bank_distances(detector, frame_embeddings), torch.ones(len(chosen)),
                               F.adaptive_max_pool2d(frame_masks.unsqueeze(1), base.targets.shape[-2:])[:, 0],
                               has_mask, torch.ones(len(chosen), dtype=torch.bool))
            started = time.perf_counter()
            head, d0 = train_head(HeadInputs.concat([base, extra]), config)
            seconds = time.perf_counter() - started
            with torch.no_grad():
                logits = torch.cat([head(embeddings[i:i + 64], distances[i:i + 64] / d0)
                                    for i in range(0, embeddings.shape[0], 64)])
                scores = torch.sigmoid(head.image_logits(logits)).numpy()
                cells = torch.sigmoid(logits) if pixel else None
            row = metrics_row(labels, scores, cells, masks)
            rows.append({"category": category, "seed": seed, "N": len(chosen), "mode": "weak" if weak else "masks",
                         "train_s": seconds, **row})
            print(table_line(rows[-1]), flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--categories", default="magnetic_tile,metal_plate,cubes,hazelnut")
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--anomalies", default="0,4,16")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--pixel", action="store_true", help="also pixel AUROC and AUPRO")
    parser.add_argument("--resize", default="squash", choices=("squash", "fit"),
                        help="the frame geometry PatchCore and the head run on (model/geometry.py)")
    parser.add_argument("--cache", type=Path, help="fit: keep the test frames' frozen features in this folder")
    parser.add_argument("--steps", type=int, help="training steps (default: HeadTrainingConfig's)")
    parser.add_argument("--synthetic", type=int, help="synthetic defects per reference (default: the config's)")
    parser.add_argument("--thin", type=int, help="thin crack-like synthetic defects per reference (default 0)")
    parser.add_argument("--pool", type=int, default=POOL_SIZE,
                        help="defects held out of the test set to train from (a learning-curve study; default: "
                        "the eval's pool, min(16, half))")
    parser.add_argument("--extra-references", type=int, default=0,
                        help="a ceiling study: also take this many test normals as references (squash only)")
    parser.add_argument("--train-seed", type=int, help="seed of the head's training only (synthetic defects, "
                        "mini-batches); the split keeps --seeds (default: the same seed)")
    args = parser.parse_args()
    overrides = {k: v for k, v in (("steps", args.steps), ("synthetic_per_reference", args.synthetic),
                                            ("thin_per_reference", args.thin))
                 if v is not None}
    config = HeadTrainingConfig(**overrides)
    torch.set_num_threads(1)
    counts = [int(c) for c in args.anomalies.split(",")]
    print(HEADER, flush=True)
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for category in args.categories.split(","):
            study = args.pool != POOL_SIZE or args.extra_references > 0
            if args.resize == "squash" and (study or not overrides) and args.train_seed is None:
                rows += run_category(args.data, category, args.shots, seed, counts, args.pixel, args.pool,
                                     args.extra_references, overrides)
            else:
                rows += run_category_fit(args.data, category, args.shots, seed, counts, args.pixel, args.resize,
                                         args.cache, config, args.train_seed)
    return 0


HEADER = ("| category | seed | N | labels | image AUROC | image AP | pixel AUROC / AUPRO | missed at 0.5 % FRR | realised FRR |\n"
          "|---|---|---|---|---|---|---|---|---|")


def table_line(r: dict) -> str:
    aupro = f"{100 * r['pixel_auroc']:.1f} / {100 * r['aupro']:.1f}" if "aupro" in r else "-"
    return (f"| {r['category']} | {r['seed']} | {r['N']} | {r['mode']} | {100 * r['image_auroc']:.1f} | "
            f"{100 * r['image_ap']:.1f} | {aupro} | {int(r['missed'])}/{int(r['defects'])} "
            f"({100 * r['miss_rate']:.1f} %) | {100 * r['false_reject_rate']:.1f} % |")


if __name__ == "__main__":
    raise SystemExit(main())
