"""A model family registered from inside the test (no project file names it) works everywhere a built-in one does:
`create_detector`, the config's model list, the CLI's --model choices, training through the registry's training
spec, and the daemon end to end (folder source → SQLite rows carrying the toy model's scores and version)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
from sqlalchemy import select
from torch import nn

from adapters.db import Inspection, make_engine, make_session_factory
from daemon.config.settings import load_config
from daemon.process.service import Service
from model import create_detector, get_family, list_models
from model.detector import TorchDetector
from model.factory import (
    Capabilities,
    CheckpointFormat,
    ModelFamily,
    TrainingSpec,
    needs_references,
    register_family,
    unregister_model,
)
from model.training import StepLoss, TrainingConfig, train_prompts
from tests.waiting import wait_until

TOY = "toy-brightness"
IMAGE_SIZE = 32


class BrightnessModule(nn.Module):
    """Score = sigmoid(gain * mean pixel + bias); map = per-pixel channel mean. `gain`, `bias` are learned."""

    def __init__(self, image_size: int = IMAGE_SIZE) -> None:
        super().__init__()
        self.image_size = image_size
        self.gain = nn.Parameter(torch.tensor(1.0))
        self.bias = nn.Parameter(torch.tensor(0.0))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.gain * images.mean(dim=(1, 2, 3)) + self.bias)

    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self(images), images.mean(dim=1)


class BrightnessDetector(TorchDetector):
    name = TOY


def create_toy(*, device: torch.device, dtype: torch.dtype, image_size: int = IMAGE_SIZE,
               prompts: str | Path | None = None, **_: Any) -> BrightnessDetector:
    module = BrightnessModule(image_size)
    if prompts is not None:
        module.load_state_dict(torch.load(prompts, weights_only=True))
    return BrightnessDetector(module, device=device, dtype=dtype, version=f"{TOY}-{image_size}")


class ToyTarget:
    def __init__(self, model: BrightnessModule, config: TrainingConfig) -> None:
        self.model, self.config = model, config

    def optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.model.parameters(), lr=self.config.learning_rate)

    def loss(self, batch: Mapping[str, Any], device: torch.device) -> StepLoss:
        scores = self.model(batch["image"].to(device))
        loss = nn.functional.binary_cross_entropy(scores, batch["label"].float().to(device))
        return StepLoss(loss, loss.item(), 0.0)

    def state(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state(self, state: Mapping[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)

    def save(self, output: Path, metadata: Mapping[str, Any]) -> None:
        torch.save(self.model.state_dict(), output)

    def finish_epoch(self) -> None:
        pass


def _save(model: nn.Module, path: str | Path, metadata: Mapping[str, Any]) -> Path:
    torch.save(model.state_dict(), path)
    return Path(path)


@pytest.fixture
def toy_family():
    family = register_family(ModelFamily(
        name=TOY, create=create_toy, summary="brightness as anomaly score (test family)",
        # no open_clip backbone: nothing for the daemon to look for in the weights cache
        capabilities=Capabilities(clip_backbone=False),
        checkpoint=CheckpointFormat(load=lambda p: torch.load(p, weights_only=True), save=_save),
        training=TrainingSpec(build=lambda backbone, weights, **_: BrightnessModule(), target=ToyTarget,
                              model_type=BrightnessModule, defaults={"epochs": 3, "learning_rate": 0.5}),
    ))
    yield family
    unregister_model(TOY)


def test_toy_family_through_create_detector_config_and_cli(toy_family, tmp_path):
    assert TOY in list_models() and get_family(TOY) is toy_family
    assert TOY in list_models(trainable=True)
    # The daemon asks the registry (not a name list) which models score only against references.
    assert not needs_references(TOY) and needs_references("patchcore") and not needs_references("no-such-model")
    detector = create_detector(TOY, device="cpu", image_size=IMAGE_SIZE, class_name="ignored")
    images = torch.stack([torch.full((3, IMAGE_SIZE, IMAGE_SIZE), v) for v in (-1.0, 0.0, 2.0)])
    prediction = detector.predict(images)
    expected = torch.sigmoid(torch.tensor([-1.0, 0.0, 2.0]))
    torch.testing.assert_close(prediction.scores, expected)
    assert prediction.maps.shape == (3, IMAGE_SIZE, IMAGE_SIZE) and prediction.maps.dtype == torch.float32
    assert detector.name == TOY and detector.version == f"{TOY}-{IMAGE_SIZE}"

    config = tmp_path / "config.toml"
    config.write_text(f'[model]\nname = "{TOY}"\n')
    assert load_config(config, environ={}).model.name == TOY
    config.write_text('[model]\nname = "no-such-model"\n')
    with pytest.raises(Exception, match="no-such-model"):
        load_config(config, environ={})

    from daemon.commands.model_commands import add_model_options

    parser = argparse.ArgumentParser()
    add_model_options(parser)
    assert parser.parse_args(["--model", TOY]).model == TOY
    assert parser.parse_args(["--model", "clip-ac"]).model == "clip-ac"
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "no-such-model"])


def test_toy_family_export_graph_comes_from_the_registry(toy_family):
    from types import SimpleNamespace

    from model.export import ExportError, export_graph, register_exporter

    detector = create_detector(TOY, device="cpu", image_size=IMAGE_SIZE)
    with pytest.raises(ExportError, match=rf"model '{TOY}' has no export graph \(exportable: .*anomalyclip"):
        export_graph(detector)
    asked = []

    @register_exporter(TOY)
    def toy_graph(built: Any, class_names: Any) -> Any:
        asked.append((built, list(class_names)))
        return SimpleNamespace(module=nn.Identity())

    assert get_family(TOY).exporter is toy_graph and get_family(TOY).trainable  # the rest of the family is kept
    graph = export_graph(detector, ["cube"])
    assert asked == [(detector, ["cube"])] and isinstance(graph.module, nn.Identity)


def test_toy_family_trains_through_the_registry(toy_family, tmp_path):
    config = TrainingConfig.for_model(TOY, batch_size=4)
    assert (config.epochs, config.learning_rate, config.batch_size) == (3, 0.5, 4)
    images = [torch.full((3, IMAGE_SIZE, IMAGE_SIZE), v) for v in (-1.0, -0.5, 0.5, 1.0)]
    labels = [0, 0, 1, 1]
    dataset = [{"image": image, "label": label, "mask": torch.zeros(IMAGE_SIZE, IMAGE_SIZE), "has_mask": False,
                "category": "toy", "path": f"{index}.png"}
               for index, (image, label) in enumerate(zip(images, labels, strict=True))]
    module = toy_family.training.build(None, None)
    before = float(module.gain)
    history = train_prompts(module, dataset, tmp_path / "toy.pt", config=config, progress=False)
    assert [h.epoch for h in history] == [1, 2, 3] and all(h.samples == 4 for h in history)
    assert float(module.gain) > before  # brighter → anomalous: the gain grows
    detector = create_detector(TOY, device="cpu", prompts=tmp_path / "toy.pt")
    assert float(detector.model.gain) == pytest.approx(float(module.gain))


def _write_daemon_config(tmp_path: Path) -> Path:
    config = tmp_path / "config.toml"
    config.write_text(f"""
