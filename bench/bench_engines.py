"""Inference engines on the CPU: images/s of eager PyTorch vs ONNX Runtime vs OpenVINO, in the same process, on the
same thread budget (default 2), per model and batch size. Each export goes through the parity gate first, so the
engines timed are ones that reproduce PyTorch.

    python bench/bench_engines.py                                   # tiny CLIP AnomalyCLIP @518, patchcore @256
    python bench/bench_engines.py --models anomalyclip-tiny --batch-sizes 1 8 --repeats 3 --json out.json

Models: `anomalyclip-tiny` (AnomalyCLIP on the tiny golden CLIP, 518 px), `clip-tiny` (the CLIP baseline on it),
or any registered model name at its family's defaults, e.g. `patchcore` (EfficientNet-Lite0 PatchCore at 256 px;
a family that needs references gets a memory bank built from a few normals). Reports the ratio of each engine to eager at the same batch size.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

TINY = Path(__file__).resolve().parents[2] / "shared" / "golden" / "anomalyclip"
SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "inspection-samples"


def build(name: str):
    """(detector, class names) for a bench model name."""
    from model import create_detector, get_family, list_models

    tiny = {"backbone": str(TINY / "tiny_clip_openai_fp16.safetensors"),
            "backbone_config": str(TINY / "tiny-clip-24L.json"), "device": "cpu"}
    if name == "anomalyclip-tiny":
        return create_detector("anomalyclip", prompts=str(TINY / "prompts_official_format.pth"), image_size=518,
                               layers=(6, 12, 18, 24), **tiny)
    if name == "clip-tiny":
        return create_detector("clip", image_size=518, class_name="object", **tiny)
    if name not in list_models():
        raise SystemExit(f"unknown bench model {name!r} (not registered in this version)")
    options: dict = {}
    if get_family(name).caps.needs_references:  # e.g. patchcore: its memory bank from a few normals
        references = sorted((SAMPLES / "bottle" / "test" / "good").glob("*.*"))[:4]
        options["references"] = [str(p) for p in references]
    return create_detector(name, device="cpu", **options)  # the family's own defaults (patchcore: 256 px)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (engines allocate on the first run)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["anomalyclip-tiny", "patchcore"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--engines", nargs="+", default=["torch", "onnxruntime", "openvino"])
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of every engine (default 2)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    from adapters.export import export_detector, load_export

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            try:
                detector = build(name)
            except SystemExit as exc:
                print(f"{name}: skipped ({exc})")
                continue
            runners = {"torch": detector}
            for engine in args.engines:
                if engine == "torch":
                    continue
                folder = Path(tmp) / f"{name}-{engine}"
                fmt = "onnx" if engine == "onnxruntime" else "openvino"
                started = time.perf_counter()
                export_detector(detector, folder, export_format=fmt, engine=engine, threads=args.threads)
                print(f"{name}: {fmt} export + parity gate {time.perf_counter() - started:.1f} s")
                runners[engine] = load_export(folder, engine, threads=args.threads)
            size = int(detector.image_size)
            images = torch.randn(max(args.batch_sizes), 3, size, size)
            for batch in args.batch_sizes:
                eager = None
                for engine, runner in runners.items():
                    with torch.inference_mode():
                        seconds = timed(lambda r=runner, x=images[:batch]: r.predict(x), args.repeats)
                    ips = batch / seconds
                    eager = ips if engine == "torch" else eager
                    ratio = ips / eager if eager else float("nan")
                    rows.append({"model": name, "image_size": size, "engine": engine, "batch": batch,
                                 "images_per_s": round(ips, 2), "vs_eager": round(ratio, 2)})
                    print(f"{name:16s} {size:4d}px {engine:12s} batch {batch:2d}: {ips:8.2f} images/s "
                          f"({ratio:4.2f}x eager)", flush=True)
    print("\n| model | px | engine | batch | images/s | × eager |\n|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['model']} | {row['image_size']} | {row['engine']} | {row['batch']} | "
              f"{row['images_per_s']:.2f} | {row['vs_eager']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
