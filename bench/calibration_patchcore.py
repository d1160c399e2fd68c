"""Are the daemon's calibrated PatchCore thresholds trustworthy? Realised false-reject and miss rates on real data.

For each category of a meta.json dataset, K shots and seed, the K references are those of
`anomalyd eval --shots K --seed S` (model/kshot.py). The live bank is built from them as the daemon builds it, the
image threshold is calibrated from the references alone with a calibration rule at a target false-reject rate (the
rule "daemon" runs the functions the daemon runs: `model.patchcore.known_good.patchcore_known_good` and
`quantile_thresholds`, the bound `anomalyd calibrate` shares; "current" is the rule before it), and the test set is scored against the live bank on the daemon's 0–1 scale: the realised false-reject rate
is the share of test normals at or above the threshold, the miss rate the share of test anomalies below it (image
level, as the daemon alerts: score >= threshold). Pooled rows sum the counts over categories, shots and seeds.

    nice -n 19 python bench/calibration_patchcore.py --data ../shared/data/inspection-samples \\
        --shots 4,16 --seeds 0,1 --rate 0.005 --rule current --rule daemon

Everything runs through the daemon's preprocessing (decode + fast resize). Raw test scores and reference
embeddings are cached per (category, shots, seed) under --cache, so comparing rules re-embeds nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from daemon.references.calibration import quantile_thresholds
from model.datasets import DatasetError, discover
from model.known_good import CALIBRATION_HOLDOUTS, DEFAULT_DISTANCE_SCALE
from model.kshot import kshot_split
from model.patchcore import build_patchcore, clip_to_tf, greedy_coreset
from model.patchcore.known_good import leave_one_out_scores, patchcore_embeddings, patchcore_known_good
from model.preprocess import decode_image, fast_transform


def load(path: Path, size: int) -> torch.Tensor:
    return fast_transform(decode_image(path), size)


@torch.inference_mode()
def live_scores(detector, bank: torch.Tensor, images: list[Path], batch: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Raw (image score, map maximum) of `images` against `bank`, as the daemon's detector computes them."""
    model, size = detector.model, detector.image_size
    model.set_memory_bank(bank)
    scores, maxima = [], []
    for start in range(0, len(images), batch):
        x = torch.stack([load(p, size) for p in images[start:start + batch]])
        embedding = model.embed(clip_to_tf(x))
        patch, where, flat = model.patch_scores(embedding)
        scores.append(model.image_scores(patch, where, flat))
        maxima.append(model.anomaly_maps(patch, tuple(embedding.shape[-2:]), (size, size)).flatten(1).amax(1))
    return torch.cat(scores).numpy(), torch.cat(maxima).numpy()


def live_bank(detector, embeddings: list[torch.Tensor]) -> torch.Tensor:
    bank = torch.cat([detector.model.flatten(e) for e in embeddings])
    if detector.max_bank_rows and bank.shape[0] > detector.max_bank_rows:  # as PatchCoreDetector.build_bank
        bank = bank[greedy_coreset(bank, detector.max_bank_rows)]
    return bank


