"""AnomalyCLIP on a GPU, one prepared run (< 5 minutes on an H100/H200): the naive official-style path vs ours, in
float32 / bfloat16, eager / torch.compile / ONNX Runtime (CUDA or TensorRT execution provider, where installed):
images/s at batch 1, 16 and 64 and peak memory, written as a Markdown table (and JSON).

    python bench/bench_gpu.py --output bench-gpu.md             # ViT-L-14-336 @518, random weights, on cuda
    python bench/bench_gpu.py --cpu-smoke --output /tmp/gpu.md  # the tiny CLIP, tiny batches, on the CPU (CI)

No download: ViT-L-14-336 is built from open_clip's config with random weights and random prompts (speed does
not depend on the values). Every measurement has a time limit; a run past the overall `--budget-s` is reported as
skipped rather than overrunning. Targets (issue 12): >= 400 images/s bfloat16 at batch 64 on an H100/H200-class
GPU, and >= 20x the naive path.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import naive_predict  # the official-style path, shared with bench_model

TINY = Path(__file__).resolve().parents[2] / "shared" / "golden" / "anomalyclip"


def build_model(config: str, image_size: int, layers: tuple[int, ...], device: torch.device):
    from model import build_anomalyclip, load_backbone

    torch.manual_seed(0)
    if config == "tiny":
        backbone = load_backbone(TINY / "tiny_clip_openai_fp16.safetensors", config=TINY / "tiny-clip-24L.json")
    else:
        backbone = load_backbone(config, pretrained=None, quick_gelu=True)
    return build_anomalyclip(backbone, None, layers=layers, image_size=image_size).to(device).eval()


class Clock:
    """images/s of fn(batch) with device sync; peak memory on CUDA."""

    def __init__(self, device: torch.device, repeats: int, min_seconds: float) -> None:
        self.device, self.repeats, self.min_seconds = device, repeats, min_seconds

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reset_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_mib(self, baseline_free: int | None = None) -> float | None:
        if self.device.type != "cuda":
            return None
        if baseline_free is not None:  # memory outside torch's allocator (ONNX Runtime's arena)
            return (baseline_free - torch.cuda.mem_get_info(self.device)[0]) / 2**20
        return torch.cuda.max_memory_allocated(self.device) / 2**20

    def images_per_s(self, fn, batch: int) -> float:
        fn()  # warm-up (compilation, allocator, cuDNN/cuBLAS heuristics)
        self.sync()
        runs, start = 0, time.perf_counter()
        while runs < self.repeats or time.perf_counter() - start < self.min_seconds:
            fn()
            runs += 1
            if runs >= 50 * self.repeats:
                break
        self.sync()
        return batch * runs / (time.perf_counter() - start)


def onnx_session(model, image_size: int, folder: Path, device: torch.device):
    """ONNX Runtime session of our graph (exported in float32 on the CPU) on the best GPU provider installed,
    or None with the reason."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None, "onnxruntime not installed"
    available = ort.get_available_providers()
    wanted = ["TensorrtExecutionProvider", "CUDAExecutionProvider"] if device.type == "cuda" else []
    providers = [p for p in wanted if p in available] + ["CPUExecutionProvider"]
    if device.type == "cuda" and len(providers) == 1:
        return None, f"no GPU execution provider in onnxruntime ({', '.join(available)}): onnxruntime-gpu needed"
    from model.export import AnomalyCLIPGraph

    graph = AnomalyCLIPGraph(model.to("cpu").float()).eval()
    path = folder / "anomalyclip.onnx"
    example = torch.randn(2, 3, image_size, image_size)
    with torch.no_grad():
        torch.onnx.export(graph, (example,), str(path), dynamo=False, opset_version=17, input_names=["images"],
                          output_names=["scores", "maps"],
                          dynamic_axes={"images": {0: "batch"}, "scores": {0: "batch"}, "maps": {0: "batch"}})
    model.to(device)
    session = ort.InferenceSession(str(path), providers=providers)
    return session, session.get_providers()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="ViT-L-14-336", help="open_clip model name (random init) or 'tiny'")
    parser.add_argument("--image-size", type=int, default=518)
    parser.add_argument("--layers", default="6,12,18,24")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--modes", nargs="+", default=["eager", "compile", "onnxruntime"])
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--naive-images", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--min-seconds", type=float, default=2.0, help="time each measurement at least this long")
    parser.add_argument("--budget-s", type=float, default=270.0, help="skip what would start after this")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="CI size: tiny CLIP at 56 px, batches 1 and 2, on the CPU, compile with the eager backend")
    parser.add_argument("--output", type=Path, default=Path("bench-gpu.md"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.cpu_smoke:
        args.config, args.image_size, args.batch_sizes, args.device = "tiny", 56, [1, 2], "cpu"
        args.compile_backend, args.naive_images, args.repeats, args.min_seconds = "eager", 1, 1, 0.0
        args.budget_s = float("inf")  # CI checks that every path runs, however slow the machine

    from model.factory import resolve_device

    started = time.monotonic()
    device = resolve_device(args.device)
    layers = tuple(int(x) for x in args.layers.split(","))
    model = build_model(args.config, args.image_size, layers, device)
    clock = Clock(device, args.repeats, args.min_seconds)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    images = torch.randn(max(args.batch_sizes), 3, args.image_size, args.image_size, device=device)
    rows: list[dict] = []

    def record(path: str, dtype: str, mode: str, batch: int, fn, memory=None, per_call: int | None = None) -> None:
        if time.monotonic() - started > args.budget_s:
            rows.append({"path": path, "dtype": dtype, "mode": mode, "batch": batch, "note": "skipped (time budget)"})
            return
        clock.reset_memory()
        try:
            ips = clock.images_per_s(fn, per_call or batch)
        except Exception as exc:  # e.g. out of memory at batch 64 in float32: reported, the run goes on
            rows.append({"path": path, "dtype": dtype, "mode": mode, "batch": batch,
                         "note": f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"})
            clock.reset_memory()
            return
        peak = memory() if memory else clock.peak_mib()
        rows.append({"path": path, "dtype": dtype, "mode": mode, "batch": batch, "images_per_s": ips,
                     "peak_mib": peak})
        print(f"{path:6s} {dtype:9s} {mode:22s} batch {batch:3d}: {ips:9.2f} images/s"
              + (f", peak {peak:.0f} MiB" if peak is not None else ""), flush=True)

    with torch.inference_mode():
        record("naive", "float32", "eager (batch 1 loop)", 1,
               lambda: [naive_predict(model, images[i % images.shape[0]]) for i in range(args.naive_images)],
               per_call=args.naive_images)
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)

            def autocast(d=dtype):
                return torch.autocast(device.type, dtype=d, enabled=d != torch.float32)

            for mode in [m for m in args.modes if m in ("eager", "compile")]:
                if mode == "compile" and args.cpu_smoke and dtype != torch.float32:
                    continue  # the smoke run compiles once: each dtype would trace the model again
                predict = model.predict
                if mode == "compile":
                    predict = torch.compile(model.predict, backend=args.compile_backend, dynamic=False)
                label = "eager" if mode == "eager" else f"torch.compile ({args.compile_backend})"
                for batch in args.batch_sizes:
                    def run(b=batch, p=predict):
                        with autocast():
                            return p(images[:b])
                    record("ours", dtype_name, label, batch, run)
    if "onnxruntime" in args.modes and time.monotonic() - started < args.budget_s:
        with tempfile.TemporaryDirectory() as tmp:
            free_before = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
            session, provider = onnx_session(model, args.image_size, Path(tmp), device)
            if session is None:
                rows.append({"path": "ours", "dtype": "float32", "mode": "onnxruntime", "batch": "-",
                             "note": f"skipped: {provider}"})
            else:
                host = images.float().cpu().numpy()
                for batch in args.batch_sizes:
                    record("ours", "float32", f"onnxruntime ({provider})", batch,
                           lambda b=batch: session.run(None, {"images": host[:b]}),
                           memory=(lambda: clock.peak_mib(free_before)) if free_before is not None else None)
    naive = next((r["images_per_s"] for r in rows if r["path"] == "naive" and "images_per_s" in r), None)
    table = [f"AnomalyCLIP {args.config} @{args.image_size}, taps {list(layers)}, random weights, on {name} "
             f"(torch {torch.__version__}); total {time.monotonic() - started:.0f} s", "",
             "| path | dtype | mode | batch | images/s | × naive | peak memory (MiB) |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        ips = row.get("images_per_s")
        ratio = f"{ips / naive:.1f}" if ips and naive else "—"
        peak = f"{row['peak_mib']:.0f}" if row.get("peak_mib") is not None else "—"
        value = f"{ips:.2f}" if ips is not None else row.get("note", "—")
        table.append(f"| {row['path']} | {row['dtype']} | {row['mode']} | {row['batch']} | {value} | {ratio} | {peak} |")
    args.output.write_text("\n".join(table) + "\n")
    print("\n".join(table))
    if args.json:
        args.json.write_text(json.dumps({"device": name, "config": args.config, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
