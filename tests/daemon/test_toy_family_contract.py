"""A family owns its whole contract: a toy family declared in this file alone (no project file names it) gets, through
the daemon's own code paths, its references (a bank built from a source's reference files), its calibration (a
threshold calibrated from its `known_good` hook and recorded in the threshold history), its export (ONNX through
the generic export path and its parity gate, `[runtime].engine = "onnxruntime"`) and its retraining (operator labels
→ the retraining process → a candidate version measured by its `promotion_metrics`, promoted, hot-swapped and
calibrated again).

The family registers when this module is imported: the retraining process (a separate Python process) imports it
the way it imports a plug-in's family, from the module the registration names (`ModelFamily.module`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from sqlalchemy import select
from torch import nn

from adapters.db import Inspection, ModelVersion, TrainingRun
from adapters.db.repository import add_label
from adapters.db.tables import ThresholdChange
from daemon.config.settings import load_config
from daemon.learning.head_retraining import make_retrainer
from daemon.process.service import Service
from daemon.references.calibration import calibrated_bounds
from model.detector import TorchDetector, file_digest
from model.export import DEFAULT_TOLERANCE, ExportGraph
from model.factory import (
    Capabilities,
    CheckpointFormat,
    ModelFamily,
    TrainingSpec,
    get_family,
    register_family,
)
from model.known_good import KnownGoodScores
from model.preprocess import decode_image, fast_transform
from model.training import StepLoss, TrainingConfig
from tests.waiting import wait_until

TOY = "toy-bank"
SIZE = 32
REFERENCE_LEVELS = (100, 110, 120, 130)


class BankModule(nn.Module):
    """Score = sigmoid(gain * (mean pixel - bank) + bias), map = the same per pixel; `bank` is the references' mean
    pixel (not learned, not saved with the weights), `gain` and `bias` are learned from labels."""

    def __init__(self) -> None:
        super().__init__()
        self.image_size = SIZE
        self.gain = nn.Parameter(torch.tensor(2.0))
        self.bias = nn.Parameter(torch.tensor(-1.0))
        self.register_buffer("bank", torch.tensor(0.0), persistent=False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = torch.sigmoid(self.gain * (images.mean(dim=1) - self.bank) + self.bias)
        scores = torch.sigmoid(self.gain * (images.mean(dim=(1, 2, 3)) - self.bank) + self.bias)
        return scores, maps

    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self(images)


class BankDetector(TorchDetector):
    name = TOY

    @property
    def bank(self) -> torch.Tensor:
        return self.model.bank


def _images(files: Sequence[str | Path]) -> torch.Tensor:
    return torch.stack([fast_transform(decode_image(Path(f)), SIZE) for f in files])


def create_toy(*, device: torch.device, dtype: torch.dtype, references: Any = None, prompts: str | None = None,
               **_: Any) -> BankDetector:
    module = BankModule()
    if prompts is not None:
        module.load_state_dict(load_file(prompts))
    if references is not None:
        module.bank = _images([references] if isinstance(references, (str, Path)) else references).mean()
    weights = file_digest(prompts) if prompts is not None else "init"
    version = f"{TOY}-{weights}-b{float(module.bank):.4f}"
    return BankDetector(module, device=device, dtype=dtype, version=version)


def wrap_toy(module: BankModule, *, device: Any, dtype: Any, version: str) -> BankDetector:
    return BankDetector(module, device=device, dtype=dtype, version=version)


def toy_known_good(detector: BankDetector, files: Sequence[Path], limit: int) -> KnownGoodScores:
    """Each of the first `limit` references scored against a bank of the others."""
    scores, maxima = [], []
    for index, held_out in enumerate(files[:limit]):
        others = create_toy(device=torch.device("cpu"), dtype=torch.float32,
                            references=[f for j, f in enumerate(files) if j != index])
        others.model.load_state_dict(detector.model.state_dict())
        prediction = others.predict(_images([held_out]))
        scores.append(float(prediction.scores[0]))
        maxima.append(float(prediction.maps[0].max()))
    return KnownGoodScores(scores, maxima, 1.0, len(scores), 0, list(scores))


asked_versions: list[str] = []  # the versions the daemon asked the family's known_good hook about


def known_good_hook(detector: BankDetector, files: Sequence[Path], limit: int) -> KnownGoodScores:
    asked_versions.append(str(detector.version))
    return toy_known_good(detector, files, limit)


class ToyExportModule(nn.Module):
    def __init__(self, module: BankModule) -> None:
        super().__init__()
        self.module = module

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.module(images)


def toy_graph(detector: BankDetector, class_names: Sequence[str]) -> ExportGraph:
    return ExportGraph(module=ToyExportModule(detector.model.cpu().float()), model=TOY,
                       version=str(detector.version), image_size=SIZE, backbone="none", taps=[],
                       tolerance=dict(DEFAULT_TOLERANCE))


class ToyTarget:
    def __init__(self, model: BankModule, config: TrainingConfig) -> None:
        self.model, self.config = model, config

    def optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.model.parameters(), lr=self.config.learning_rate)

    def loss(self, batch: Mapping[str, Any], device: torch.device) -> StepLoss:
        scores, _ = self.model(batch["image"].to(device))
        loss = nn.functional.binary_cross_entropy(scores, batch["label"].float().to(device))
        return StepLoss(loss, loss.item(), 0.0)

    def state(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state(self, state: Mapping[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)

    def save(self, output: Path, metadata: Mapping[str, Any]) -> None:
        save_file(self.model.state_dict(), str(output))

    def finish_epoch(self) -> None:
        pass


def _save(model: nn.Module, path: str | Path, metadata: Mapping[str, Any]) -> Path:
    save_file(model.state_dict(), str(path))
    return Path(path)


def toy_promotion_metrics(detector: Any, holdout: Any, *, batch_size: int) -> dict[str, Any]:
    """The toy's own held-out measures on top of the default ones: the retraining records what the family measures."""
    from model.promotion import holdout_metrics

    return {**holdout_metrics(detector, holdout, batch_size=batch_size), "toy_frames": len(holdout)}


