"""The retraining process of a family built on references: `python -m daemon.learning.head_retraining_job JOB.json`,
started by the retrainer (daemon/learning/head_retraining.py builds the job, its model kind the trained family's)
through `daemon.learning.supervisor.JobSupervisor`. What the family does is its `LabelLearning` (model/factory.py;
patchcore-head's: model/supervised/label_learning.py); this process only runs it and judges the result.

It lowers its priority, then per source with labelled frames asks the family for that source's frozen training
items (its bank on the source's references; for a head: the references leave-one-out as normals, synthetic defects
on them, the labelled defects with their masks or image labels, the frames labelled normal, false alarms included);
has the family fit one model on all of them; saves it to the job's output. Then it scores
the candidate and the active model (the base the labels improve on, or the active trained one) on the held-out labelled frames, each
source against its own bank, and measures both at their calibrated operating point: a threshold from each model's
known-good frames (held-out references and their calibration views, plus the training frames labelled normal) at
`false_reject_rate`, the way the daemon calibrates a new version (daemon/references/manager.py), and the held-out defects
missed and normals alerted at it. When no labelled normal is held out, the held-out references' own leave-one-out
scores stand in as the normals of the image metrics (said in the result). Like daemon/learning/retraining_job.py it touches
no database: it reads the job file and writes result.json; progress goes to stdout as JSON lines.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from daemon.learning.retraining_job import emit, job_main

log = logging.getLogger("anomalyd.head_retraining_job")


def _by_source(items: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for item in items:
        groups.setdefault(str(item["category"]), []).append(item)
    return groups


def _images(paths: Sequence[str | Path], size: int) -> Any:
    import torch

    from model.dataset_loading import load_image

    return torch.stack([load_image(Path(p), size, "fast") for p in paths]) if paths else \
        torch.zeros(0, 3, size, size)


def _samples(items: list[dict[str, Any]]) -> list[Any]:
    from model.datasets import Sample

    return [Sample(path=Path(i["path"]), category=str(i["category"]), defect="labelled" if i["label"] else "good",
                   label=int(i["label"]), mask_path=Path(i["mask"]) if i.get("mask") else None,
                   has_mask=bool(i.get("mask")) or not i["label"]) for i in items]


def use_source_geometry(detector: Any, spec: dict[str, Any], source: str) -> Any:
    """Put the source's frame geometry (the job's `geometry`, as the daemon runs that source; none: squash) on the
    detector, so its bank, training items and scores are cut as the source's frames are; returns it."""
    from model.geometry import make_geometry

    values = (spec.get("geometry") or {}).get(source)
    geometry = make_geometry() if not values else make_geometry(
        values["resize"], values.get("roi"), values.get("ignore"), values.get("tile_overlap"))
    detector.geometry = geometry
    return geometry


def training_parts(learning: Any, detector: Any, spec: dict[str, Any]) -> list[Any]:
    """The family's frozen training items of every source with references and labelled training frames."""
    t = spec["training"]
    parts = []
    for source, items in sorted(_by_source(spec["train"]).items()):
        references = spec["sources"].get(source) or []
        if len(references) < 2:
            log.warning("source %s: %d reference(s); its labelled frames cannot train (need 2)", source,
                        len(references))
            continue
        in_bank = {Path(p).resolve() for p in references}
        samples = [s for s in _samples(items) if s.path.resolve() not in in_bank]  # the bank's own would score 0
        use_source_geometry(detector, spec, source)
        parts.append(learning.source_inputs(detector, [Path(p) for p in references], samples,
                                            synthetic_per_reference=int(t["synthetic_per_reference"]),
                                            seed=int(t["seed"])))
        log.info("source %s: %d references, %d labelled training frames", source, len(references), len(samples))
    if not parts:
        raise RuntimeError("no source has both references (2 or more) and labelled training frames")
    return parts