[model]
name = "{TOY}"
image_size = {IMAGE_SIZE}
[runtime]
device = "cpu"
max_batch_size = 4
max_batch_delay_ms = 10
[[sources]]
id = "inbox"
kind = "folder"
uri = "inbox"
line = "line1"
threshold = 0.6
settle_s = 0.05
poll_interval_s = 0.05
[mqtt]
enabled = false
[api]
enabled = false
[database]
url = "sqlite:///var/anomalyd.db"
[storage]
dir = "var/artifacts"
""")
    (tmp_path / "inbox").mkdir()
    return config


def test_daemon_runs_a_toy_family_end_to_end(toy_family, tmp_path):
    config = _write_daemon_config(tmp_path)
    levels = {"dark.png": 10, "grey.png": 128, "bright.png": 250}
    for name, level in levels.items():
        cv2.imwrite(str(tmp_path / "inbox" / name), np.full((40, 48, 3), level, np.uint8))
    settings = load_config(config, environ={})
    service = Service(settings)
    service.start()
    try:
        assert service.pipeline.detector.name == TOY
        assert wait_until(lambda: service.pipeline.processed >= len(levels), 60), service.pipeline.processed
    finally:
        service.stop()
    # What the toy model scores on each frame, computed here through the same preprocessing as the daemon's.
    from model.preprocess import decode_image, fast_transform

    reference = create_detector(TOY, device="cpu", image_size=IMAGE_SIZE)
    expected = {name: float(reference.predict(fast_transform(decode_image(tmp_path / "inbox" / "processed" / name),
                                                              IMAGE_SIZE)[None]).scores[0])
                for name in levels}
    engine = make_engine(f"sqlite:///{tmp_path}/var/anomalyd.db")
    with make_session_factory(engine)() as session:
        rows = {Path(row.frame_name).name: row for row in session.scalars(select(Inspection))}
    engine.dispose()
    assert set(rows) == set(levels)
    for name, row in rows.items():
        assert row.model_version == f"{TOY}-{IMAGE_SIZE}"
        assert row.score == pytest.approx(expected[name], abs=1e-5)
        assert row.is_anomalous == (row.score >= 0.6)
    assert rows["dark.png"].score < rows["grey.png"].score < rows["bright.png"].score
    assert rows["bright.png"].is_anomalous and not rows["dark.png"].is_anomalous

