"""PatchCore accuracy sweep on a meta.json dataset with the k-shot protocol of `anomalyd eval --shots`.

Each configuration (backbone, taps, image size, reference augmentation, bank size) embeds every image of a category
once, then builds the memory bank for each K and seed from the same fixed reference pool as `anomalyd eval --shots`
(model/kshot.py) and scores the test set: image AUROC for anomalib's re-weighted score and for the map maximum,
and pixel AUROC (images with masks; normals count as all-normal). One JSON line per (config, category, K, seed).

    python bench/sweep_patchcore.py --data ../shared/data/inspection-samples --shots 1,4,16 \\
        --config base --config 'aug-d4:augment=d4' --config 'lite1:backbone=efficientnet-lite1' --out sweep.jsonl

A config is NAME[:key=value,...] with keys backbone, taps (4/10/14 as 4-10-14), image_size, augment,
max_bank_rows (0 = full bank), transform (fast|reference), resize (squash|fit|tile: the daemon's geometry,
model/geometry.py), tile_overlap.

With `resize`, images go through model/geometry.py as the daemon's do (decoded, fit or tiled, maps stitched back
to each image's own pixels) and pixel AUROC is computed in the images' own pixels against the full-size masks,
for every mode alike (squash included), so the modes compare on one footing; `image_auroc` is the score the
detector gives (anomalib's re-weighted score for one input per image, the stitched map's maximum for tiles).

    python bench/sweep_patchcore.py --data ../shared/data/inspection-samples --shots 16 --threads 1 \
        --categories magnetic_tile,metal_plate,capsule,cubes \
        --config squash:resize=squash --config fit:resize=fit --config tile:resize=tile --out geometry.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.dataset_loading import load_image, load_mask
from model.datasets import DatasetError, discover
from model.kshot import kshot_split
from model.patchcore import augment_references, build_patchcore, clip_to_tf, greedy_coreset
from model.patchcore.torch_model import squared_norms


def parse_config(text: str) -> tuple[str, dict]:
    name, _, rest = text.partition(":")
    config: dict = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key == "taps":
            config[key] = tuple(int(v) if v.isdigit() else v for v in value.split("-"))
        elif key in ("image_size", "max_bank_rows"):
            config[key] = int(value)
        elif key == "tile_overlap":
            config[key] = float(value)
        else:
            config[key] = value
    return name, config


@torch.no_grad()
def embed_files(detector, files, size, transform, batch=8) -> torch.Tensor:
    out = []
    for start in range(0, len(files), batch):
        images = torch.stack([load_image(f, size, transform) for f in files[start:start + batch]])
        out.append(detector.model.embed(clip_to_tf(images)).half())
    return torch.cat(out)


def full_mask(sample, hw: tuple[int, int]) -> np.ndarray:
    """The sample's ground-truth mask at the image's own size (all-normal without one)."""
    if not sample.mask_path:
        return np.zeros(hw, bool)
    from PIL import Image

    array = np.asarray(Image.open(sample.mask_path).convert("L"))
    if array.shape != hw:
        import cv2

        array = cv2.resize(array, (hw[1], hw[0]), interpolation=cv2.INTER_NEAREST)
    return array > 0


@torch.no_grad()
def run_geometry(name: str, config: dict, samples, train, shots_list, seeds, out) -> None:
    """The sweep through model/geometry.py (the daemon's path for every resize mode)."""
    from model.geometry import cut_frame, make_geometry, normalised_inputs, plan_frame, stitch_maps
    from model.preprocess import decode_image

    geometry = make_geometry(config.pop("resize"), tile_overlap=config.pop("tile_overlap", None))
    max_rows = config.pop("max_bank_rows", 0)
    config.pop("transform", None)
    detector = build_patchcore(**config, max_bank_rows=None, geometry=geometry)
    model, size = detector.model, detector.image_size

    def inputs_of(path):
        rgb = decode_image(path)
        plan = plan_frame(rgb.shape[:2], geometry, size)
        return plan, normalised_inputs(cut_frame(rgb, plan))

    splits = {(k, s): kshot_split(samples, k, s, train_samples=train) for k in shots_list for s in seeds}
    categories = sorted({c for split in splits.values() for c in split.tests})
    for category in categories:
        tests = next(split.tests[category] for split in splits.values() if category in split.tests)
        started = time.perf_counter()
        test_items = []
        for sample in tests:
            plan, images = inputs_of(sample.path)
            embedding = torch.cat([model.embed(clip_to_tf(images[i:i + 8])) for i in range(0, len(images), 8)])
            test_items.append((plan, embedding.half()))
        labels = np.array([s.label for s in tests])
        masks = [full_mask(s, plan.frame_hw) if (s.label == 0 or s.has_mask) else None
                 for s, (plan, _) in zip(tests, test_items, strict=True)]
        embed_s = time.perf_counter() - started
        for (shots, seed), split in splits.items():
            if category not in split.references:
                continue
            started = time.perf_counter()
            rows = []
            for sample in split.references[category]:
                views = augment_references(inputs_of(sample.path)[1], detector.augment)
                rows += [model.flatten(model.embed(clip_to_tf(views[i:i + 8]))) for i in range(0, len(views), 8)]
            bank = torch.cat(rows)
            full_rows = bank.shape[0]
            if max_rows and full_rows > max_rows:
                bank = bank[greedy_coreset(bank, max_rows)]
            model.memory_bank, model.bank_norms = bank, squared_norms(bank)
            detector_scores, reweighted_max, map_max, maps = [], [], [], []
            for plan, embedding in test_items:
                embedding = embedding.float()
                scores, where, flat = model.patch_scores(embedding)
                tile_scores = model.image_scores(scores, where, flat)
                tile_maps = model.anomaly_maps(scores, tuple(embedding.shape[-2:]), plan.input_hw).numpy()
                frame_map = stitch_maps(list(tile_maps), plan, geometry)
                reweighted_max.append(float(tile_scores.max()))
                map_max.append(float(frame_map.max()))
                detector_scores.append(reweighted_max[-1] if len(plan.origins) == 1 else map_max[-1])
                maps.append(frame_map)
            with_mask = [i for i, m in enumerate(masks) if m is not None]
            pixel = float("nan")
            if any(labels[i] == 1 for i in with_mask):
                truth = np.concatenate([masks[i].reshape(-1) for i in with_mask])
                pixel = roc_auc_score(truth, np.concatenate([maps[i].reshape(-1) for i in with_mask]))
            row = {
                "config": name, **{k: v for k, v in config.items()}, "resize": geometry.resize,
                "tile_overlap": geometry.tile_overlap, "max_bank_rows": max_rows, "category": category,
                "shots": shots, "seed": seed, "n_test": len(tests), "bank_rows": int(bank.shape[0]),
                "full_rows": full_rows,
                "image_auroc": 100 * roc_auc_score(labels, detector_scores),
                "image_auroc_reweighted_max": 100 * roc_auc_score(labels, reweighted_max),
                "image_auroc_mapmax": 100 * roc_auc_score(labels, map_max),
                "pixel_auroc": 100 * pixel,
                "seconds": round(embed_s + time.perf_counter() - started, 1),
            }
            write_row(out, row)


@torch.no_grad()
def run_config(name: str, config: dict, samples, train, shots_list, seeds, out) -> None:
    if "resize" in config:
        run_geometry(name, config, samples, train, shots_list, seeds, out)
        return
    transform = config.pop("transform", "fast")
    max_rows = config.pop("max_bank_rows", 0)
    detector = build_patchcore(**config, max_bank_rows=None)
    model, size = detector.model, detector.image_size
    splits = {(k, s): kshot_split(samples, k, s, train_samples=train) for k in shots_list for s in seeds}
    categories = sorted({c for split in splits.values() for c in split.tests})
    for category in categories:
        tests = next(split.tests[category] for split in splits.values() if category in split.tests)
        started = time.perf_counter()
        test_embeddings = embed_files(detector, [s.path for s in tests], size, transform)
        labels = np.array([s.label for s in tests])
        masks = [load_mask(s, size).numpy() if (s.label == 0 or s.has_mask) else None for s in tests]
        embed_s = time.perf_counter() - started
        for (shots, seed), split in splits.items():
            if category not in split.references:
                continue
            if [s.path for s in split.tests[category]] != [s.path for s in tests]:
                raise RuntimeError("test sets differ between K: the pool must be fixed")
            started = time.perf_counter()
            refs = torch.stack([load_image(s.path, size, transform) for s in split.references[category]])
            views = augment_references(refs, detector.augment)
            bank = torch.cat([model.flatten(model.embed(clip_to_tf(views[i:i + 8]))) for i in range(0, len(views), 8)])
            full_rows = bank.shape[0]
            if max_rows and full_rows > max_rows:
                bank = bank[greedy_coreset(bank, max_rows)]
            model.memory_bank, model.bank_norms = bank, squared_norms(bank)
            reweighted, map_max, maps = [], [], []
            for i in range(0, len(tests), 8):
                embedding = test_embeddings[i:i + 8].float()
                scores, where, flat = model.patch_scores(embedding)
                reweighted.append(model.image_scores(scores, where, flat))
                batch_maps = model.anomaly_maps(scores, tuple(embedding.shape[-2:]), (size, size))
                map_max.append(batch_maps.flatten(1).amax(1))
                maps.extend(batch_maps.numpy())
            reweighted, map_max = torch.cat(reweighted).numpy(), torch.cat(map_max).numpy()
            with_mask = [i for i, m in enumerate(masks) if m is not None]
            pixel = float("nan")
            if any(labels[i] == 1 for i in with_mask):
                truth = np.concatenate([masks[i].reshape(-1) > 0.5 for i in with_mask])
                pixel = roc_auc_score(truth, np.concatenate([maps[i].reshape(-1) for i in with_mask]))
            row = {
                "config": name, **{k: v for k, v in config.items()}, "transform": transform,
                "max_bank_rows": max_rows, "category": category, "shots": shots, "seed": seed,
                "n_test": len(tests), "bank_rows": int(bank.shape[0]), "full_rows": full_rows,
                "image_auroc": 100 * roc_auc_score(labels, reweighted),
                "image_auroc_mapmax": 100 * roc_auc_score(labels, map_max),
                "pixel_auroc": 100 * pixel,
                "seconds": round(embed_s + time.perf_counter() - started, 1),
            }
            write_row(out, row)


def write_row(out: Any, row: dict[str, Any]) -> None:
    """One result as a JSON line in the output file (flushed: a long sweep can be read while it runs) and on stdout."""
    line = json.dumps(row, default=str)
    out.write(line + "\n")
    out.flush()
    print(line, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--shots", default="1,4,16")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--categories")
    parser.add_argument("--config", action="append", default=[])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    from adapters.cnn_runtime import choose as choose_cnn_runtime

    choose_cnn_runtime("auto")  # the daemon's CPU runtime of the CNN trunk (same figures within 1e-4, faster)
    if args.threads:
        torch.set_num_threads(args.threads)
    samples = discover(args.data, split="test")
    try:
        train = discover(args.data, split="train")
    except DatasetError:
        train = []
    if args.categories:
        wanted = set(args.categories.split(","))
        samples = [s for s in samples if s.category in wanted]
    by_category = defaultdict(int)
    for s in samples:
        by_category[s.category] += 1
    shots = [int(k) for k in args.shots.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    with open(args.out, "a") as out:
        for text in args.config or ["base"]:
            name, config = parse_config(text)
            run_config(name, config, samples, train, shots, seeds, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