def _scores(detector: Any, paths: Sequence[str | Path], size: int) -> tuple[list, list]:
    """(image scores, maps) on the daemon's 0–1 scale (the family's declared rule, daemon/detectors/scale.py); with
    a geometry, scored through it as the daemon scores the source's frames (maps in each frame's own pixels)."""
    import torch

    from daemon.detectors.scale import scale_outputs

    if not paths:
        return [], []
    geometry = getattr(detector, "geometry", None)
    if geometry is not None and not geometry.plain:
        from model.geometry import predict_frames
        from model.preprocess import decode_image

        raw_scores, raw_maps = predict_frames(detector, [decode_image(p) for p in paths], geometry,
                                              batch_size=int(getattr(detector, "batch_size", 8)))
        scores = scale_outputs(detector, torch.as_tensor(raw_scores).float(), torch.zeros(len(paths), 1, 1))[0]
        maps = [scale_outputs(detector, torch.zeros(1), torch.as_tensor(m).float()[None])[1][0].numpy()
                for m in raw_maps]
        return scores.tolist(), maps
    with torch.inference_mode():
        prediction = detector.predict(_images(paths, size))
    scores, maps = scale_outputs(detector, prediction.scores.float().cpu(), prediction.maps.float().cpu())
    return scores.tolist(), [m.numpy() for m in maps]


def _square(maps: list[Any], size: int) -> list[Any]:
    """Maps in frame pixels at the model size (the held-out metrics compare them with square masks)."""
    import cv2

    return [m if m.shape == (size, size) else cv2.resize(m, (size, size), interpolation=cv2.INTER_LINEAR)
            for m in maps]


def _evaluate_source(scorer: Any, source: str, references: list[Path], holdout: list[dict],
                     train_normals: list[str], rate: float) -> dict[str, Any]:
    """One model (`scorer`: the family's base or a trained model) on one source's held-out frames: scores, maps, its
    calibrated threshold and the known-good own scores (the stand-in normals), all as the daemon computes them for
    that model's family: its `known_good` hook, its score scale, its threshold floor."""
    import torch

    from daemon.detectors.scale import scale_outputs
    from daemon.references.calibration import calibrated_bounds, floored
    from model.factory import capabilities_of, known_good_of
    from model.known_good import CALIBRATION_HOLDOUTS

    size = scorer.image_size
    known = known_good_of(scorer)(scorer, references, CALIBRATION_HOLDOUTS)
    scorer.distance_scale = known.distance_scale  # as daemon/references/bank.py sets it on a source's detector
    good, good_max = scale_outputs(scorer, torch.tensor(known.scores), torch.tensor(known.maxima))
    own = scale_outputs(scorer, torch.tensor(known.own), torch.tensor(known.own))[0].tolist()
    normal_scores, normal_maps = _scores(scorer, train_normals, size)
    good_scores = good.tolist() + normal_scores
    good_maxima = good_max.tolist() + [float(m.max()) for m in normal_maps]
    image, pixel = calibrated_bounds(good_scores, good_maxima, rate, what=f"source {source} ({scorer.name})")
    floor = capabilities_of(scorer).threshold_floor  # as the daemon calibrates it (daemon/references/manager.py)
    image, pixel = floored(image, floor), floored(pixel, floor)
    scores, maps = _scores(scorer, [i["path"] for i in holdout], size)
    return {"threshold": image.value, "pixel_threshold": pixel.value, "scores": scores, "maps": maps, "own": own,
            "known_good": len(good_scores)}


