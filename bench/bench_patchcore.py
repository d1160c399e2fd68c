"""PatchCore speed on CPU: images/s at batch 1 and 8 (256 px, EfficientNet-Lite0, a 16-reference bank), the share
of the nearest-neighbour search, and the ratio against anomalib 2.7.0's `PatchcoreModel` on the same inputs in the
same process when anomalib can be imported (it is not a project dependency).

    python bench/bench_patchcore.py --threads 2 [--anomalib-path DIR] [--banks full,1638] \
        [--engines torch,onnxruntime,openvino] [--seconds 9] [--json out.json] [--search-only] [--data DIR]

First the nearest-neighbour search alone: anomalib's `nearest_neighbors` (or, without anomalib, an inline copy of
it) against ours (`model.patchcore.search.nearest`, int8 candidates on CPUs with VNNI) on the same patch embeddings,
timed in turns (the ratio is the median of the rounds' ratios), with a parity line (max |delta| of the distances,
against anomalib and against float64 brute force; the candidate path; the share searched again in fp32). Then images/s end to end.

anomalib: `pip install --target DIR anomalib==2.7.0 kornia kornia_rs --no-deps` then `--anomalib-path DIR`.
anomalib's package `__init__` pulls in Lightning and more; the bench imports only its PatchCore torch model
(feature extractor, memory-bank search, scores, map blur) by registering stub parent packages, so nothing outside
the torch model is measured. Both models get the same Lite0 weights, taps (flat blocks 4 and 10 = timm's
`blocks.2`, `blocks.4`), inputs and bank: the full 16384-row bank and/or a greedy coreset of it
(anomalib's default coreset ratio 0.1 gives 1638 rows). Exported engines pass the export's parity gate first.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
import types
from collections import namedtuple
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.patchcore import build_patchcore, clip_to_tf, search
from model.patchcore.backbone import lite_weights_file, load_state_file, map_in_order


def timed(function, batches, seconds: float) -> float:
    """Images per second over at least `seconds` (after one warm-up call)."""
    function(batches[0])
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for batch in batches:
            function(batch)
            done += batch.shape[0]
    return done / (time.perf_counter() - started)


def import_anomalib_patchcore(path: str | None):
    """anomalib's PatchcoreModel class, or None (with the reason printed) when it cannot be imported."""
    if path:
        sys.path[:0] = path.split(os.pathsep)
    try:
        spec = importlib.util.find_spec("anomalib")
    except ValueError:
        spec = None
    if spec is None or not spec.submodule_search_locations:
        print("anomalib: not installed in this environment, ratio not measured")
        return None
    root = Path(next(iter(spec.submodule_search_locations)))

    def package(name: str, folder: Path | None) -> types.ModuleType:
        module = types.ModuleType(name)
        module.__path__ = [str(folder)] if folder else []
        sys.modules[name] = module
        return module

    package("anomalib", root)
    data = package("anomalib.data", None)
    data.InferenceBatch = namedtuple("InferenceBatch", "pred_score anomaly_map")
    utils = package("anomalib.utils", None)
    utils.deprecate = lambda *args, **kwargs: (args[0] if args and callable(args[0]) else (lambda f: f))
    package("anomalib.models", root / "models")
    package("anomalib.models.image", root / "models" / "image")
    package("anomalib.models.image.patchcore", root / "models" / "image" / "patchcore")
    components = package("anomalib.models.components", root / "models" / "components")
    try:
        base = package("anomalib.models.components.base", root / "models" / "components" / "base")
        base.DynamicBufferMixin = importlib.import_module(
            "anomalib.models.components.base.dynamic_buffer").DynamicBufferMixin
        package("anomalib.models.components.feature_extractors",
                root / "models" / "components" / "feature_extractors")
        package("anomalib.models.components.filters", root / "models" / "components" / "filters")
        components.DynamicBufferMixin = base.DynamicBufferMixin
        components.TimmFeatureExtractor = importlib.import_module(
            "anomalib.models.components.feature_extractors.timm").TimmFeatureExtractor
        components.GaussianBlur2d = importlib.import_module("anomalib.models.components.filters.blur").GaussianBlur2d
        components.KCenterGreedy = None  # coreset not used: full bank
        return importlib.import_module("anomalib.models.image.patchcore.torch_model").PatchcoreModel
    except ImportError as exc:
        print(f"anomalib: cannot import its PatchcoreModel ({exc}), ratio not measured")
        return None