register_family(ModelFamily(
    name=TOY, create=create_toy, wrap=wrap_toy, summary="brightness against the references' mean (test family)",
    capabilities=Capabilities(needs_references=True, uses_references=True, clip_backbone=False),
    checkpoint=CheckpointFormat(load=load_file, save=_save),
    training=TrainingSpec(build=lambda backbone, weights, **_: _built(weights), target=ToyTarget,
                          model_type=BankModule, defaults={"epochs": 2, "learning_rate": 0.5}),
    exporter=toy_graph, known_good=known_good_hook, promotion_metrics=toy_promotion_metrics,
))


def _built(weights: str | None) -> BankModule:
    module = BankModule()
    if weights:
        module.load_state_dict(load_file(weights))
    return module


def _config(tmp_path: Path) -> Path:
    refs = tmp_path / "refs"
    refs.mkdir()
    for level in REFERENCE_LEVELS:
        cv2.imwrite(str(refs / f"ref-{level}.png"), np.full((40, 48, 3), level, np.uint8))
    (tmp_path / "inbox").mkdir()
    config = tmp_path / "config.toml"
    config.write_text(f"""
[model]
name = "{TOY}"
image_size = {SIZE}
false_reject_rate = 0.2
[runtime]
device = "cpu"
engine = "onnxruntime"
max_batch_size = 4
max_batch_delay_ms = 10
[[sources]]
id = "inbox"
kind = "folder"
uri = "inbox"
references = "refs"
threshold = 0.99
settle_s = 0.05
poll_interval_s = 0.05
[retraining]
promotion = "auto"
rule = "always"
epochs = 2
batch_size = 4
learning_rate = 0.5
synthetic = "off"
timeout_s = 300
[mqtt]
enabled = false
[api]
enabled = false
[database]
url = "sqlite:///var/anomalyd.db"
[storage]
dir = "var/artifacts"
""")
    return config


def _drop(tmp_path: Path, frames: Mapping[str, int]) -> None:
    for name, level in frames.items():
        cv2.imwrite(str(tmp_path / "inbox" / name), np.full((40, 48, 3), level, np.uint8))