def evaluate(learning: Any, detector: Any, checkpoint: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """Per model ("candidate", "active"): held-out image/pixel metrics and the operating point (see the module
    docstring)."""
    import numpy as np

    from model.dataset_loading import load_mask
    from model.metrics import MetricAccumulator

    active = spec.get("active") or {}
    models: dict[str, Any] = {"candidate": checkpoint}
    if active.get("kind") == spec["model"]["kind"] and active.get("prompts"):  # an earlier trained model is active
        models["active"] = learning.load(active["prompts"])
    else:  # the configured base model (or nothing active yet: the base is what the daemon runs then)
        models["active"] = None
    rate = float(spec["false_reject_rate"])
    train_normals = {s: [i["path"] for i in items if not i["label"]] for s, items in _by_source(spec["train"]).items()}
    results: dict[str, Any] = {}
    per_source = {s: items for s, items in _by_source(spec["holdout"]).items() if len(spec["sources"].get(s) or []) >= 2}
    if not per_source:
        raise RuntimeError("no held-out labelled frame of a source with references")
    for name, model in models.items():
        accumulator = MetricAccumulator()
        point = {"missed": 0, "defects": 0, "false_alarms": 0, "normals": 0, "thresholds": {},
                 "normals_from_references": 0}
        for source, holdout in sorted(per_source.items()):
            references = [Path(p) for p in spec["sources"][source]]
            if use_source_geometry(detector, spec, source).plain:
                detector.set_references(_images(references, detector.image_size))
            else:
                detector.load_references([str(p) for p in references])
            out = _evaluate_source(learning.scorer(detector, model), source, references, holdout,
                                   train_normals.get(source, []), rate)
            labels = [int(i["label"]) for i in holdout]
            masks = [load_mask(s, detector.image_size).numpy() if s.label else None for s in _samples(holdout)]
            maps = _square(out["maps"], detector.image_size)
            scores = list(out["scores"])
            if not any(label == 0 for label in labels):  # no held-out labelled normal: the references stand in
                labels += [0] * len(out["own"])
                scores += out["own"]
                maps = maps + [np.zeros_like(maps[0]) for _ in out["own"]]
                masks += [None] * len(out["own"])
                point["normals_from_references"] += len(out["own"])
            accumulator.add("holdout", np.asarray(labels), np.asarray(scores, dtype=np.float64),
                            maps=np.stack(maps), masks=masks)
            threshold = out["threshold"]
            point["thresholds"][source] = threshold
            for item, score in zip(holdout, out["scores"], strict=True):
                if item["label"]:
                    point["defects"] += 1
                    point["missed"] += int(score < threshold)  # alert = score >= threshold (daemon/references/thresholds.py)
                else:
                    point["normals"] += 1
                    point["false_alarms"] += int(score >= threshold)
        metrics = dict(accumulator.compute_category("holdout"))
        metrics.update({"missed": point["missed"], "false_alarms": point["false_alarms"]})
        results[name] = {"metrics": metrics, "operating_point": point}
        emit({"event": "evaluated", "model": name})
    return results


def run(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from model import create_detector, get_family, resolve_device

    torch.set_num_threads(int(spec.get("threads") or 1))
    t = spec["training"]
    emit({"event": "start", "version": spec["version"], "epochs": 1, "steps": 3})
    options = {k: v for k, v in spec["model"]["options"].items() if v is not None}
    if "layers" in options:
        options["layers"] = tuple(options["layers"])
    kind = spec["model"]["kind"]
    learning = get_family(kind).label_learning
    if learning is None:
        raise RuntimeError(f"model {kind!r} does not learn from labelled frames on references")
    detector = create_detector(kind, device=resolve_device(spec.get("device") or "auto"),
                               dtype="float32", references_later=True, **options)
    parts = training_parts(learning, detector, spec)
    checkpoint, trained = learning.fit(
        detector, parts, steps=int(t["steps"]), seed=int(t["seed"]),
        synthetic_per_reference=int(t["synthetic_per_reference"]),
        metadata={"version": spec["version"], "training_data": f"operator labels, retraining run {spec['run_id']}",
                  "sources": sorted(spec["sources"])})
    items = trained["items"]
    emit({"event": "epoch", "epoch": 1, "epochs": 1, "loss": 0.0, "items": items})
    output = Path(spec["output"])
    output.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.save(output)
    evaluated = evaluate(learning, detector, checkpoint, spec)
    return {"version": spec["version"], "synthetic_holdout": 0, "items": items,
            "history": [{"epoch": 1, "steps": trained["training"]["steps"], "items": items}],
            "candidate": evaluated["candidate"]["metrics"], "active": evaluated["active"]["metrics"],
            "active_error": None,
            "operating_point": {name: value["operating_point"] for name, value in evaluated.items()}}


def main(argv: Sequence[str] | None = None) -> int:
    return job_main(argv, run, "daemon.learning.head_retraining_job")


if __name__ == "__main__":
    sys.exit(main())