def build_anomalib(cls, bank: torch.Tensor):
    model = cls(backbone="tf_efficientnet_lite0", layers=["blocks.2", "blocks.4"], pre_trained=False,
                num_neighbors=9)
    import timm

    full = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    state = map_in_order(load_state_file(lite_weights_file("efficientnet-lite0")), full, "lite0")
    extractor = model.feature_extractor.feature_extractor
    missing = extractor.load_state_dict(state, strict=False).missing_keys
    if missing:
        raise RuntimeError(f"anomalib extractor: weights missing for {missing[:3]}")
    model.eval()
    model.memory_bank = bank.clone()
    return model


def interleaved(candidates: dict[str, Callable[[torch.Tensor], object]], batches: list[torch.Tensor],
                seconds: float, rounds: int = 3) -> dict[str, float]:
    """Images/s of each candidate, timed in turns (`rounds` slices each) so that a change in the machine's load
    falls on all of them alike; the ratios are what to read on a shared machine."""
    for function in candidates.values():
        function(batches[0])  # warm-up: engines allocate on the first call
    done = dict.fromkeys(candidates, 0)
    spent = dict.fromkeys(candidates, 0.0)
    for _ in range(rounds):
        for name, function in candidates.items():
            started = time.perf_counter()
            while time.perf_counter() - started < seconds / rounds:
                for batch in batches:
                    function(batch)
                    done[name] += batch.shape[0]
            spent[name] += time.perf_counter() - started
    return {name: done[name] / spent[name] for name in candidates}


def anomalib_search_inline(embedding: torch.Tensor, bank: torch.Tensor, chunk: int = 1024):
    """anomalib 2.7.0's `PatchcoreModel.nearest_neighbors(embedding, n_neighbors=1)` with its `euclidean_dist`,
    copied (queries in chunks of its DEFAULT_CHUNK_SIZE 1024): the baseline when anomalib is not installed."""
    scores, locations = [], []
    for start in range(0, embedding.shape[0], chunk):
        x = embedding[start:start + chunk]
        x_norm = x.pow(2).sum(dim=-1, keepdim=True)
        y_norm = bank.pow(2).sum(dim=-1, keepdim=True)
        res = torch.matmul(x, bank.transpose(-2, -1))
        res.mul_(-2)
        res.add_(x_norm)
        res.add_(y_norm.transpose(-2, -1))
        value, index = res.clamp_min_(0).sqrt_().min(1)
        scores.append(value)
        locations.append(index)
    return torch.cat(scores), torch.cat(locations)


def compare_search(baseline: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                   bank: torch.Tensor, queries: torch.Tensor, rounds: int) -> dict[str, float]:
    """The nearest-neighbour search alone, anomalib's against ours (`search.nearest`), on the same queries in
    the same process, timed in turns; the ratio is the median of the rounds' ratios. Parity against anomalib and
    against float64 brute force."""
    ours = search.nearest
    baseline(queries)
    ours(queries, bank)  # warm-up: prepares the bank (bf16 copy, transposed copy) once
    theirs_s, ours_s = [], []
    for _ in range(rounds):
        started = time.perf_counter()
        reference, reference_index = baseline(queries)
        theirs_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        distance, index = ours(queries, bank)
        ours_s.append(time.perf_counter() - started)
    truth = torch.cdist(queries.double(), bank.double()).min(dim=1).values
    ratios = sorted(t / o for t, o in zip(theirs_s, ours_s, strict=True))
    return {"queries": queries.shape[0], "anomalib_ms": 1e3 * statistics.median(theirs_s),
            "ours_ms": 1e3 * statistics.median(ours_s), "ratio": statistics.median(ratios),
            "ratio_min": ratios[0], "ratio_max": ratios[-1],
            "max_abs_delta": float((distance - reference).abs().max()),
            "max_rel_delta": float(((distance - reference).abs() / reference.clamp_min(1e-6)).max()),
            "max_abs_delta_f64": float((distance.double() - truth).abs().max()),
            "anomalib_max_abs_delta_f64": float((reference.double() - truth).abs().max()),
            "same_index": float((index == reference_index).float().mean()),
            "unproven": search.unproven_share(queries, bank), "load": os.getloadavg()[0],
            "candidates": search.prepare(bank).mode}


