"""PatchCore speed on CPU: images/s at batch 1 and 8 (256 px, EfficientNet-Lite0, a 16-reference bank), the share
of the nearest-neighbour search, and the ratio against anomalib 2.7.0's `PatchcoreModel` on the same inputs in the
same process when anomalib can be imported (it is not a project dependency).

    python bench/bench_patchcore.py --threads 2 [--anomalib-path DIR] [--seconds 20]

anomalib: `pip install --target DIR anomalib==2.7.0 kornia kornia_rs --no-deps` then `--anomalib-path DIR`.
anomalib's package `__init__` pulls in Lightning and more; the bench imports only its PatchCore torch model
(feature extractor, memory-bank search, scores, map blur) by registering stub parent packages, so nothing outside
the torch model is measured. Both models get the same Lite0 weights, taps (flat blocks 4 and 10 = timm's
`blocks.2`, `blocks.4`), inputs and full 16384-row bank.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import time
import types
from collections import namedtuple
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=15.0, help="measuring time per figure")
    parser.add_argument("--references", type=int, default=16)
    parser.add_argument("--max-bank-rows", type=int, default=None,
                        help="greedy coreset of the bank to this many rows (default: the detector's default)")
    parser.add_argument("--anomalib-path", help="folder where anomalib 2.7.0 (and kornia) are installed")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    # Inputs: smooth random images (the speed does not depend on the content; the bank size is what matters).
    def images(n: int) -> torch.Tensor:
        return torch.nn.functional.interpolate(torch.randn(n, 3, 32, 32), size=256, mode="bilinear")

    options = {} if args.max_bank_rows is None else {"max_bank_rows": args.max_bank_rows}
    detector = build_patchcore(device="cpu", **options)
    bank = detector.set_references(images(args.references))
    print(f"patchcore {detector.version}: bank {tuple(bank.rows.shape)}, {args.threads} threads, 256 px")
    model = detector.model
    results = {}
    anomalib_cls = import_anomalib_patchcore(args.anomalib_path)
    anomalib_model = build_anomalib(anomalib_cls, model.memory_bank) if anomalib_cls else None
    for batch_size in (1, 8):
        batches = [images(batch_size) for _ in range(2)]
        ours = timed(detector.predict, batches, args.seconds)
        embeddings = [model.embed(clip_to_tf(b)) for b in batches]
        search = timed(model.patch_scores, embeddings, args.seconds / 2)
        # `timed` counts images: embeddings carry the batch in dim 0 as images do
        share = ours / search
        line = f"batch {batch_size}: {ours:.1f} images/s, nearest-neighbour search {100 * share:.0f} % of the time"
        if anomalib_model is not None:
            tf_batches = [clip_to_tf(b) for b in batches]
            with torch.no_grad():
                reference = anomalib_model(tf_batches[0])
            mine = detector.predict(batches[0])
            if not torch.allclose(reference.pred_score, mine.scores, rtol=1e-3):
                raise RuntimeError(f"anomalib's scores differ: {reference.pred_score} vs {mine.scores}")

            def anomalib_predict(batch: torch.Tensor) -> None:
                with torch.no_grad():
                    anomalib_model(batch)

            theirs = timed(anomalib_predict, tf_batches, args.seconds)
            line += f"; anomalib PatchcoreModel {theirs:.1f} images/s, ratio {ours / theirs:.2f}x"
            results[f"anomalib_b{batch_size}"] = theirs
        results[f"b{batch_size}"] = ours
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
