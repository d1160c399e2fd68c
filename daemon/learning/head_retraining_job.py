"""The retraining process of a family built on references: `python -m daemon.learning.head_retraining_job JOB.json`,
started by the retrainer (daemon/learning/head_retraining.py builds the job, its model kind the trained family's)
through `daemon.learning.supervisor.JobSupervisor`. What the family does is its `LabelLearning` (model/factory.py;
patchcore-head's: model/supervised/label_learning.py); this process only runs it and judges the result.

It lowers its priority, then per source with labelled frames asks the family for that source's frozen training
items (its bank on the source's references; for a head: the references leave-one-out as normals, synthetic defects
on them, the labelled defects with their masks or image labels, the frames labelled normal, false alarms included);
has the family fit its weights on all of them (per resize mode, when the sources differ in it: the family
tags its items with their mode); saves them to the job's output. Then the family measures the candidate
and the active model (the base the labels improve on, or the active trained one) on the held-out labelled frames
(`LabelLearning.promotion_metrics`; by default model/promotion.py's `reference_holdout_metrics`: each source against
its own bank, each model at its calibrated operating point), under the daemon's score scale and threshold rule,
which this job hands it (`DaemonRules`). Like daemon/learning/retraining_job.py it touches no database: it reads the
job file and writes result.json; progress goes to stdout as JSON lines.
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


def _samples(items: list[dict[str, Any]]) -> list[Any]:
    from model.datasets import Sample

    return [Sample(path=Path(i["path"]), category=str(i["category"]), defect="labelled" if i["label"] else "good",
                   label=int(i["label"]), mask_path=Path(i["mask"]) if i.get("mask") else None,
                   has_mask=bool(i.get("mask")) or not i["label"]) for i in items]


def source_geometry(spec: dict[str, Any], source: str) -> Any:
    """The source's frame geometry (the job's `geometry`, as the daemon runs that source; none: squash)."""
    from model.geometry import make_geometry

    values = (spec.get("geometry") or {}).get(source)
    return make_geometry() if not values else make_geometry(
        values["resize"], values.get("roi"), values.get("ignore"), values.get("tile_overlap"),
        values.get("tile_size"))


def use_source_geometry(detector: Any, spec: dict[str, Any], source: str) -> Any:
    """Put the source's frame geometry on the detector, so its bank, training items and scores are cut as the
    source's frames are; returns it."""
    detector.geometry = source_geometry(spec, source)
    return detector.geometry


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


def calibrated_thresholds(scorer: Any, scores: Sequence[float], maxima: Sequence[float], rate: float,
                          what: str) -> tuple[float, float]:
    """(image, pixel) thresholds of a model from its known-good scores, as the daemon calibrates a new version
    (daemon/references/manager.py): the false-reject bound, floored at the family's `threshold_floor`."""
    from daemon.references.calibration import calibrated_bounds, floored
    from model.factory import capabilities_of

    image, pixel = calibrated_bounds(scores, maxima, rate, what=what)
    floor = capabilities_of(scorer).threshold_floor
    return floored(image, floor).value, floored(pixel, floor).value


def evaluate(learning: Any, detector: Any, checkpoint: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """Per model ("candidate", "active"): the family's held-out metrics and operating point
    (`LabelLearning.promotion_metrics`, by default model/promotion.py's `reference_holdout_metrics`) under the
    daemon's score scale and threshold rule; the gate (daemon/learning/promotion.py) decides on them."""
    from daemon.detectors.scale import scale_outputs
    from model.promotion import DaemonRules, SourceHoldout, reference_holdout_metrics

    active = spec.get("active") or {}
    models: dict[str, Any] = {"candidate": checkpoint}
    if active.get("kind") == spec["model"]["kind"] and active.get("prompts"):  # an earlier trained model is active
        models["active"] = learning.load(active["prompts"])
    else:  # the configured base model (or nothing active yet: the base is what the daemon runs then)
        models["active"] = None
    train_normals = {s: [Path(i["path"]) for i in items if not i["label"]]
                     for s, items in _by_source(spec["train"]).items()}
    sources = {s: SourceHoldout(references=[Path(p) for p in spec["sources"][s]], holdout=_samples(items),
                                train_normals=train_normals.get(s, []), geometry=source_geometry(spec, s))
               for s, items in _by_source(spec["holdout"]).items() if len(spec["sources"].get(s) or []) >= 2}
    if not sources:
        raise RuntimeError("no held-out labelled frame of a source with references")
    measure = learning.promotion_metrics or reference_holdout_metrics
    return measure(learning, detector, models, sources, rate=float(spec["false_reject_rate"]),
                   rules=DaemonRules(scale=scale_outputs, threshold=calibrated_thresholds),
                   on_evaluated=lambda name: emit({"event": "evaluated", "model": name}))


def run(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from model import create_detector, get_family, resolve_device

    torch.set_num_threads(int(spec.get("threads") or 1))
    # Frozen CPU features (references, labelled frames, the held-out judging) on the daemon's own trunk runtime:
    # as fast as inspection, and the scores the daemon will see. Training, and CUDA, stay on PyTorch.
    from adapters.cnn_runtime import choose as choose_cnn_runtime

    cnn = str(spec.get("cnn_runtime") or "auto")
    log.info("CNN trunks run on %s on the CPU ([runtime].cnn = %s)", choose_cnn_runtime(cnn), cnn)
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
