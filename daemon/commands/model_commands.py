"""`anomalyd predict | train | eval | weights`: the model commands, usable without the daemon."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from daemon.cli import UsageError
from daemon.commands.model_options import (
    add_model_options,
    build_detector,
    image_files,
    load_input,
    model_options,
    overlay_scale,
)

log = logging.getLogger("anomalyd")


# ---------------------------------------------------------------------------------------------------- predict
def cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from adapters.report import write_overlay
    from model.detector import Prediction
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
    geometry = getattr(detector, "geometry", None)
    framed = geometry is not None and not geometry.plain  # maps come back in each image's own pixels
    for batch_files in tqdm(batches, desc="predict", unit="batch", disable=args.json or not sys.stderr.isatty()):
        tensors, sizes, good, decoded = [], [], [], []
        for path in batch_files:
            try:
                if framed:
                    rgb = decode_image(path)
                    tensor, original = torch.empty(0), rgb.shape[:2]
                else:
                    tensor, original, rgb = load_input(path, size, args.reference_preprocessing)
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
        if framed:
            frame_scores, frame_maps = detector.predict_frames(decoded)
            prediction = Prediction(scores=torch.from_numpy(frame_scores), maps=torch.empty(0))
            batch_maps = [torch.from_numpy(m) for m in frame_maps]
        else:
            prediction = detector.predict(torch.stack(tensors),
                                          class_names=class_names * len(tensors) if class_names else None)
            batch_maps = prediction.maps.float().cpu()
        for index, path in enumerate(good):
            amap = batch_maps[index]
            if args.map_size == "input" and not framed:
                amap = F.interpolate(amap[None, None], size=sizes[index], mode="bilinear", align_corners=False)[0, 0]
            score = float(prediction.scores[index])
            scores.append(score)
            maps.append(amap.numpy().astype(np.float32))
            paths.append(str(path))
            if args.json:
                print(json.dumps({"path": str(path), "score": score, "map_max": float(amap.max())}))
            if args.overlays:
                rgb = decoded[index] if decoded[index] is not None else decode_image(path)
                write_overlay(Path(args.overlays) / f"{len(paths) - 1:05d}_{path.stem}.jpg", rgb, maps[-1],
                              **overlay_scale(args))
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
    from model.dataset_loading import InspectionDataset
    from model.datasets import discover
    from model.synthetic import SyntheticAnomalies
    from model.training import TrainingConfig, seed_everything, train_prompts

    family = get_family(args.model)
    if family.fit_samples is not None:  # trains from labelled samples on its own (model/supervised)
        return fit_family_samples(args, family)
    if not family.trainable:
        raise UsageError(f"--model {args.model} is training-free: nothing to train (trainable: "
                         f"{', '.join(list_models(trainable=True))})")
    samples = discover(args.data, args.meta, split=args.split)
    normals = [s for s in samples if s.label == 0]
    anomalous = [s for s in samples if s.label == 1]
    use_synthetic = args.synthetic == "on" or (args.synthetic == "auto" and not anomalous)
    if not normals:  # a data problem (exit 1): prompts learnt from one class only learn nothing
        from model.datasets import require_both_classes

        require_both_classes(samples, args.data, "training")
    if not anomalous and not use_synthetic:
        from model.datasets import DatasetError

        raise DatasetError(f"{args.data}: found {len(normals)} normal and no anomalous images; training needs "
                           "anomalous ones too, or --synthetic on to make synthetic defects on the normals")
    log.info("training data: %d normal, %d anomalous images (%d with masks)%s", len(normals), len(anomalous),
             sum(s.has_mask for s in anomalous), ", plus synthetic defects on the normals" if use_synthetic else "")
    datasets = [InspectionDataset(samples, image_size=args.image_size)] if anomalous else []
    if datasets and args.mosaic:
        from model.dataset_loading import MosaicDataset

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


def fit_family_samples(args: argparse.Namespace, family: Any) -> int:
    from model import create_detector
    from model.datasets import discover, require_both_classes

    samples = discover(args.data, args.meta, split=args.split)
    require_both_classes(samples, args.data, "training")
    options = {**model_options(args, args.model), "references": None}
    detector = create_detector(args.model, **options, references_later=True)
    references = args.references.split(",") if args.references and "," in args.references else args.references
    if isinstance(references, str):
        from model.fewshot import reference_files

        references = reference_files(references)
    checkpoint = family.fit_samples(detector, samples, output=args.output, seed=args.seed, references=references,
                                    metadata={"training_data": str(args.data), "split": args.split})
    print(f"weights written to {args.output}: {checkpoint.metadata.get('items')}")
    return 0


# ---------------------------------------------------------------------------------------------------- eval


# ---------------------------------------------------------------------------------------------------- weights
def cmd_weights_fetch(args: argparse.Namespace) -> int:
    """The weights the configured model needs (or those named on the command line), and nothing else."""
    from adapters.weights import (
        backbone_weights,
        fetch_backbone,
        fetch_prompts,
        prompts_weights,
        released,
        required_weights,
    )

    backbone_config = None
    if args.backbone or args.prompts:  # named on the command line: exactly these
        known = released()
        unknown = [name for name in args.prompts or () if name not in known]
        if unknown:
            raise UsageError(f"--prompts {unknown[0]!r}: not a released name ({', '.join(known)})")
        wanted = ([("backbone", args.backbone)] if args.backbone else []) + [("prompts", n) for n in args.prompts or ()]
        origin = "the command line"
    else:
        from daemon.config.settings import ConfigError, describe_config_search, find_config, load_config

        try:
            settings = load_config(find_config(args.config))
        except ConfigError as exc:
            raise UsageError(str(exc)) from None
        m = settings.model
        origin = describe_config_search(args.config)
        needed = required_weights(m.name, settings.resolve_model_value(m.backbone),
                                  settings.resolve_model_value(m.prompts))
        wanted = [("prompts", item.path.stem) if item.what.startswith("released prompts") else ("backbone", m.backbone)
                  for item in needed]
        backbone_config = settings.resolve_model_value(m.backbone_config)
    if args.skip_backbone:
        wanted = [entry for entry in wanted if entry[0] != "backbone"]
    items = {entry: backbone_weights(entry[1]) if entry[0] == "backbone" else prompts_weights(entry[1])
             for entry in wanted}
    if not items:
        print(f"nothing to download: the model of {origin} uses local weight files only")
        return 0
    if args.if_missing and not args.force and all(item.found() for item in items.values()):
        print("weights already in the cache: " + ", ".join(str(item.found()) for item in items.values())
              + " (anomalyd weights fetch --force downloads them again)")
        return 0
    for (kind, name), item in items.items():
        print(f"fetching the {item.what} ({origin}) ...", flush=True)
        if kind == "backbone":
            path = fetch_backbone(name, force=args.force, progress=sys.stderr.isatty(), config=backbone_config)
        else:
            path = fetch_prompts(name, force=args.force, progress=sys.stderr.isatty())
        print(f"{item.what} ready: {path}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from daemon.commands.model_options import add_engine_options

    predict = subparsers.add_parser("predict", help="score image files or folders")
    predict.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    predict.add_argument("--output", default="out.npz", help="npz with scores [N], maps [N,H,W], paths [N]")
    predict.add_argument("--map-size", choices=("model", "input"), default="model",
                         help="maps in the model input space (parity path) or at each image's own size")
    predict.add_argument("--overlays", help="write heat-map overlay JPEGs into this folder")
    predict.add_argument("--overlay-scale", choices=("fixed", "per-image"), default="fixed",
                         help="heat-map colours: fixed 0..1 like the daemon's (default), or each map's min..max")
    predict.add_argument("--json", action="store_true", help="one JSON line per image on stdout")
    predict.add_argument("--batch-size", type=int, default=8)
    add_model_options(predict)
    add_engine_options(predict)
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
    weights = subparsers.add_parser("weights", help="download model weights into the cache")
    weights_sub = weights.add_subparsers(dest="weights_command", metavar="ACTION")
    weights_sub.required = True
    fetch = weights_sub.add_parser("fetch", help="the weights the configured model needs (CLIP backbone, "
                                   "released AnomalyCLIP prompts), into the cache the daemon loads them from")
    fetch.add_argument("--config", help="configuration file (default: $ANOMALYD_CONFIG, ./config.toml, "
                       "/etc/anomalyd/config.toml)")
    fetch.add_argument("--backbone", help="fetch this open_clip backbone instead of the configured one's needs")
    fetch.add_argument("--prompts", action="append", help="fetch these released prompts (repeatable) instead of the "
                       "configured one's needs")
    fetch.add_argument("--skip-backbone", action="store_true")
    fetch.add_argument("--force", action="store_true", help="download again even if cached")
    fetch.add_argument("--if-missing", action="store_true", help="do nothing when everything is already cached")
    fetch.set_defaults(func=cmd_weights_fetch)
