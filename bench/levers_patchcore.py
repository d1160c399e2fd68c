"""PatchCore levers on one category, per defect type: embeds the test set and the K references once per embedding
variant (photometric normalisation, taps, size, pooling), caches the embeddings, then scores many bank / score
variants on them (flipped references, per-channel feature standardisation, image score from the map's maximum,
top-k mean, anomalib's re-weighting, a global Mahalanobis score of pooled features, map blur).

    python bench/levers_patchcore.py --data ../shared/data/inspection-samples --category magnetic_tile --shots 16 \
        --threads 1 --photometric none --out levers.jsonl

Image AUROC is given overall and per defect type (that type against the normals); pixel AUROC at the model size
(the squashed masks, as `sweep_patchcore.py` without `resize`; on every `--pixel-stride`th pixel), overall and per defect type (that type's images and
the normals). Combined scores are z-scored against the references' own leave-one-out scores (no test statistics).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.covariance import LedoitWolf
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.dataset_loading import load_image, load_mask
from model.datasets import DatasetError, discover
from model.gaussian import gaussian_blur
from model.kshot import kshot_split
from model.patchcore import build_patchcore, clip_to_tf
from model.patchcore.search import nearest
from model.patchcore.torch_model import squared_norms
from model.preprocess import OPENAI_MEAN, OPENAI_STD


def photometric(images: torch.Tensor, mode: str) -> torch.Tensor:
    """CLIP-normalised images → the same with each image's grey level standardised (mode 'grey': mean and std of
    the luminance brought to 0.45 / 0.2 in [0, 1] pixels, one affine map for all channels; 'mean': the mean only)."""
    if mode == "none":
        return images
    std = torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    mean = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)
    pixels = images * std + mean
    grey = (0.299 * pixels[:, 0] + 0.587 * pixels[:, 1] + 0.114 * pixels[:, 2]).flatten(1)
    mu = grey.mean(1).view(-1, 1, 1, 1)
    sd = grey.std(1).clamp_min(1e-3).view(-1, 1, 1, 1)
    if mode == "grey":
        pixels = (pixels - mu) / sd * 0.2 + 0.45
    elif mode == "mean":
        pixels = pixels - mu + 0.45
    else:
        raise ValueError(mode)
    return (pixels - mean) / std


@torch.no_grad()
def embed(detector, paths, size, mode, pool, flips=False) -> torch.Tensor:
    out = []
    model = detector.model
    if pool != 3:
        model.pool = torch.nn.AvgPool2d(pool, stride=1, padding=pool // 2)
    for start in range(0, len(paths), 8):
        images = photometric(torch.stack([load_image(p, size, "fast") for p in paths[start:start + 8]]), mode)
        if flips:
            images = torch.cat([images, images.flip(-1), images.flip(-2)])
        out.append(model.embed(clip_to_tf(images)).half())
    return torch.cat(out)


def auroc(labels, scores) -> float:
    return 100 * roc_auc_score(labels, scores)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--category", required=True)
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--photometric", default="none")
    parser.add_argument("--taps", default="4-10")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--pool", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--evals", default="refs,refs+flips,refs-std,refs+flips-std",
                        help="bank variants: refs / refs+flips, '-std' for per-channel feature standardisation")
    parser.add_argument("--pixel-stride", type=int, default=4,
                        help="pixel AUROC on every Nth pixel of each axis (1: every pixel, 16x slower than 4)")
    parser.add_argument("--no-global", action="store_true", help="skip the global Mahalanobis score (slow)")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/levers-cache"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    samples = [s for s in discover(args.data, split="test") if s.category == args.category]
    try:
        train = [s for s in discover(args.data, split="train") if s.category == args.category]
    except DatasetError:
        train = []
    split = kshot_split(samples, args.shots, args.seed, train_samples=train)
    tests, refs = split.tests[args.category], split.references[args.category]
    taps = tuple(int(t) for t in args.taps.split("-"))
    detector = build_patchcore(taps=taps, image_size=args.image_size, max_bank_rows=None)
    size = args.image_size
    key = f"{args.category}-k{args.shots}-s{args.seed}-{args.photometric}-{args.taps}-{size}-p{args.pool}"
    args.cache.mkdir(parents=True, exist_ok=True)
    cache = args.cache / f"{key}.pt"
    started = time.perf_counter()
    if cache.exists():
        test_emb, ref_emb = torch.load(cache)
    else:
        ref_emb = embed(detector, [s.path for s in refs], size, args.photometric, args.pool, flips=True)
        test_emb = embed(detector, [s.path for s in tests], size, args.photometric, args.pool)
        torch.save((test_emb, ref_emb), cache)
    print(f"embedded in {time.perf_counter() - started:.0f} s", flush=True)
    labels = np.array([s.label for s in tests])
    defects = np.array([s.defect for s in tests])
    # pixel AUROC on every Nth pixel of each axis (the maps are blurred by sigma >= 2 px: a close estimate, faster)
    stride = args.pixel_stride
    masks = np.stack([load_mask(s, size).numpy()[::stride, ::stride] > 0.5 for s in tests])
    k = len(refs)
    grid = tuple(test_emb.shape[-2:])
    dim = test_emb.shape[1]

    def flat(e):
        return e.float().permute(0, 2, 3, 1).reshape(e.shape[0], -1, dim)

    test_flat = flat(test_emb)  # (N, P, D)
    ref_all = flat(ref_emb)  # (3K, P, D): originals, h-flips, v-flips

    def evaluate(name, bank_views, standardise):
        bank_imgs = ref_all[[i for v in bank_views for i in range(v * k, v * k + k)]]
        bank = bank_imgs.reshape(-1, dim)
        shift, scale = torch.zeros(dim), torch.ones(dim)
        if standardise:
            shift, scale = bank.mean(0), bank.std(0).clamp_min(1e-4)
        bank_s = (bank - shift) / scale
        norms = squared_norms(bank_s)
        queries = ((test_flat - shift) / scale)
        scores = nearest(queries.reshape(-1, dim), bank_s, norms)[0].reshape(len(tests), -1)
        # leave-one-out of the original references (their own views left out), for z-scoring
        loo = []
        for i in range(0 if args.no_global else k):
            keep = [j for v in bank_views for j in range(v * k, v * k + k) if j % k != i]
            b = (ref_all[keep].reshape(-1, dim) - shift) / scale
            loo.append(nearest((ref_all[i] - shift) / scale, b, squared_norms(b))[0])
        results = {}
        for sigma in (2.0, 4.0, 8.0):
            maps = F.interpolate(scores.reshape(-1, 1, *grid), size=(size, size), mode="nearest")
            maps = gaussian_blur(maps, sigma, padding="reflect")[:, 0].numpy()
            results[f"pixel_s{sigma:g}"] = maps[:, ::stride, ::stride]
            if sigma == 4.0:
                full_maps = maps
        maps = results["pixel_s4"]
        flat_maps = torch.from_numpy(full_maps.reshape(len(tests), -1))
        image = {
            "max": flat_maps.amax(1).numpy(),
            "patchmax": scores.amax(1).numpy(),
            "top1pc": flat_maps.topk(int(0.01 * size * size), 1).values.mean(1).numpy(),
            "top10pc": flat_maps.topk(int(0.1 * size * size), 1).values.mean(1).numpy(),
            "mean": scores.mean(1).numpy(),
        }
        # global: Mahalanobis (Ledoit-Wolf) of each image's mean-pooled and std-pooled raw features vs the refs
        if args.no_global:
            return finish(name, standardise, bank, image, results, maps, {})

        ref_imgs = ref_all[[i for v in bank_views for i in range(v * k, v * k + k)]]

        def pooled(x):
            return torch.cat([x.mean(1), x.std(1)], 1).numpy()
        lw = LedoitWolf().fit(pooled(ref_imgs))
        image["global"] = lw.mahalanobis(pooled(test_flat))
        loo_max = torch.stack(loo).amax(1).numpy()
        # z-scored combination: the patch maximum plus the global score (refs' own statistics)
        loo_global = []
        for i in range(k):
            keep = [j for v in bank_views for j in range(v * k, v * k + k) if j % k != i]
            loo_global.append(LedoitWolf().fit(pooled(ref_all[keep])).mahalanobis(pooled(ref_all[i:i + 1]))[0])
        loo_global = np.array(loo_global)
        zmax = (image["patchmax"] - loo_max.mean()) / (loo_max.std() + 1e-6)
        zglob = (image["global"] - loo_global.mean()) / (loo_global.std() + 1e-6)
        image["max+global"] = zmax + zglob
        image["max+0.5global"] = zmax + 0.5 * zglob
        return finish(name, standardise, bank, image, results, maps, image)

    def finish(name, standardise, bank, image, results, maps, with_global):
        row = {"category": args.category, "shots": k, "seed": args.seed, "photometric": args.photometric,
               "taps": args.taps, "image_size": size, "pool": args.pool, "bank": name,
               "standardise": standardise, "bank_rows": int(bank.shape[0])}
        for score_name, values in image.items():
            row[f"image_{score_name}"] = round(auroc(labels, values), 1)
        for pixel_name in ("pixel_s2", "pixel_s4", "pixel_s8"):
            row[pixel_name] = round(auroc(masks.reshape(-1), results[pixel_name].reshape(-1)), 1)
        # each map less its own median (a per-frame offset removed; the image score is unchanged)
        centred = maps - np.median(maps.reshape(len(tests), -1), 1)[:, None, None]
        row["pixel_s4_median_centred"] = round(auroc(masks.reshape(-1), centred.reshape(-1)), 1)
        per_defect = {}
        for defect in sorted(set(defects) - {"good"}):
            pick = (defects == defect) | (defects == "good")
            per_defect[defect] = (round(auroc(labels[pick], image["patchmax"][pick]), 1),
                                  round(auroc(labels[pick], with_global["global"][pick]), 1) if with_global else None,
                                  round(auroc(masks[pick].reshape(-1), maps[pick].reshape(-1)), 1))
        row["per_defect_patchmax_global_pixel"] = per_defect
        line = json.dumps(row)
        print(line, flush=True)
        out.write(line + "\n")
        out.flush()

    with open(args.out, "a") as out:
        for variant in args.evals.split(","):
            name, _, std = variant.partition("-")
            evaluate(name, [0, 1, 2] if name == "refs+flips" else [0], std == "std")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
