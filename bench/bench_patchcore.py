"""PatchCore speed on CPU: images/s at batch 1 and 8 (256 px, EfficientNet-Lite0, a 16-reference bank), the share
of the nearest-neighbour search, and the ratio against anomalib 2.7.0's `PatchcoreModel` on the same inputs in the
same process when anomalib can be imported (it is not a project dependency).

    python bench/bench_patchcore.py --threads 2 [--anomalib-path DIR] [--banks full,1638] \
        [--engines torch,onnxruntime,openvino] [--seconds 9] [--json out.json]

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
import sys
import tempfile
import time
import types
from collections import namedtuple
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.patchcore import build_patchcore, clip_to_tf
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
    rows = []
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
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