def test_a_toy_family_gets_references_calibration_export_and_retraining_through_the_daemon(tmp_path):
    assert get_family(TOY).module == __name__  # where a training process finds it
    settings = load_config(_config(tmp_path), environ={})
    refs = sorted((tmp_path / "refs").iterdir())
    service = Service(settings)
    service.start()
    try:
        # References: the source's detector is the toy on a bank of its reference files, exported and run by
        # ONNX Runtime after the parity gate.
        assert wait_until(lambda: service.references.status()["inbox"]["ready"], 60), service.references.status()
        detector = service.references.states["inbox"].detector
        expected_bank = float(_images(refs).mean())
        assert float(detector.bank) == pytest.approx(expected_bank, abs=1e-6)
        assert type(detector.base).__name__ == "ExportedDetector" and detector.engine == "onnxruntime"
        manifest = json.loads((detector.folder / "manifest.json").read_text())
        assert manifest["model"] == TOY and manifest["version"] == detector.version
        assert all(manifest["parity"]["max_abs_diff"][k] <= DEFAULT_TOLERANCE[k] for k in ("scores", "maps"))

        # Calibration: from the family's known-good hook (leave-one-out on the references), recorded.
        torch_toy = create_toy(device=torch.device("cpu"), dtype=torch.float32, references=refs)
        known = toy_known_good(torch_toy, refs, 8)
        expected = calibrated_bounds(known.scores, known.maxima, 0.2, what="toy")[0].value
        with service.sessions() as session:
            change = session.scalars(select(ThresholdChange).where(ThresholdChange.source == "inbox")).first()
        assert change is not None and change.model_version == detector.version
        assert change.threshold == pytest.approx(expected, abs=1e-6) and change.threshold != 0.99
        assert "leave-one-out on 4 references" in (change.rule or "") and asked_versions == [detector.version]

        frames = {f"dark-{i}.png": 40 + 5 * i for i in range(4)} | {f"bright-{i}.png": 230 + 5 * i for i in range(4)}
        _drop(tmp_path, frames)
        assert wait_until(lambda: service.pipeline.processed >= len(frames), 60), service.pipeline.processed
        with service.sessions() as session:
            rows = {Path(r.frame_name).name: r for r in session.scalars(select(Inspection))}
            for name, row in rows.items():
                score = torch_toy.predict(_images([tmp_path / "inbox" / "processed" / name])).scores[0]
                assert row.score == pytest.approx(float(score), abs=1e-4) and row.model_version == detector.version
        with service.sessions() as session, session.begin():  # the operator labels them: bright frames are defects
            for name, row in rows.items():
                add_label(session, row.id, "anomalous" if name.startswith("bright") else "normal")

        # Retraining: the daemon's retraining path trains the toy in its own process, registers and promotes the
        # candidate; the watcher swaps it in and the source's detector is rebuilt on its references and calibrated.
        outcome = make_retrainer(settings, service.sessions).run(trigger="test")
        assert outcome.status == "succeeded" and outcome.promoted, outcome.reason
        with service.sessions() as session:
            version = session.scalars(select(ModelVersion).where(ModelVersion.version == outcome.candidate_version)
                                      ).one()
            run = session.scalars(select(TrainingRun)).one()
        assert version.kind == TOY and version.status == "active" and run.status == "succeeded"
        assert "epoch 2/2" in run.log
        assert version.metrics["holdout"]["toy_frames"] >= 1  # measured by the family's `promotion_metrics` hook
        assert "image_auroc" in version.metrics["holdout"]
        trained = load_file(version.prompts_path)
        assert float(trained["gain"]) > 2.0  # brighter than the bank is anomalous: the labels raise the gain
        assert wait_until(lambda: (service.references.states["inbox"].detector is not None
                                   and service.references.states["inbox"].detector.version != detector.version), 60)
        swapped = service.references.states["inbox"].detector
        assert swapped.version.startswith(f"{TOY}-{file_digest(version.prompts_path)}")

        def recalibrated() -> ThresholdChange | None:
            with service.sessions() as session:
                return session.scalars(select(ThresholdChange).where(
                    ThresholdChange.model_version == swapped.version)).first()

        assert wait_until(lambda: recalibrated() is not None, 30), _changes(service)
        assert type(swapped.base).__name__ == "ExportedDetector"  # the new version exported through the gate too
        trained_toy = create_toy(device=torch.device("cpu"), dtype=torch.float32, references=refs,
                                 prompts=version.prompts_path)
        known = toy_known_good(trained_toy, refs, 8)
        # its known-good frames now include the frames labelled normal (daemon/references/manager.py)
        normals = trained_toy.predict(_images([tmp_path / "inbox" / "processed" / n for n in frames
                                               if n.startswith("dark")]))
        expected = calibrated_bounds(known.scores + normals.scores.tolist(),
                                     known.maxima + normals.maps.flatten(1).amax(1).tolist(), 0.2, what="toy")[0]
        assert recalibrated().threshold == pytest.approx(expected.value, abs=1e-4), _changes(service)
        assert "leave-one-out on 4 references" in recalibrated().rule and "4 labelled normals" in recalibrated().rule
        assert asked_versions == [detector.version, swapped.version]

        _drop(tmp_path, {"late.png": 200})  # inspected by the promoted version
        assert wait_until(lambda: service.pipeline.processed >= len(frames) + 1, 60)
        with service.sessions() as session:
            late = session.scalars(select(Inspection).where(Inspection.frame_name.like("%late.png"))).one()
        score = trained_toy.predict(_images([tmp_path / "inbox" / "processed" / "late.png"])).scores[0]
        assert late.model_version == swapped.version and late.score == pytest.approx(float(score), abs=1e-4)
    finally:
        service.stop()


def _changes(service: Service) -> list[tuple]:
    with service.sessions() as session:
        return [(c.model_version, c.action, c.threshold, c.rule) for c in session.scalars(select(ThresholdChange))]
