"""Per-stage milliseconds of one squashed frame through PatchCore's detector path (the daemon's `predict_frames`).

Decode excluded (frames are in-memory RGB uint8, as after the daemon's decode). The bank is the full bank of
`--references` real-weight Lite0 features (16 → 16384 rows) of 256 px blurred-noise references, as
bench/bench_geometry.py builds it. Stages, each timed by calling the detector's own functions in the order
`model.geometry.predict_frames` does:

- cut: plan + cv2 resize of the frame to the model's square (`cut_frame`), stack and normalise (`normalised_inputs`);
- backbone: the CNN to the last tap (`model.features`, channels-last);
- embed: 3x3 average pooling, bilinear upsampling of the coarser tap, concatenation (`model.embed` minus backbone);
- search: `patch_scores` (exact nearest bank row of every patch);
- image score: anomalib's re-weighting (`image_scores`: k-nearest of the top patch's neighbour, softmax);
- map: nearest upsampling to the input and the Gaussian blur (`anomaly_maps`), tensor → NumPy;
- stitch: the map resized to the frame's pixels (`stitch_maps`).

Then the whole `predict_frames` call is timed on its own (the frames/s the bench_geometry row would give). Rounds
run `--rounds` times; the medians are printed (one JSON line per stage and a summary). `--levers` also builds the
baseline (the code before issue 24's levers: BatchNorm not folded, the map by convolution), profiles it in
alternate rounds in the same process, and prints each stage's median ratio (now / baseline) and the max |delta|
of the frame's map and score between the two (each with its own bank, built from the same references), then times
whole `predict_frames` calls of `--batch` frames (one model batch) of both in alternate rounds.

    python bench/profile_frame.py --size 671x447 --threads 2 --rounds 30 --levers
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_geometry import frame
from model.geometry import Geometry, cut_frame, normalised_inputs, plan_frame, predict_frames, stitch_maps
from model.patchcore import build_patchcore
from model.patchcore.backbone import TapExtractor, build_timm_backbone
from model.patchcore.detector import clip_to_tf
from model.patchcore.maps import upsampled_blurred
from model.patchcore.torch_model import PatchcoreModel


def real_bank_detector(references: int, geometry: Geometry, *, baseline: bool = False):
    """A squash detector with the full bank of `references` blurred-noise references (real Lite0 weights);
    `baseline`: its backbone without BatchNorm folded (the code before issue 24's levers)."""
    torch.manual_seed(0)
    images = torch.nn.functional.interpolate(torch.randn(references, 3, 32, 32), size=256, mode="bilinear")
    detector = build_patchcore(max_bank_rows=0, geometry=geometry)
    if baseline:
        net, _ = build_timm_backbone(detector.backbone_name)
        detector.model = PatchcoreModel(TapExtractor(net, detector.model.taps)).eval()
    detector.set_references(images)
    return detector


def convolution_maps(detector) -> None:
    """Make `detector.predict_tf` draw its maps by `anomaly_maps` (the convolution), as before issue 24's levers."""
    from model.detector import Prediction

    model = detector.model

    def predict_tf(images: torch.Tensor) -> Prediction:
        embedding = model.embed(images.float())
        scores, where, flat = model.patch_scores(embedding)
        return Prediction(scores=model.image_scores(scores, where, flat),
                          maps=model.anomaly_maps(scores, tuple(embedding.shape[-2:]), tuple(images.shape[-2:])))

    detector.predict_tf = predict_tf


def profile_once(detector, rgb, *, baseline: bool = False) -> tuple[dict[str, float], np.ndarray, float]:
    """(milliseconds of each stage, the frame's map, its score) for one frame, by the stages of `predict_frames`
    for one squashed input; `baseline`: the map by `anomaly_maps` (the convolution) instead of the detector's."""
    stages: dict[str, float] = {}
    clock = time.perf_counter
    model = detector.model
    with torch.inference_mode():
        t0 = clock()
        plan = plan_frame(rgb.shape[:2], detector.geometry, detector.image_size)
        images = clip_to_tf(normalised_inputs(cut_frame(rgb, plan)))
        t1 = clock()
        features = model.features(images)
        t2 = clock()
        pooled = [model.pool(f.float()) for f in features]
        embedding = pooled[0]
        for feature in pooled[1:]:
            upsampled = torch.nn.functional.interpolate(feature, size=embedding.shape[-2:], mode="bilinear",
                                                        align_corners=False)
            embedding = torch.cat((embedding, upsampled), 1)
        t3 = clock()
        scores, where, flat = model.patch_scores(embedding)
        t4 = clock()
        image_scores = model.image_scores(scores, where, flat)
        t5 = clock()
        grid, size = tuple(embedding.shape[-2:]), tuple(images.shape[-2:])
        maps = model.anomaly_maps(scores, grid, size) if baseline else upsampled_blurred(scores, grid, size,
                                                                                         model.sigma)
        maps_np = maps.float().cpu().numpy()
        score = float(image_scores[0])
        t6 = clock()
        frame_map = stitch_maps([maps_np[0]], plan, detector.geometry)
        t7 = clock()
    for name, a, b in (("cut", t0, t1), ("backbone", t1, t2), ("embed", t2, t3), ("search", t3, t4),
                       ("image_score", t4, t5), ("map", t5, t6), ("stitch", t6, t7), ("sum", t0, t7)):
        stages[name] = (b - a) * 1e3
    return stages, frame_map, score


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="671x447", help="frame: megapixels (3:2) or WxH")
    parser.add_argument("--references", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8,
                        help="with --levers: also time whole predict_frames calls of this many frames (one batch, "
                             "as bench_geometry.py --frames N), now against the baseline in alternate rounds")
    parser.add_argument("--levers", action="store_true",
                        help="also profile the baseline (BatchNorm not folded, map by convolution) in alternate "
                             "rounds; print each stage's median ratio now / baseline and the max |delta| of maps "
                             "and scores")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    detector = real_bank_detector(args.references, Geometry("squash"))
    baseline = real_bank_detector(args.references, Geometry("squash"), baseline=True) if args.levers else None
    rgb = frame(args.size, 1)
    for _ in range(3):  # warm-up: the bank's prepared form, oneDNN primitives
        profile_once(detector, rgb)
        if baseline is not None:
            profile_once(baseline, rgb, baseline=True)
    rounds, base_rounds, whole = [], [], []
    for _ in range(args.rounds):
        rounds.append(profile_once(detector, rgb)[0])
        if baseline is not None:
            base_rounds.append(profile_once(baseline, rgb, baseline=True)[0])
        started = time.perf_counter()
        predict_frames(detector, [rgb], detector.geometry)
        whole.append((time.perf_counter() - started) * 1e3)
    for name in rounds[0]:
        row = {"stage": name, "median_ms": round(statistics.median(r[name] for r in rounds), 2),
               "min_ms": round(min(r[name] for r in rounds), 2)}
        if base_rounds:
            row["baseline_median_ms"] = round(statistics.median(r[name] for r in base_rounds), 2)
            row["baseline_min_ms"] = round(min(r[name] for r in base_rounds), 2)
            row["ratio_median"] = round(statistics.median(
                a[name] / b[name] for a, b in zip(rounds, base_rounds, strict=True)), 3)
        print(json.dumps(row))
    summary = {"frame": args.size, "threads": torch.get_num_threads(),
               "bank_rows": int(detector.model.memory_bank.shape[0]),
               "predict_frames_median_ms": round(statistics.median(whole), 2),
               "frames_per_s_median": round(1e3 / statistics.median(whole), 2),
               "frames_per_s_best": round(1e3 / min(whole), 2), "load": round(os.getloadavg()[0], 1)}
    if baseline is not None:
        _, now_map, now_score = profile_once(detector, rgb)
        _, base_map, base_score = profile_once(baseline, rgb, baseline=True)
        summary["max_abs_delta_map"] = float(np.abs(now_map - base_map).max())
        summary["abs_delta_score"] = abs(now_score - base_score)
        summary["map_max"] = float(base_map.max())
        convolution_maps(baseline)
        frames = [frame(args.size, seed) for seed in range(args.batch)]
        timed: dict[str, list[float]] = {"now": [], "baseline": []}
        for _ in range(max(3, args.rounds // 4)):
            for name, candidate in (("now", detector), ("baseline", baseline)):
                started = time.perf_counter()
                predict_frames(candidate, frames, candidate.geometry)
                timed[name].append(args.batch / (time.perf_counter() - started))
        summary[f"batch{args.batch}_frames_per_s_median"] = round(statistics.median(timed["now"]), 2)
        summary[f"batch{args.batch}_baseline_frames_per_s_median"] = round(statistics.median(timed["baseline"]), 2)
        summary[f"batch{args.batch}_speedup_median"] = round(statistics.median(
            a / b for a, b in zip(timed["now"], timed["baseline"], strict=True)), 3)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
