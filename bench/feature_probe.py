"""How far the frozen features go: a linear probe on each frame's globally pooled multi-layer EfficientNet-Lite
features (mean, max and std of each tap), trained on the K references and N labelled defects of the learning-curve
split, scored on its test set. A ceiling study for the labelled-defect targets (docs/models.md, "How far frozen
Lite0 features go"): if a classifier of the whole frame, given many labels, cannot separate a category, a head on the
same features given few labels will not either.

The split is `bench/supervised_patchcore.py --pool P`'s: K references (model/kshot.py), a pool of P defects out of
the test set (model/mixed_supervision.py), N of it drawn with the seed. Image AUROC and the miss rate at the
threshold that 0.5 % of the test normals exceed, with PatchCore's own score for the same test set.

    OMP_NUM_THREADS=1 python bench/feature_probe.py --data ../shared/data/inspection-samples \\
        --category magnetic_tile --shots 16 --pool 188 --anomalies 16,64,188
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.dataset_loading import load_image
from model.datasets import discover
from model.kshot import kshot_split
from model.metrics import image_metrics
from model.mixed_supervision import mixed_split, operating_point
from model.patchcore import build_patchcore, clip_to_tf
from model.patchcore.backbone import TapExtractor, build_timm_backbone

SIZE = 256
PROBE_TAPS = (2, 4, 7, 10, 13, 15)  # Lite0's stage ends, stride 4 to 32


@torch.no_grad()
def pooled_features(extractor: TapExtractor, detector, paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """(mean, max and std of every tap per frame, PatchCore's image score) of the frames, squashed to SIZE."""
    features, scores = [], []
    for start in range(0, len(paths), 16):
        images = torch.stack([load_image(p, SIZE, "fast") for p in paths[start:start + 16]])
        maps = extractor(clip_to_tf(images))
        features.append(torch.cat([torch.cat([m.mean((2, 3)), m.amax((2, 3)), m.std((2, 3))], 1) for m in maps], 1))
        scores.append(detector.predict(images).scores)
    return torch.cat(features).numpy(), torch.cat(scores).numpy()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--category", default="magnetic_tile")
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--pool", type=int, default=188, help="defects held out of the test set to train from")
    parser.add_argument("--anomalies", default="16,64,188")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.preprocessing import StandardScaler

    torch.set_num_threads(1)
    samples = [s for s in discover(args.data, split="test") if s.category == args.category]
    split = kshot_split(samples, args.shots, args.seed, train_samples=[])
    references = split.references[args.category]
    counts = [int(c) for c in args.anomalies.split(",")]
    mixed = mixed_split(split.tests, max(counts), args.seed, args.pool)
    tests, pool = mixed.tests[args.category], mixed.train_anomalies[args.category]
    backbone, _ = build_timm_backbone()
    extractor = TapExtractor(backbone, PROBE_TAPS).eval()
    detector = build_patchcore(image_size=SIZE)
    detector.set_references(torch.stack([load_image(s.path, SIZE, "fast") for s in references]))
    x_refs, _ = pooled_features(extractor, detector, [s.path for s in references])
    x_pool, _ = pooled_features(extractor, detector, [s.path for s in pool])
    x_test, patchcore = pooled_features(extractor, detector, [s.path for s in tests])
    labels = np.array([s.label for s in tests])
    print("| category | K | N | score | image AUROC | missed at 0.5 % FRR |\n|---|---|---|---|---|---|")

    def line(n: int, name: str, scores: np.ndarray) -> None:
        point = operating_point(labels, scores)
        print(f"| {args.category} | {len(references)} | {n} | {name} | "
              f"{100 * image_metrics(labels, scores)['image_auroc']:.1f} | "
              f"{int(point['missed'])}/{int(point['defects'])} ({100 * point['miss_rate']:.1f} %) |", flush=True)

    line(0, "PatchCore", patchcore)
    order = np.random.default_rng(args.seed).permutation(len(pool))
    for n in counts:
        chosen = order[:min(n, len(pool))]
        train = np.concatenate([x_refs, x_pool[chosen]])
        target = np.r_[np.zeros(len(x_refs)), np.ones(len(chosen))]
        scaler = StandardScaler().fit(train)
        probe = LogisticRegressionCV(Cs=10, cv=4, max_iter=5000, class_weight="balanced", scoring="neg_log_loss",
                                     l1_ratios=(0.0,), use_legacy_attributes=False)
        probe.fit(scaler.transform(train), target)
        line(len(chosen), "linear probe", probe.decision_function(scaler.transform(x_test)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
