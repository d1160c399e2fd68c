"""The retraining process: `python -m daemon.learning.retraining_job JOB.json`, started by `daemon.learning.retraining.Retrainer`.

It lowers its own priority (`nice`), trains the job's model (AnomalyCLIP prompts, or AdaCLIP prompts and heads) on
its training frames (fine-tuning the active version's weights when it is of the same model), then measures the
candidate and the active model on the held-out frames (the family's `promotion_metrics`, by default
model/promotion.py's `holdout_metrics`) and writes `result.json`. It touches no database:
everything it needs is in the job file, and everything it produces is files, so the daemon records the outcome.
Progress goes to stdout as JSON lines (`{"event": "start"|"epoch"|"evaluated"|"done", ...}`), the log to stderr.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from model.atomic import atomic_write_text

log = logging.getLogger("anomalyd.retraining_job")


def emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def _samples(items: list[dict[str, Any]]) -> list[Any]:
    from model.datasets import Sample

    samples = []
    for item in items:
        label = int(item["label"])
        mask = Path(item["mask"]) if item.get("mask") else None
        samples.append(Sample(path=Path(item["path"]), category=str(item.get("category") or "object"),
                              defect="good" if label == 0 else "labelled", label=label,
                              mask_path=mask if label else None, has_mask=label == 0 or mask is not None))
    return samples


def training_set(spec: dict[str, Any]) -> Any:
    """Labelled frames, plus synthetic defects on the normal ones when the job says so."""
    from torch.utils.data import ConcatDataset

    from model.dataset_loading import InspectionDataset
    from model.synthetic import SyntheticAnomalies

    size, transform = spec["model"]["image_size"], spec["model"]["transform"]
    samples = _samples(spec["train"])
    parts: list[Any] = [InspectionDataset(samples, image_size=size, transform=transform)]
    if spec.get("synthetic"):
        normals = [s for s in samples if s.label == 0]
        synthetic = SyntheticAnomalies(normals, image_size=size, p_anomaly=0.5, seed=spec["training"]["seed"],
                                       transform=transform)
        parts.append(synthetic)
        dataset = ConcatDataset(parts)
        dataset.set_epoch = synthetic.set_epoch  # type: ignore[attr-defined]
        return dataset
    return parts[0]


def holdout_set(spec: dict[str, Any]) -> tuple[Any, int]:
    """The held-out frames; without a labelled defect among them, each normal also comes as a synthetic defect
    (deterministic), so the image metrics are defined. Returns (dataset, number of synthetic items)."""
    from torch.utils.data import ConcatDataset

    from model.dataset_loading import InspectionDataset
    from model.synthetic import SyntheticAnomalies

    size, transform = spec["model"]["image_size"], spec["model"]["transform"]
    samples = _samples(spec["holdout"])
    real = InspectionDataset(samples, image_size=size, transform=transform)
    normals = [s for s in samples if s.label == 0]
    if any(s.label == 1 for s in samples) or not normals:
        return real, 0
    synthetic = SyntheticAnomalies(normals, image_size=size, p_anomaly=1.0, seed=spec["training"]["seed"] + 1,
                                   transform=transform)
    return ConcatDataset([real, synthetic]), len(normals)


def holdout_metrics(family: Any, detector: Any, dataset: Any, batch_size: int) -> dict[str, Any]:
    """The family's held-out metrics of `detector` (`ModelFamily.promotion_metrics`; default: image and pixel
    metrics of its predictions, model/promotion.py); the gate (daemon/learning/promotion.py) decides on them."""
    from model.promotion import holdout_metrics as default

    return (family.promotion_metrics or default)(detector, dataset, batch_size=batch_size)


def _family(spec_model: dict[str, Any]) -> Any:
    """The job's family: built in, or registered by its module (a plug-in's), which this process imports first."""
    from model.factory import family_from

    return family_from(spec_model["kind"], spec_model.get("family_module") or "")


def _build(kind: str, spec_model: dict[str, Any], backbone: Any, weights: str | None) -> Any:
    """The model to train or evaluate: `weights` (a version's file) loaded, or a fresh start when None."""
    from model.factory import get_family

    return get_family(kind).training.build(backbone, weights, layers=spec_model["layers"],
                                           image_size=spec_model["image_size"])


def _detector(kind: str, model: Any, device: Any, version: str) -> Any:
    import torch

    from model.factory import get_family

    return get_family(kind).wrap(model, device=device, dtype=torch.float32, version=version)


def _active_detector(spec: dict[str, Any], backbone: Any, device: Any) -> Any:
    from model import create_detector

    active, m = spec["active"], spec["model"]
    kind = m["kind"]
    if active["kind"] == kind and active.get("prompts"):  # same model: reuse the loaded backbone
        return _detector(kind, _build(kind, m, backbone, active["prompts"]), device, active["version"])
    return create_detector(active["kind"], backbone=m["backbone"], backbone_config=m["backbone_config"],
                           prompts=active.get("prompts"), layers=tuple(m["layers"]), image_size=m["image_size"],
                           device=str(device))


def run(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from model import load_backbone, resolve_device
    from model.training import TrainingConfig, train_prompts

    m, t = spec["model"], spec["training"]
    family = _family(m)
    kind = family.name
    torch.set_num_threads(int(spec.get("threads") or 1))
    device = resolve_device(spec.get("device") or "auto")
    emit({"event": "start", "version": spec["version"], "epochs": t["epochs"], "steps": t["epochs"] + 2})
    # The family's activation (AdaCLIP's weights are trained on a tower built with nn.GELU, as its released ones).
    # A family with its own backbone (`clip_backbone` False) builds it itself.
    backbone = (load_backbone(m["backbone"], config=m.get("backbone_config"), **family.backbone_options())
                if family.caps.clip_backbone else None)
    model = _build(kind, m, backbone, m.get("init_prompts"))
    config = TrainingConfig.for_model(kind, epochs=t["epochs"], batch_size=t["batch_size"],
                                      learning_rate=t["learning_rate"], seed=t["seed"])
    class_names = sorted({str(item.get("category") or "object") for item in spec["train"]})
    metadata = {"version": spec["version"], "model": kind, "backbone": getattr(backbone, "name", None),
                "layers": list(m["layers"]), "image_size": m["image_size"],
                "training_data": f"operator labels, retraining run {spec['run_id']}", "class_names": class_names,
                "init_prompts": m.get("init_prompts"), "synthetic": bool(spec.get("synthetic")),
                "config": {**vars(config), "betas": list(config.betas)}}

    def on_epoch(stats: Any) -> None:
        emit({"event": "epoch", "epoch": stats.epoch, "epochs": t["epochs"], "loss": stats.loss,
              "image_loss": stats.image_loss, "local_loss": stats.local_loss, "samples": stats.samples,
              "skipped": len(stats.skipped)})

    output = Path(spec["output"])
    output.parent.mkdir(parents=True, exist_ok=True)
    history = train_prompts(model, training_set(spec), output, config=config, device=device, resume=False,
                            progress=False, metadata=metadata, on_epoch=on_epoch)
    holdout, synthetic_count = holdout_set(spec)
    candidate = _detector(kind, model, device, spec["version"])
    result: dict[str, Any] = {
        "version": spec["version"], "synthetic_holdout": synthetic_count,
        "history": [{"epoch": h.epoch, "loss": h.loss, "image_loss": h.image_loss, "local_loss": h.local_loss,
                     "samples": h.samples, "skipped": len(h.skipped)} for h in history],
        "candidate": holdout_metrics(family, candidate, holdout, t["batch_size"]), "active": None,
        "active_error": None,
    }
    emit({"event": "evaluated", "model": "candidate"})
    if spec.get("active"):
        try:
            result["active"] = holdout_metrics(family, _active_detector(spec, backbone, device), holdout,
                                               t["batch_size"])
        except Exception as exc:
            log.exception("cannot evaluate the active model %s", spec["active"].get("version"))
            result["active_error"] = f"{type(exc).__name__}: {exc}"
    else:
        result["active_error"] = "no active model version"
    emit({"event": "evaluated", "model": "active"})
    return result


def main(argv: Sequence[str] | None = None) -> int:
    return job_main(argv, run, "daemon.learning.retraining_job")


def job_main(argv: Sequence[str] | None, run_job: Callable[[dict[str, Any]], dict[str, Any]], module: str) -> int:
    """A training job process (`python -m MODULE JOB.json`): lowered priority, `run_job(spec)`, the result file
    written atomically, a `done` event. Shared by the CLIP job and the head job (daemon/learning/head_retraining_job.py)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print(f"usage: python -m {module} JOB.json", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = json.loads(Path(args[0]).read_text(encoding="utf-8"))
    try:
        os.nice(int(spec.get("nice") or 0))  # inspection keeps priority over training
    except OSError as exc:
        log.warning("cannot lower the priority: %s", exc)
    result = run_job(spec)
    atomic_write_text(Path(spec["result"]), json.dumps(result, indent=1, default=_json_default))
    emit({"event": "done"})
    return 0


def _json_default(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


if __name__ == "__main__":
    sys.exit(main())