def cases(args, detector, cache: Path):
    """Per (category, shots, seed): reference files + embeddings, test labels and raw live scores (cached)."""
    samples = discover(args.data, split="test")
    try:
        train = discover(args.data, split="train")
    except DatasetError:
        train = []
    wanted = set(args.categories.split(",")) if args.categories else None
    for shots in [int(k) for k in args.shots.split(",")]:
        for seed in [int(s) for s in args.seeds.split(",")]:
            split = kshot_split(samples, shots, seed, train_samples=train)
            for category in sorted(split.references):
                if wanted and category not in wanted:
                    continue
                references = [s.path for s in split.references[category]]
                tests = split.tests[category]
                key = hashlib.sha256("|".join(map(str, references + [s.path for s in tests])).encode()).hexdigest()
                file = cache / f"{category}-k{shots}-s{seed}-{key[:12]}.pt"
                if file.is_file():
                    case = torch.load(file, weights_only=True)
                else:
                    started = time.perf_counter()
                    embeddings = patchcore_embeddings(detector, references)
                    raw, maxima = live_scores(detector, live_bank(detector, embeddings), [s.path for s in tests])
                    case = {"embeddings": [e.half() for e in embeddings], "raw": torch.from_numpy(raw),
                            "maxima": torch.from_numpy(maxima),
                            "labels": torch.tensor([s.label for s in tests])}
                    torch.save(case, file)
                    print(f"# {category} K={shots} seed={seed}: {len(tests)} test images scored in "
                          f"{time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
                case.update(category=category, shots=shots, seed=seed, references=references)
                case["embeddings"] = [e.float() for e in case["embeddings"]]
                yield case


# --- calibration rules: (detector, case, rate) -> (distance scale d0, image threshold on the 0-1 scale) ------------

Rule = Callable[..., tuple[float, float]]
RULES: dict[str, Rule] = {}


def rule(name: str) -> Callable[[Rule], Rule]:
    def register(fn: Rule) -> Rule:
        RULES[name] = fn
        return fn

    return register


def _scaled(values, d0: float) -> list[float]:
    return (1.0 - np.exp(-np.asarray(values, np.float64) / d0)).tolist()


@rule("current")
def current(detector, case, rate):
    """Before this change: leave-one-out on up to 8 references, d0 = their median, `upper_bound` on the 0-1 scale."""
    raw, maxima = leave_one_out_scores(detector.model, case["embeddings"], detector.image_size)
    d0 = float(np.median(raw)) if raw else DEFAULT_DISTANCE_SCALE
    return d0, quantile_thresholds(_scaled(raw, d0), _scaled(maxima, d0), rate)[0]


@rule("daemon")
def daemon(detector, case, rate):
    """The daemon's rule (daemon/references/manager.py): held-out references and their shifted/turned/exposed views
    (`patchcore_known_good`), d0 = median of the references' own scores, `quantile_thresholds` on the 0-1 scale."""
    known = patchcore_known_good(detector, case["references"], embeddings=case["embeddings"])
    d0 = known.distance_scale
    return d0, quantile_thresholds(_scaled(known.scores, d0), _scaled(known.maxima, d0), rate)[0]


def _loo(detector, case, limit: int = CALIBRATION_HOLDOUTS):
    key = f"loo{limit}"
    if key not in case:
        case[key] = leave_one_out_scores(detector.model, case["embeddings"], detector.image_size, limit)
    return case[key]


@rule("loo-all")
def loo_all(detector, case, rate):
    """Every reference held out once (not only 8)."""
    raw, maxima = _loo(detector, case, 10_000)
    d0 = float(np.median(raw))
    return d0, quantile_thresholds(_scaled(raw, d0), _scaled(maxima, d0), rate)[0]


def _floor(factor: float) -> Rule:
    def floor_rule(detector, case, rate):
        raw, maxima = _loo(detector, case)
        d0 = float(np.median(raw))
        threshold = quantile_thresholds(_scaled(raw, d0), _scaled(maxima, d0), rate)[0]
        return d0, max(threshold, 1 - np.exp(-factor))
    floor_rule.__doc__ = f"current, at least {factor} d0 (raw)"
    return floor_rule


for _factor in (1.25, 1.5, 1.75, 2.0):
    rule(f"floor{_factor}")(_floor(_factor))


def _log_bound(z_kind: str) -> Rule:
    def log_rule(detector, case, rate):
        from scipy import stats

        raw, _ = _loo(detector, case, 10_000)
        d0 = float(np.median(raw))
        logs = np.log(np.asarray(raw) / d0)
        n = logs.size
        if z_kind == "mad":
            spread = 1.4826 * float(np.median(np.abs(logs - np.median(logs))))
            bound = float(np.median(logs)) + stats.norm.ppf(1 - rate) * spread
        else:
            bound = float(logs.mean()) + stats.t.ppf(1 - rate, n - 1) * float(logs.std(ddof=1)) * np.sqrt(1 + 1 / n)
        return d0, 1 - np.exp(-np.exp(bound))
    return log_rule


rule("log-mad")(_log_bound("mad"))
rule("log-t")(_log_bound("t"))


def perturbed_views(path: Path, size: int, shift: float, gain: float, degrees: float = 0.0) -> list[torch.Tensor]:
    """A reference shifted by ±shift of its size (reflected border) along each axis, and ±gain brighter."""
    import cv2

    rgb = decode_image(path)
    h, w = rgb.shape[:2]
    views = []
    for angle in (degrees, -degrees) if degrees else ():
        matrix = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
        views.append(cv2.warpAffine(rgb, matrix, (w, h), borderMode=cv2.BORDER_REFLECT_101))
    for dx, dy in ((shift, 0), (-shift, 0), (0, shift), (0, -shift)):
        matrix = np.float32([[1, 0, dx * w], [0, 1, dy * h]])
        views.append(cv2.warpAffine(rgb, matrix, (w, h), borderMode=cv2.BORDER_REFLECT_101))
    for g in (1 + gain, 1 - gain):
        views.append(np.clip(rgb.astype(np.float32) * g, 0, 255).astype(np.uint8))
    return [fast_transform(v, size) for v in views]


@torch.inference_mode()
def _perturbed(detector, case, shift: float, gain: float, degrees: float = 0.0):
    """Raw (image score, map max) of perturbed views of each held-out reference against the other references."""
    key = f"pert{shift}-{gain}-{degrees}"
    if key in case:
        return case[key]
    model, size = detector.model, detector.image_size
    flats = [model.flatten(e) for e in case["embeddings"]]
    scores, maxima = [], []
    for held_out, path in enumerate(case["references"][:CALIBRATION_HOLDOUTS]):
        model.set_memory_bank(torch.cat([f for j, f in enumerate(flats) if j != held_out]))
        views = torch.stack(perturbed_views(path, size, shift, gain, degrees))
        embedding = model.embed(clip_to_tf(views))
        patch, where, flat = model.patch_scores(embedding)
        scores += model.image_scores(patch, where, flat).tolist()
        maxima += model.anomaly_maps(patch, tuple(embedding.shape[-2:]), (size, size)).flatten(1).amax(1).tolist()
    case[key] = (scores, maxima)
    return case[key]


def _perturb_rule(shift: float, gain: float, degrees: float = 0.0) -> Rule:
    def perturb_rule(detector, case, rate):
        raw, maxima = _loo(detector, case)
        d0 = float(np.median(raw))
        p_raw, p_max = _perturbed(detector, case, shift, gain, degrees)
        return d0, quantile_thresholds(_scaled(raw + p_raw, d0), _scaled(maxima + p_max, d0), rate)[0]
    return perturb_rule


for _shift in (0.01, 0.02, 0.04):
    rule(f"perturb{_shift}")(_perturb_rule(_shift, 0.05))
rule("perturb0.02-rot5")(_perturb_rule(0.02, 0.05, 5.0))
rule("perturb0.02-g10")(_perturb_rule(0.02, 0.10))


def evaluate(detector, case, name: str, rate: float) -> dict:
    d0, threshold = RULES[name](detector, case, rate)
    scores = 1.0 - np.exp(-case["raw"].double().numpy() / d0)
    labels = case["labels"].numpy()
    normal, anomalous = scores[labels == 0], scores[labels == 1]
    return {"rule": name, "category": case["category"], "shots": case["shots"], "seed": case["seed"],
            "threshold": threshold, "d0": d0,
            "false_rejects": int((normal >= threshold).sum()), "normals": int(normal.size),
            "misses": int((anomalous < threshold).sum()), "anomalies": int(anomalous.size),
            # where the test normals sit: their 99th percentile in units of d0 (the threshold's raw value too)
            "normal_p99_d0": float(np.quantile(case["raw"][labels == 0].numpy(), 0.99) / d0),
            "threshold_d0": float(-np.log(max(1e-12, 1 - threshold))) if threshold < 1 else float("inf")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--shots", default="4,16")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--categories")
    parser.add_argument("--rate", type=float, default=0.005, help="target false-reject rate (default 0.005)")
    parser.add_argument("--rule", action="append", choices=sorted(RULES), help="default: current and daemon")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/anomalyd-calibration-cache"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--detail", action="store_true", help="a row per category, shots and seed")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.cache.mkdir(parents=True, exist_ok=True)
    detector = build_patchcore()  # the daemon's default: EfficientNet-Lite0, 256 px, its default bank size
    names = args.rule or ["current", "daemon"]
    rows = [evaluate(detector, case, name, args.rate) for case in cases(args, detector, args.cache) for name in names]

    print(f"target false-reject rate {100 * args.rate:g} %; FRR = test normals alerted, miss = test anomalies not "
          "alerted (image level)")
    header = "| rule | category | K | FRR % (n) | miss % (n) | threshold | thr/d0 | normal p99/d0 |"
    if args.detail:
        print(header + " seed |")
        print("|---" * 9 + "|")
        for r in rows:
            print(f"| {r['rule']} | {r['category']} | {r['shots']} | {_pct(r['false_rejects'], r['normals'])} | "
                  f"{_pct(r['misses'], r['anomalies'])} | {r['threshold']:.4f} | {r['threshold_d0']:.2f} | "
                  f"{r['normal_p99_d0']:.2f} | {r['seed']} |")
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["rule"], r["category"], r["shots"])].append(r)
        groups[(r["rule"], "all", r["shots"])].append(r)
        groups[(r["rule"], "all", "all")].append(r)
    print("\nper category (seeds pooled) and pooled over categories; " + "macro FRR = mean of per-category rates")
    print("| rule | category | K | FRR % (n) | miss % (n) | mean thr/d0 |")
    print("|---|---|---|---|---|---|")
    order = sorted(groups, key=lambda g: (names.index(g[0]), g[1] == "all", g[1], str(g[2])))
    for key in order:
        group = groups[key]
        fr, n = sum(r["false_rejects"] for r in group), sum(r["normals"] for r in group)
        miss, m = sum(r["misses"] for r in group), sum(r["anomalies"] for r in group)
        extra = ""
        if key[1] == "all":
            per_category = defaultdict(list)
            for r in group:
                per_category[r["category"]].append(r["false_rejects"] / r["normals"])
            extra = f" (macro {100 * np.mean([np.mean(v) for v in per_category.values()]):.1f})"
        print(f"| {key[0]} | {key[1]} | {key[2]} | {_pct(fr, n)}{extra} | {_pct(miss, m)} | "
              f"{np.mean([r['threshold_d0'] for r in group]):.2f} |")
    return 0


def _pct(k: int, n: int) -> str:
    return f"{100 * k / max(n, 1):.1f} ({k}/{n})"


if __name__ == "__main__":
    raise SystemExit(main())