def parse_banks(text: str) -> list[int | None]:
    """"full,1638" → [None, 1638]: None is the full bank (every reference patch), an int a greedy coreset."""
    return [None if item in ("full", "0") else int(item) for item in text.split(",") if item]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=9.0, help="measuring time per figure")
    parser.add_argument("--references", type=int, default=16)
    parser.add_argument("--banks", default="full,1638",
                        help="bank sizes to measure: 'full' (every reference patch) or a row count for a greedy "
                             "coreset; 1638 rows is anomalib's default coreset ratio 0.1 of 16 references")
    parser.add_argument("--max-bank-rows", type=int, default=None, help="same as --banks N (one coreset size)")
    parser.add_argument("--engines", default="torch", help="comma list of torch, onnxruntime, openvino")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--anomalib-path", help="folder where anomalib 2.7.0 (and kornia) are installed")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--search-only", action="store_true",
                        help="only the nearest-neighbour search against anomalib's (no end-to-end images/s)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds of the search comparison")
    parser.add_argument("--data", type=Path,
                        help="an MVTec-layout category folder: references from train/good, queries from test/*/* "
                             "(default: smooth random images)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    # Inputs: smooth random images (the speed does not depend on the content; the bank size is what matters).
    def images(n: int) -> torch.Tensor:
        return torch.nn.functional.interpolate(torch.randn(n, 3, 32, 32), size=256, mode="bilinear")

    banks = [args.max_bank_rows] if args.max_bank_rows else parse_banks(args.banks)
    engines = [e for e in args.engines.split(",") if e]
    anomalib_cls = import_anomalib_patchcore(args.anomalib_path)
    references = images(args.references)
    test_images: torch.Tensor | None = None
    if args.data:
        from model.fewshot import load_reference_images

        references = load_reference_images(sorted((args.data / "train" / "good").glob("*"))[:args.references], 256)
        test_images = load_reference_images(sorted((args.data / "test").glob("*/*"))[:8], 256)
    rows = []
    searches = []
    for bank_rows in banks:
        # max_bank_rows=0 keeps every row: the full bank whatever the number of references
        detector = build_patchcore(device="cpu", max_bank_rows=bank_rows or 0)
        started = time.perf_counter()
        bank = detector.set_references(references)
        label = "full" if bank_rows is None else f"coreset {bank_rows}"
        print(f"patchcore {detector.version}: {label} bank {tuple(bank.rows.shape)} built in "
              f"{time.perf_counter() - started:.1f} s; {args.threads} threads, 256 px", flush=True)
        model = detector.model
        anomalib_model = build_anomalib(anomalib_cls, model.memory_bank) if anomalib_cls else None
        if anomalib_model is not None:
            def baseline(queries: torch.Tensor, net=anomalib_model) -> tuple[torch.Tensor, torch.Tensor]:
                with torch.no_grad():
                    return net.nearest_neighbors(embedding=queries, n_neighbors=1)
            baseline_name = "anomalib 2.7.0 PatchcoreModel.nearest_neighbors"
        else:
            def baseline(queries: torch.Tensor, bank=model.memory_bank) -> tuple[torch.Tensor, torch.Tensor]:
                return anomalib_search_inline(queries, bank)
            baseline_name = "inline copy of anomalib 2.7.0's nearest_neighbors (anomalib not importable)"
        for batch_size in (int(b) for b in args.batch_sizes.split(",")):
            inputs = test_images[:batch_size] if test_images is not None else images(batch_size)
            with torch.no_grad():
                queries = model.flatten(model.embed(clip_to_tf(inputs)))
            figures = compare_search(baseline, model.memory_bank, queries, args.rounds)
            figures.update(bank=label, bank_rows=int(bank.rows.shape[0]), batch=batch_size, baseline=baseline_name)
            searches.append(figures)
            print(f"{label:14s} search batch {batch_size} ({figures['queries']} patches x {figures['bank_rows']} rows): "
                  f"{baseline_name}: {figures['anomalib_ms']:.1f} ms, ours {figures['ours_ms']:.1f} ms, "
                  f"ratio {figures['ratio']:.2f}x (median of {args.rounds} interleaved rounds, "
                  f"{figures['ratio_min']:.2f}-{figures['ratio_max']:.2f}); load average {figures['load']:.1f}",
                  flush=True)
            print(f"{'':14s} parity: max |delta| {figures['max_abs_delta']:.2e} "
                  f"(max |delta|/distance {figures['max_rel_delta']:.1e}), same row {100 * figures['same_index']:.2f} %; "
                  f"against float64: ours {figures['max_abs_delta_f64']:.1e}, "
                  f"anomalib {figures['anomalib_max_abs_delta_f64']:.1e}; "
                  f"{figures['candidates']} candidates, {100 * figures['unproven']:.1f} % of the patches searched again "
                  f"in fp32", flush=True)
        if args.search_only:
            continue
        runners = {"torch": detector.predict}
        with tempfile.TemporaryDirectory() as tmp:
            for engine in engines:
                if engine == "torch":
                    continue
                from adapters.export import export_detector, load_export

                folder = Path(tmp) / engine
                export_detector(detector, folder, export_format="onnx" if engine == "onnxruntime" else "openvino",
                                engine=engine, threads=args.threads)
                runners[engine] = load_export(folder, engine, threads=args.threads).predict
            for batch_size in (int(b) for b in args.batch_sizes.split(",")):
                batches = [images(batch_size) for _ in range(2)]
                candidates: dict[str, Callable[[torch.Tensor], object]] = dict(runners)
                tf_batches = {id(b): clip_to_tf(b) for b in batches}
                if anomalib_model is not None:
                    with torch.no_grad():
                        reference = anomalib_model(tf_batches[id(batches[0])])
                    mine = detector.predict(batches[0])
                    if not torch.allclose(reference.pred_score, mine.scores, rtol=1e-3):
                        raise RuntimeError(f"anomalib's scores differ: {reference.pred_score} vs {mine.scores}")

                    def anomalib_predict(batch: torch.Tensor, net=anomalib_model, tf=tf_batches) -> None:
                        with torch.no_grad():  # the TF normalisation is outside the timing for anomalib
                            net(tf[id(batch)])

                    candidates["anomalib"] = anomalib_predict
                speeds = interleaved(candidates, batches, args.seconds * len(candidates))
                embeddings = [model.embed(clip_to_tf(b)) for b in batches]
                search = timed(model.patch_scores, embeddings, args.seconds / 2)
                for name, speed in speeds.items():
                    if name == "anomalib":
                        continue
                    row = {"bank": label, "bank_rows": int(bank.rows.shape[0]), "engine": name,
                           "batch": batch_size, "images_per_s": round(speed, 2),
                           "search_share": round(speeds["torch"] / search, 3) if name == "torch" else None,
                           "anomalib_images_per_s": round(speeds["anomalib"], 2) if "anomalib" in speeds else None,
                           "vs_anomalib": round(speed / speeds["anomalib"], 2) if "anomalib" in speeds else None}
                    rows.append(row)
                    line = (f"{label:14s} {name:12s} batch {batch_size}: {speed:6.1f} images/s")
                    if row["search_share"] is not None:
                        line += f", nearest-neighbour search {100 * row['search_share']:.0f} % of the time"
                    if row["vs_anomalib"] is not None:
                        line += f"; anomalib PatchcoreModel {row['anomalib_images_per_s']:.1f} images/s, " \
                                f"ratio {row['vs_anomalib']:.2f}x"
                    print(line, flush=True)
    print("\n| bank | engine | batch | images/s | search share | anomalib images/s | × anomalib |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        share = "" if row["search_share"] is None else f"{100 * row['search_share']:.0f} %"
        print(f"| {row['bank']} ({row['bank_rows']} rows) | {row['engine']} | {row['batch']} | "
              f"{row['images_per_s']:.1f} | {share} | {row['anomalib_images_per_s'] or ''} | "
              f"{row['vs_anomalib'] or ''} |")
    if searches:
        print(f"\n| bank | batch | patches | anomalib search ms | ours ms | x anomalib | max abs delta | "
              f"load avg |  ({args.threads} threads)")
        print("|---|---|---|---|---|---|---|---|")
        for item in searches:
            print(f"| {item['bank']} ({item['bank_rows']} rows) | {item['batch']} | {item['queries']} | "
                  f"{item['anomalib_ms']:.1f} | {item['ours_ms']:.1f} | {item['ratio']:.2f} | "
                  f"{item['max_abs_delta']:.1e} | {item['load']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "rows": rows, "search": searches}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
