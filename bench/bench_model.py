"""AnomalyCLIP forward speed (image scores + anomaly maps): this implementation vs a naive path that mimics the
official code (batch 1, explicit N x N attention matrices, per-tap upsampling, scipy's Gaussian filter on the CPU),
in the same process. Reports images/s and the speed-up ratio; checks both paths give the same maps.

    python bench/bench_model.py                         # randomly initialised ViT-L-14-336 at 518 px
    python bench/bench_model.py --backbone tiny         # the tiny golden CLIP (fast, for CPU-only machines)
    python bench/bench_model.py --dtypes float32 bfloat16 --batch-sizes 1 16   # on a GPU
    python bench/bench_model.py --backbone tiny --models all   # also time AdaCLIP, CLIP, CLIP-AC, WinCLIP

No weights are downloaded: ViT-L-14-336 is built with random weights (speed does not depend on the values).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from model import build_anomalyclip, load_backbone
from model.detector import resolve_device

TINY = Path(__file__).resolve().parents[2] / "shared" / "golden" / "anomalyclip"


def naive_predict(model, image: torch.Tensor) -> tuple[float, np.ndarray]:
    """One image, the official code's way: explicit attention maps, maps upsampled per tap, scipy blur on CPU."""
    visual = model.clip.visual
    x = visual.conv1(image[None]).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(1, 1, -1), x], dim=1) + model.vision_pos
    x = visual.ln_pre(x)

    def qkv(block, h):
        heads = block.attn.num_heads
        q, k, v = F.linear(h, block.attn.in_proj_weight, block.attn.in_proj_bias).chunk(3, dim=-1)
        split = lambda t: t.view(1, -1, heads, t.shape[-1] // heads).transpose(1, 2)  # noqa: E731
        return split(q), split(k), split(v)

    def attend(block, q, k, v):
        weights = ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(dim=-1)  # the N x N map, kept
        out = (weights @ v).transpose(1, 2).reshape(1, -1, q.shape[1] * q.shape[-1])
        return F.linear(out, block.attn.out_proj.weight, block.attn.out_proj.bias)

    taps, vv = [], None
    for index, block in enumerate(visual.transformer.resblocks, start=1):
        q, k, v = qkv(block, block.ln_1(x))
        if index >= model.dpam_start:
            vv = (x if vv is None else vv) + attend(block, v, v, v)
        x = x + attend(block, q, k, v)
        x = x + block.mlp(block.ln_2(x))
        if index in model.layers:
            taps.append(vv if index >= model.dpam_start else x)
    text = model.text_features()
    g = x[:, 0] @ visual.proj
    g = g / g.norm(dim=-1, keepdim=True)
    score = (g @ text.t() / 0.07).softmax(-1)[0, 1].item()
    total = torch.zeros(model.image_size, model.image_size)
    for tap in taps:
        f = visual.ln_post(tap) @ visual.proj
        f = f / f.norm(dim=-1, keepdim=True)
        probs = (f[:, 1:] @ text.t() / 0.07).softmax(-1)
        grid = probs.reshape(1, model.grid, model.grid, 2).permute(0, 3, 1, 2)
        up = F.interpolate(grid, size=(model.image_size,) * 2, mode="bilinear", align_corners=False)
        total += ((up[0, 1] + 1 - up[0, 0]) / 2).cpu()
    return score, gaussian_filter(total.numpy(), sigma=4)


def build_bench_detector(name: str, backbone, image_size: int, layers, device: torch.device):
    """A detector of each model around the one loaded backbone, with fresh (untrained) learned parts."""
    from model import create_detector, get_family

    family = get_family(name)
    if family.training is not None and family.wrap is not None:  # the family's fresh start, as retraining builds it
        module = family.training.build(backbone, None, layers=layers, image_size=image_size)
        options = {"class_name": "object"} if family.caps.needs_class_name else {}
        return family.wrap(module, device=device, dtype=torch.float32, version="bench", **options)
    return create_detector(name, backbone=backbone, image_size=image_size, device=device)


def time_models(names, backbone, args, layers, device, sync, results) -> None:
    """images/s of each model's predict at each batch size and dtype, relative to AnomalyCLIP's."""
    images = torch.randn(max(args.batch_sizes), 3, args.image_size, args.image_size, device=device)
    for name in names:
        detector = build_bench_detector(name, backbone, args.image_size, layers, device)
        for batch in args.batch_sizes:
            seconds = timed(lambda b=batch, d=detector: d.predict(images[:b], class_names=["object"] * b), 1, sync)
            ips = batch / seconds
            print(f"model {name:11s} float32 batch {batch:3d}: {ips:8.2f} images/s")
            results.setdefault("models", []).append({"model": name, "batch": batch, "images_per_s": ips})
        del detector


def timed(fn, repeats: int, sync) -> float:
    fn()  # warm-up
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="ViT-L-14-336", help="open_clip name (random init) or 'tiny'")
    parser.add_argument("--image-size", type=int, default=518)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--dtypes", nargs="+", default=None, help="default: float32 (+ bfloat16 on a GPU)")
    parser.add_argument("--layers", default="24")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--naive-images", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--models", nargs="*", default=[],
                        help="also time these models' predict (e.g. anomalyclip adaclip clip, or 'all' CLIP-backbone ones)")
    args = parser.parse_args()

    device = resolve_device(args.device)
    torch.manual_seed(0)
    if args.backbone == "tiny":
        backbone = load_backbone(TINY / "tiny_clip_openai_fp16.safetensors", config=TINY / "tiny-clip-24L.json")
    else:
        backbone = load_backbone(args.backbone, pretrained=None, quick_gelu=True)
    layers = tuple(int(x) for x in args.layers.split(","))
    model = build_anomalyclip(backbone, None, layers=layers, image_size=args.image_size).to(device).eval()
    dtypes = args.dtypes or (["float32", "bfloat16"] if device.type == "cuda" else ["float32"])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    images = torch.randn(max(args.batch_sizes), 3, args.image_size, args.image_size, device=device)
    results = {"device": str(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
               "backbone": args.backbone, "image_size": args.image_size, "layers": list(layers), "runs": []}

    with torch.no_grad():
        naive_s = timed(lambda: [naive_predict(model, images[i]) for i in range(args.naive_images)], 1, sync)
        naive_ips = args.naive_images / naive_s
        score, naive_map = naive_predict(model, images[0])
        _, fast_maps = model.predict(images[:1])
        diff = float(np.abs(fast_maps[0].float().cpu().numpy() - naive_map).max())
        print(f"naive (official-style, batch 1, fp32): {naive_ips:.2f} images/s; max |map difference| {diff:.2e}")
        results["naive_images_per_s"] = naive_ips
        results["max_map_difference"] = diff
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            for batch in args.batch_sizes:
                context = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else torch.no_grad()
                with context:
                    seconds = timed(lambda b=batch: model.predict(images[:b]), args.repeats, sync)
                ips = batch / seconds
                ratio = ips / naive_ips
                print(f"anomalyd {dtype_name:9s} batch {batch:3d}: {ips:8.2f} images/s  ({ratio:5.1f}x naive)")
                results["runs"].append({"dtype": dtype_name, "batch": batch, "images_per_s": ips, "vs_naive": ratio})
        if args.models:
            names = args.models
            if names == ["all"]:  # every registered family that runs on this CLIP backbone
                from model import get_family, list_models

                names = [name for name in list_models() if get_family(name).caps.clip_backbone]
            time_models(names, backbone, args, layers, device, sync, results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    assert math.isfinite(score)


if __name__ == "__main__":
    main()
