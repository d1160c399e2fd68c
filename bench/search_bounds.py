"""How much of the full bank an exact pruned search would still have to multiply (issue 24, a lever not built yet).

For the 1024 patches of a frame against a full 16-reference bank (16384 rows of real Lite0 features), the share of
bank rows that no lower bound can rule out, given the exact nearest distance d* of each patch (float32 cdist):

- ball bound per cluster: d(q, x) ≥ |q - c| - r for the rows of a cluster of centre c and radius r (the 1024
  position groups of the bank, and 1024 k-means clusters, 8 Lloyd iterations);
- PCA prefix: d(q, x) ≥ the distance of their first k principal coordinates (k = 32, 64, 96), and the share of
  patches that keep at most 240 such rows (the int8 search re-checks 240 candidates per patch).

These are ideal bounds (no int8 rounding slack), i.e. the best such a search could do. Two banks: the blurred-noise
references of bench_geometry.py (its frame) and 16 hazelnut references of ../shared/data/inspection-samples (2 test
images).

    python bench/search_bounds.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.profile_frame import real_bank_detector
from model.geometry import Geometry, cut_frame, normalised_inputs, plan_frame
from model.patchcore import build_patchcore, clip_to_tf


def ball_share(queries: torch.Tensor, bank: torch.Tensor, assign: torch.Tensor, best: torch.Tensor) -> float:
    """Share of bank rows whose cluster's ball bound does not exceed the patch's nearest distance."""
    k = int(assign.max()) + 1
    counts = torch.bincount(assign, minlength=k).float()
    centres = torch.zeros(k, bank.shape[1]).index_add_(0, assign, bank) / counts.clamp_min(1)[:, None]
    radii = torch.zeros(k).scatter_reduce_(0, assign, (bank - centres[assign]).norm(dim=1), "amax")
    needed = (torch.cdist(queries, centres) - radii <= best[:, None]).float()
    return float((needed @ counts).mean() / bank.shape[0])


def bounds(queries: torch.Tensor, bank: torch.Tensor) -> dict[str, float]:
    best = torch.cdist(queries, bank).min(dim=1).values
    result = {"position_groups_rows": ball_share(queries, bank, torch.arange(bank.shape[0]) % (bank.shape[0] // 16),
                                                 best)}
    centres = bank[torch.randperm(bank.shape[0], generator=torch.Generator().manual_seed(0))[:1024]].clone()
    for _ in range(8):
        assign = torch.cdist(bank, centres).argmin(dim=1)
        centres = torch.zeros_like(centres).index_add_(0, assign, bank) / torch.bincount(
            assign, minlength=1024).clamp_min(1)[:, None]
    result["kmeans1024_rows"] = ball_share(queries, bank, torch.cdist(bank, centres).argmin(dim=1), best)
    mean = bank.mean(dim=0)
    axes = torch.linalg.svd(bank - mean, full_matrices=False)[2]
    turned_bank, turned_queries = (bank - mean) @ axes.t(), (queries - mean) @ axes.t()
    for k in (32, 64, 96):
        kept = torch.cdist(turned_queries[:, :k], turned_bank[:, :k]) <= best[:, None]
        result[f"pca{k}_rows"] = float(kept.float().mean())
        result[f"pca{k}_patches_within_240_rows"] = float((kept.sum(dim=1) <= 240).float().mean())
    return {key: round(value, 4) for key, value in result.items()}


def main() -> int:
    from bench.bench_geometry import frame
    from model.fewshot import load_reference_images

    torch.set_num_threads(2)
    detector = real_bank_detector(16, Geometry("squash"))
    rgb = frame("671x447", 1)
    with torch.inference_mode():
        images = clip_to_tf(normalised_inputs(cut_frame(rgb, plan_frame(rgb.shape[:2], detector.geometry, 256))))
        queries = detector.model.flatten(detector.model.embed(images))
    print(json.dumps({"bank": "blurred noise (bench_geometry)", **bounds(queries, detector.model.memory_bank)}))
    category = Path(__file__).resolve().parents[2] / "shared" / "data" / "inspection-samples" / "hazelnut"
    references = sorted((category / "train" / "good").glob("*"))[:16]
    tests = sorted((category / "test").glob("*/*"))
    if len(references) < 16 or len(tests) < 2:
        print(f"{category}: not enough samples, hazelnut skipped")
        return 0
    detector = build_patchcore(max_bank_rows=0)
    detector.set_references(load_reference_images(references, 256))
    with torch.inference_mode():
        queries = detector.model.flatten(detector.model.embed(clip_to_tf(
            load_reference_images([tests[0], tests[-1]], 256))))
    print(json.dumps({"bank": "hazelnut", **bounds(queries, detector.model.memory_bank)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
