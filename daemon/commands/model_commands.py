"""`anomalyd predict | train | eval | weights`: the model commands, usable without the daemon."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from daemon.cli import UsageError

log = logging.getLogger("anomalyd")



class _RegisteredModels:
    """The --model choices, read from the model-family registry when first needed (so the CLI starts without
    importing torch, and a family registered at run time is a valid choice)."""

    def _names(self) -> list[str]:
        from model.factory import list_models

        return list_models()

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __iter__(self):
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())


MODEL_NAMES = _RegisteredModels()


def parse_layers(text: str) -> tuple[int, ...]:
    try:
        layers = tuple(int(part) for part in str(text).replace(" ", "").split(",") if part)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--layers {text!r}: expected comma-separated block numbers, e.g. 6,12,18,24") from exc
    if not layers:
        raise argparse.ArgumentTypeError("--layers needs at least one block number")
    return layers


def add_model_options(parser: argparse.ArgumentParser, *, several_models: bool = False) -> None:
    group = parser.add_argument_group("model")
    if several_models:
        group.add_argument("--model", dest="models", action="append", choices=MODEL_NAMES,
                           help="model to evaluate; repeat to compare several side by side (default anomalyclip)")
    else:
        group.add_argument("--model", default="anomalyclip", choices=MODEL_NAMES, help="detector (default %(default)s)")
    group.add_argument("--backbone", default="ViT-L-14-336",
                       help="open_clip model name, or a file with an OpenAI-layout CLIP state dict (default %(default)s)")
    group.add_argument("--backbone-config", type=Path, help="open_clip model config JSON for a local backbone file")
    group.add_argument("--pretrained", default="openai", help="open_clip pretrained tag for a named backbone")
    group.add_argument("--prompts", action="append",
                       help="learned weights: official .pth, anomalyd .safetensors, or a released name "
                       "(anomalyclip-visa, anomalyclip-mvtec) fetched with `anomalyd weights fetch`; with several "
                       "--model, give MODEL=FILE once per model")
    group.add_argument("--layers", type=parse_layers, default=(24,), help="vision blocks to tap, e.g. 6,12,18,24")
    group.add_argument("--image-size", type=int, default=518, help="model input side in pixels (default 518)")
    group.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    group.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    group.add_argument("--class-name", help="object class for class-aware models (AdaCLIP, CLIP, WinCLIP)")
    group.add_argument("--hsf", action=argparse.BooleanOptionalAction, default=False,
                       help="AdaCLIP's hybrid semantic fusion for image scores")
    group.add_argument("--references", help="few-shot known-good images (a folder or comma-separated files)")
    group.add_argument("--reference-preprocessing", action="store_true",
                       help="the official PIL preprocessing (parity path) instead of the faster OpenCV one")


def prompts_for(values: Sequence[str] | None, name: str) -> str | None:
    """The --prompts value meant for model `name`: a MODEL=FILE entry for it, else a plain FILE entry."""
    plain = None
    for value in values or ():
        model, sep, path = value.partition("=")
        if sep and model in MODEL_NAMES:
            if model == name:
                return path
        elif plain is None:
            plain = value
    return plain


def model_options(args: argparse.Namespace, name: str) -> dict[str, Any]:
    from adapters.weights import resolve_prompts

    if args.image_size <= 0 or args.image_size % 14:
        raise UsageError(f"--image-size {args.image_size}: expected a positive multiple of the patch size 14")
    return {
        "backbone": args.backbone,
        "backbone_config": args.backbone_config,
        "pretrained": args.pretrained,
        "prompts": resolve_prompts(prompts_for(args.prompts, name)),
        "layers": args.layers,
        "image_size": args.image_size,
        "device": args.device,
        "dtype": args.dtype,
        "class_name": args.class_name,
        "hsf": args.hsf,  # only the families with hybrid semantic fusion (AdaCLIP) read it
        "references": args.references,
    }


def build_detector(args: argparse.Namespace, name: str | None = None):
    from model import create_detector

    name = name or args.model
    return create_detector(name, **model_options(args, name))


def image_files(inputs: Sequence[str]) -> list[Path]:
    from model.datasets import is_image_file

    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and is_image_file(p))
            if not found:
                log.warning("%s: no image files found", path)
            files.extend(found)
        elif path.exists():
            files.append(path)
        else:
            raise UsageError(f"{path}: no such file or directory")
    if not files:
        raise UsageError("no input images")
    return files


def _load_input(path: Path, size: int, reference: bool):
    """(model input tensor, original size (H, W), RGB array or None)."""
    from model.preprocess import decode_image, fast_transform, open_pil, reference_transform

    if reference:
        image = open_pil(path)
        return reference_transform(image, size), (image.height, image.width), None
    rgb = decode_image(path)
    return fast_transform(rgb, size), rgb.shape[:2], rgb


# ---------------------------------------------------------------------------------------------------- predict
def cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from adapters.report import write_overlay
    from model.preprocess import ImageDecodeError, decode_image

    files = image_files(args.inputs)
    detector = build_detector(args)
    size = detector.image_size
    scores: list[float] = []
    maps: list[np.ndarray] = []
    paths: list[str] = []
    errors: list[tuple[str, str]] = []
    class_names = [args.class_name] if args.class_name else None
    if args.overlays:
        Path(args.overlays).mkdir(parents=True, exist_ok=True)
    batches = [files[i : i + args.batch_size] for i in range(0, len(files), args.batch_size)]
    for batch_files in tqdm(batches, desc="predict", unit="batch", disable=args.json or not sys.stderr.isatty()):
        tensors, sizes, good, decoded = [], [], [], []
        for path in batch_files:
            try:
                tensor, original, rgb = _load_input(path, size, args.reference_preprocessing)
            except ImageDecodeError as exc:
                errors.append((str(path), str(exc)))
                print(f"anomalyd: skipped {exc}", file=sys.stderr)
                continue
            tensors.append(tensor)
            sizes.append(original)
            good.append(path)
            decoded.append(rgb)
        if not tensors:
            continue
        prediction = detector.predict(torch.stack(tensors), class_names=class_names * len(tensors) if class_names else None)
        batch_maps = prediction.maps.float().cpu()
        for index, path in enumerate(good):
            amap = batch_maps[index]
            if args.map_size == "input":
                amap = F.interpolate(amap[None, None], size=sizes[index], mode="bilinear", align_corners=False)[0, 0]
            score = float(prediction.scores[index])
            scores.append(score)
            maps.append(amap.numpy().astype(np.float32))
            paths.append(str(path))
            if args.json:
                print(json.dumps({"path": str(path), "score": score, "map_max": float(amap.max())}))
            if args.overlays:
                rgb = decoded[index] if decoded[index] is not None else decode_image(path)
                write_overlay(Path(args.overlays) / f"{len(paths) - 1:05d}_{path.stem}.jpg", rgb, maps[-1])
    arrays: dict[str, Any] = {
        "scores": np.asarray(scores, dtype=np.float32),
        "paths": np.asarray(paths),
        "model": np.asarray(detector.name),
        "model_version": np.asarray(detector.version),
        "errors": np.asarray([f"{p}: {m}" for p, m in errors]),
    }
    if maps and len({m.shape for m in maps}) == 1:
        arrays["maps"] = np.stack(maps)
    else:  # --map-size input with images of different sizes: one array per image
        arrays.update({f"map_{i}": m for i, m in enumerate(maps)})
    np.savez_compressed(args.output, **arrays)
    if not args.json:
        print(f"{len(paths)} images scored, {len(errors)} skipped → {args.output}")
        for path, score in zip(paths, scores, strict=True):
            print(f"{score:.4f}  {path}")
    return 1 if errors and not paths else 0


# ---------------------------------------------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace) -> int:
    from torch.utils.data import ConcatDataset

    from model import get_family, list_models, load_backbone, resolve_device
    from model.datasets import InspectionDataset, discover
    from model.synthetic import SyntheticAnomalies
    from model.training import TrainingConfig, seed_everything, train_prompts

    family = get_family(args.model)
    if not family.trainable:
        raise UsageError(f"--model {args.model} is training-free: nothing to train (trainable: "
                         f"{', '.join(list_models(trainable=True))})")
    samples = discover(args.data, args.meta, split=args.split)
    normals = [s for s in samples if s.label == 0]
    anomalous = [s for s in samples if s.label == 1]
    use_synthetic = args.synthetic == "on" or (args.synthetic == "auto" and not anomalous)
    if not anomalous and not use_synthetic:
        raise UsageError(f"{args.data}: no anomalous samples; use --synthetic on to train on synthetic defects")
    log.info("training data: %d normal, %d anomalous images (%d with masks)%s", len(normals), len(anomalous),
             sum(s.has_mask for s in anomalous), ", plus synthetic defects on the normals" if use_synthetic else "")
    datasets = [InspectionDataset(samples, image_size=args.image_size)] if anomalous else []
    if datasets and args.mosaic:
        from model.datasets import MosaicDataset

        datasets[0] = MosaicDataset(datasets[0], probability=args.mosaic, seed=args.seed)
    if use_synthetic:
        if not normals:
            raise UsageError(f"{args.data}: --synthetic needs normal images")
        category = normals[0].category if len({s.category for s in normals}) == 1 else "object"
        datasets.append(SyntheticAnomalies(normals, image_size=args.image_size, seed=args.seed, category=category))
    dataset = datasets[0] if len(datasets) == 1 else ConcatDataset(datasets)
    if len(datasets) > 1:  # epoch-dependent augmentations (synthetic defects, mosaics) see every new epoch
        dataset.set_epoch = lambda epoch: [d.set_epoch(epoch) for d in datasets if hasattr(d, "set_epoch")]  # type: ignore[attr-defined]

    config = TrainingConfig.for_model(args.model, epochs=args.epochs, batch_size=args.batch_size,
                                      learning_rate=args.lr, seed=args.seed, num_workers=args.workers)
    seed_everything(config.seed)  # the fresh weights' random init is part of a reproducible run
    # The family's activation: AdaCLIP's released weights were trained on a tower built with nn.GELU, and new
    # training keeps that.
    backbone = load_backbone(args.backbone, config=args.backbone_config, pretrained=args.pretrained,
                             **family.backbone_options())
    model = family.training.build(backbone, args.init_prompts, layers=args.layers, image_size=args.image_size)
    metadata = {"model": args.model, "backbone": backbone.name, "layers": list(args.layers),
                "image_size": args.image_size, "training_data": str(args.data), "split": args.split,
                "synthetic": use_synthetic, "class_names": sorted({s.category for s in samples}),
                "config": vars(config) | {"betas": list(config.betas)}}
    history = train_prompts(model, dataset, args.output, config=config, device=resolve_device(args.device),
                            resume=args.resume, progress=sys.stderr.isatty(), metadata=metadata,
                            on_epoch=lambda s: print(f"epoch {s.epoch}/{config.epochs}: loss {s.loss:.4f} "
                                                     f"(image {s.image_loss:.4f}, local {s.local_loss:.4f}), "
                                                     f"{s.samples} images, {len(s.skipped)} skipped", flush=True))
    skipped = {path for stats in history for path, _ in stats.skipped}
    print(f"weights written to {args.output} after {len(history)} epochs; {len(skipped)} bad samples skipped")
    return 0


# ---------------------------------------------------------------------------------------------------- eval
def cmd_eval(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from adapters.report import plot_curves, write_overlay, write_report
    from model.datasets import InspectionDataset, collate_samples, discover
    from model.metrics import MetricAccumulator
    from model.preprocess import decode_image

    samples = discover(args.data, args.meta, split=args.split)
    if args.categories:
        wanted = set(args.categories.split(","))
        samples = [s for s in samples if s.category in wanted]
        if not samples:
            raise UsageError(f"--categories {args.categories}: none of them is in {args.data}")
    by_category: dict[str, list] = defaultdict(list)
    for sample in samples:
        by_category[sample.category].append(sample)
    if args.limit:
        by_category = {c: s[: args.limit] for c, s in by_category.items()}
    report_dir = Path(args.report) if args.report else None
    models = args.models or ["anomalyclip"]
    results: dict[str, Any] = {}
    infos: dict[str, Any] = {}
    transform = "reference" if args.reference_preprocessing else "fast"
    show = sys.stderr.isatty()
    skipped: list[tuple[str, str]] = []
    for name in models:
        detector = build_detector(args, name)
        infos[name] = {"version": detector.version, "backbone": args.backbone}
        accumulator = MetricAccumulator()
        for category, items in by_category.items():
            loader = DataLoader(InspectionDataset(items, image_size=detector.image_size, transform=transform),
                                batch_size=args.batch_size, collate_fn=collate_samples, num_workers=args.workers)
            labels, scores, maps, masks, paths = [], [], [], [], []
            for batch in tqdm(loader, desc=f"{name} {category}", disable=not show, leave=False):
                for path, message in batch["errors"]:
                    print(f"anomalyd: skipped {path}: {message}", file=sys.stderr)
                skipped.extend(batch["errors"])
                if batch["image"].shape[0] == 0:
                    continue
                with torch.no_grad():
                    prediction = detector.predict(batch["image"], class_names=[args.class_name or category] * batch["image"].shape[0])
                labels.extend(batch["label"].tolist())
                scores.extend(prediction.scores.cpu().tolist())
                batch_maps = prediction.maps.float().cpu().numpy()
                for index in range(batch_maps.shape[0]):
                    maps.append(batch_maps[index])
                    masks.append(batch["mask"][index].numpy() if batch["has_mask"][index] else None)
                    paths.append(batch["path"][index])
            if not labels:
                continue
            accumulator.add(category, labels, scores, maps=maps, masks=masks)
            if report_dir is not None:
                with_masks = [i for i, m in enumerate(masks) if m is not None]
                plot_curves(report_dir / "curves" / name, category, labels, scores,
                            masks=np.stack([masks[i] for i in with_masks]) if with_masks else None,
                            maps=np.stack([maps[i] for i in with_masks]) if with_masks else None)
                order = np.argsort(scores)[::-1][: args.overlays]
                for rank, index in enumerate(order):
                    target = report_dir / "overlays" / name / category / f"{rank:02d}_{Path(paths[index]).stem}.jpg"
                    target.parent.mkdir(parents=True, exist_ok=True)
                    write_overlay(target, decode_image(paths[index]), maps[index], masks[index])
            accumulator.compute_category(category)
        results[name] = accumulator.compute()
    if report_dir is not None:
        markdown = write_report(report_dir, results, models=infos)
    else:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            markdown = write_report(tmp, results, models=infos)
    if args.json:
        from adapters.report import jsonable

        print(json.dumps(jsonable({n: {"per_category": r[0], "mean": r[1]} for n, r in results.items()}), indent=2))
    else:
        print(markdown)
    if skipped:
        print(f"{len({p for p, _ in skipped})} bad samples skipped (listed above)", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------------- weights
def cmd_weights_fetch(args: argparse.Namespace) -> int:
    from adapters.weights import (
        RELEASED_PROMPTS,
        fetch_backbone,
        fetch_prompts,
        open_clip_cache,
        prompts_path,
    )

    names = args.prompts or list(RELEASED_PROMPTS)
    if args.if_missing:
        backbone_cached = open_clip_cache().is_dir() and any(p.is_file() for p in open_clip_cache().rglob("*"))
        if backbone_cached and all(prompts_path(name).is_file() for name in names):
            print("weights already in the cache (anomalyd weights fetch --force downloads them again)")
            return 0
    if not args.skip_backbone:
        print(f"fetching the CLIP backbone {args.backbone}/openai through open_clip ...", flush=True)
        print(f"backbone ready in {fetch_backbone(args.backbone)}")
    for name in names:
        print(f"fetching released prompts {name} ...", flush=True)
        print(f"prompts ready: {fetch_prompts(name, force=args.force)}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    predict = subparsers.add_parser("predict", help="score image files or folders")
    predict.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    predict.add_argument("--output", default="out.npz", help="npz with scores [N], maps [N,H,W], paths [N]")
    predict.add_argument("--map-size", choices=("model", "input"), default="model",
                         help="maps in the model input space (parity path) or at each image's own size")
    predict.add_argument("--overlays", help="write heat-map overlay JPEGs into this folder")
    predict.add_argument("--json", action="store_true", help="one JSON line per image on stdout")
    predict.add_argument("--batch-size", type=int, default=8)
    add_model_options(predict)
    predict.set_defaults(func=cmd_predict)

    train = subparsers.add_parser("train", help="learn prompts on a labelled dataset (resumable)")
    train.add_argument("--data", required=True, type=Path, help="dataset root (meta.json or a folder layout)")
    train.add_argument("--meta", type=Path, help="meta.json (default: ROOT/meta.json when present)")
    train.add_argument("--split", default="test", help="meta.json split (the paper trains on the test split of "
                       "an auxiliary dataset; default %(default)s)")
    train.add_argument("--output", required=True, type=Path, help="prompts file (.safetensors, or .pth = official)")
    train.add_argument("--epochs", type=int, help="default: the model's official setting (AnomalyCLIP 15, AdaCLIP 5)")
    train.add_argument("--batch-size", type=int, help="default 8")
    train.add_argument("--lr", type=float, help="default: AnomalyCLIP 1e-3 (Adam), AdaCLIP 0.01 (AdamW)")
    train.add_argument("--seed", type=int, default=111)
    train.add_argument("--workers", type=int, default=0, help="data loader processes")
    train.add_argument("--synthetic", choices=("auto", "on", "off"), default="auto",
                       help="synthetic defects on normal images (auto: when the data has no anomalies)")
    train.add_argument("--mosaic", type=float, default=0.0, metavar="P",
                       help="2x2 same-category mosaics with probability P (AdaCLIP's recipe uses 0.2 on MVTec AD)")
    train.add_argument("--init-prompts", type=Path, help="start from these weights instead of a fresh init")
    train.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                       help="continue from OUTPUT.resume.pt when present (default on)")
    add_model_options(train)
    train.set_defaults(func=cmd_train)

    evaluate = subparsers.add_parser("eval", help="per-category metrics, curves and overlays")
    evaluate.add_argument("--data", required=True, type=Path)
    evaluate.add_argument("--meta", type=Path)
    evaluate.add_argument("--split", default="test")
    evaluate.add_argument("--report", help="report folder: metrics.json, metrics.md, curves/, overlays/")
    evaluate.add_argument("--categories", help="comma-separated subset of categories")
    evaluate.add_argument("--limit", type=int, default=0, help="at most this many images per category")
    evaluate.add_argument("--overlays", type=int, default=8, help="overlays of the top-N scored images per category")
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--workers", type=int, default=0)
    evaluate.add_argument("--json", action="store_true", help="print the metrics as JSON instead of Markdown")
    add_model_options(evaluate, several_models=True)
    evaluate.set_defaults(func=cmd_eval)

    weights = subparsers.add_parser("weights", help="download model weights into the cache")
    weights_sub = weights.add_subparsers(dest="weights_command", metavar="ACTION")
    weights_sub.required = True
    fetch = weights_sub.add_parser("fetch", help="the CLIP backbone and the released AnomalyCLIP prompts")
    fetch.add_argument("--backbone", default="ViT-L-14-336")
    fetch.add_argument("--prompts", action="append", help="released prompt names (default: all)")
    fetch.add_argument("--skip-backbone", action="store_true")
    fetch.add_argument("--force", action="store_true", help="download again even if cached")
    fetch.add_argument("--if-missing", action="store_true", help="do nothing when everything is already cached")
    fetch.set_defaults(func=cmd_weights_fetch)
