"""`anomalyd eval`: per-category metrics, curves and overlays; the k-shot protocol with the daemon's operating
point; mixed supervision for trained heads; set scoring for mutual scoring."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from daemon.cli import UsageError
from daemon.commands.model_options import (
    add_engine_options,
    add_model_options,
    build_detector,
    model_options,
    overlay_scale,
)

log = logging.getLogger("anomalyd")


def operating_threshold(detector: Any, references: list, rate: float) -> tuple[float, str, list[float]] | None:
    """The threshold the daemon's rule derives from these references alone (None: not measured)."""
    if rate <= 0:
        return None
    from daemon.references.operating_point import daemon_threshold

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
    from model.dataset_loading import load_image
    from model.factory import capabilities_of
    from model.fewshot import with_references

    files = [sample.path for sample in references]

    def load(path: Path, size: int):
        return load_image(path, size, transform)

    if capabilities_of(base).uses_references:  # its own bank (PatchCore)
        base.load_references(files, transform=load)
        return base
    return with_references(base, files, transform=load)


def set_predictions(detector: Any, batches: Any) -> list[dict[str, Any]]:
    """The batches of one category, each given its slice of `detector.predict_set` over all of them."""
    import torch

    from model.detector import Prediction

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


def labelled_training(name: str) -> tuple[str, Any]:
    """(the trained family's name, its `LabelLearning.few_shot`) for `--train-anomalies` on the model `name`: the
    family its labels train (`Capabilities.retrains_as`, or itself); UsageError when that one has no such hook."""
    from model.factory import retraining_family

    family = retraining_family(name)
    learning = family.label_learning
    if learning is None or learning.few_shot is None:
        raise UsageError(f"--train-anomalies: model {name!r} does not learn from labelled defects on its references "
                         f"(its labels train {family.name!r}, which has no few-shot training)")
    return family.name, learning.few_shot


def cmd_eval(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from adapters.report import plot_curves, write_overlay, write_report
    from model import create_detector
    from model.dataset_loading import InspectionDataset, collate_samples
    from model.datasets import discover
    from model.factory import DEFAULT_MODEL
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
    if args.train_anomalies is not None:  # mixed supervision (model/mixed_supervision.py)
        from model.mixed_supervision import mixed_split
        from model.mixed_supervision import operating_point as mixed_operating_point

        if split is None:
            raise UsageError("--train-anomalies needs --shots K (the normal references the detector trains with)")
        mixed = mixed_split(split.tests, args.train_anomalies, args.seed)
        by_category = mixed.tests
    # model → category → operating point at the empirical 0.5 % FRR quantile of the test normals (trained heads)
    mixed_points: dict[str, dict[str, dict[str, float]]] = {}
    if args.limit:
        by_category = {c: s[: args.limit] for c, s in by_category.items()}
    report_dir = Path(args.report) if args.report else None
    models = args.models or [DEFAULT_MODEL]
    results: dict[str, Any] = {}
    infos: dict[str, Any] = {}
    transform = "reference" if args.reference_preprocessing else "fast"
    show = sys.stderr.isatty()
    skipped: list[tuple[str, str]] = []
    points: dict[str, dict[str, Any]] = {}  # model → category → operating point (daemon/references/operating_point.py)
    point_scores: dict[str, dict[str, Any]] = {}  # the scores behind them (report folder only)
    for name in models:
        few_shot = labelled_training(name) if mixed is not None else None
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
            if few_shot is not None and (mixed.train_anomalies[category] or few_shot[0] == name):
                # a model whose labels train another family (PatchCore's a head) is itself without labelled defects
                detector = few_shot[1](base, split.references[category], mixed.train_anomalies[category],
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
                from daemon.references.operating_point import on_daemon_scale, operating_point

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
            from daemon.references.operating_point import write_json

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
        from daemon.references.operating_point import markdown as point_table

        print(markdown + "".join("\n" + point_table(n, args.false_reject_rate, p) for n, p in points.items()))
        if mixed_points:
            from model.mixed_supervision import operating_point_table

            print(operating_point_table(mixed_points))
    if skipped:
        print(f"{len({p for p, _ in skipped})} bad samples skipped (listed above)", file=sys.stderr)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
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
