"""The daemon on an exported engine, end to end: `[runtime].engine = "onnxruntime"` exports the configured model
through the parity gate at start, scores a folder source with it (rows equal PyTorch's scores within the
tolerance), and a hot swap exports and checks the new version before it scores anything."""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from sqlalchemy import select

from adapters.db import Inspection
from adapters.export import ExportedDetector, read_manifest
from daemon.config.settings import load_config
from daemon.learning import versions as registry
from daemon.process.service import Service, build_detector
from model.preprocess import fast_transform
from tests.daemon.test_models import _perturbed_prompts
from tests.daemon.test_retraining import small_rgb
from tests.waiting import wait_until

pytestmark = pytest.mark.shared

SIZE = 56


def write_config(tmp_path: Path, golden_dir: Path, engine: str) -> Path:
    config = tmp_path / "config.toml"
    config.write_text(f"""
[model]
backbone = "{golden_dir / 'tiny_clip_openai_fp16.safetensors'}"
backbone_config = "{golden_dir / 'tiny-clip-24L.json'}"
prompts = "{golden_dir / 'prompts_official_format.pth'}"
image_size = {SIZE}
[runtime]
device = "cpu"
engine = "{engine}"
max_batch_size = 4
max_batch_delay_ms = 5
[[sources]]
id = "inbox"
kind = "folder"
uri = "inbox"
line = "l1"
threshold = 0.5
settle_s = 0.02
poll_interval_s = 0.02
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


def test_daemon_runs_on_onnxruntime_and_hot_swaps_a_checked_export(tmp_path, golden_dir, samples_dir):
    settings = load_config(write_config(tmp_path, golden_dir, "onnxruntime"), environ={})
    files = sorted((samples_dir / "hazelnut" / "test" / "good").glob("*.*"))[:4]
    images = [small_rgb(p, 96) for p in files]
    service = Service(settings)
    service.start()

    def feed(prefix: str) -> list[str]:
        names = []
        for index, rgb in enumerate(images):
            name = f"{prefix}_{index}.png"
            cv2.imwrite(str(tmp_path / "inbox" / f".{name}"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
            (tmp_path / "inbox" / f".{name}").rename(tmp_path / "inbox" / name)
            names.append(name)
        return names

    def rows() -> list[Inspection]:
        with service.sessions() as session:
            return list(session.scalars(select(Inspection).order_by(Inspection.id)))

    try:
        detector = getattr(service.pipeline.detector, "raw", service.pipeline.detector)  # under the daemon's routing
        assert isinstance(detector, ExportedDetector) and detector.engine == "onnxruntime"
        exported = tmp_path / "var" / "artifacts" / "exports"
        manifest = read_manifest(next(exported.iterdir()))
        assert manifest["version"] == detector.version and manifest["parity"]["engine"] == "onnxruntime"
        first = feed("a")
        assert wait_until(lambda: len(rows()) >= len(first), 60), f"{len(rows())} rows"
        initial = detector.version

        with service.sessions() as session, session.begin():
            registry.register_version(session, version="v2-test", kind="anomalyclip",
                                      prompts_path=_perturbed_prompts(settings, golden_dir, "v2-test"))
        registry.activate_version(service.sessions, "v2-test")
        assert wait_until(lambda: service.pipeline.detector.version == "v2-test", 120)
        swapped = getattr(service.pipeline.detector, "raw", service.pipeline.detector)
        assert isinstance(swapped, ExportedDetector)
        assert read_manifest(swapped.folder)["parity"]["max_abs_diff"]["maps"] <= 1e-4
        time.sleep(0.2)
        second = feed("b")
        assert wait_until(lambda: len(rows()) >= len(first) + len(second), 60)
    finally:
        service.stop()

    assert service.pipeline.failed == 0
    by_name = {Path(r.frame_name).name: r for r in rows()}
    assert sorted(by_name) == sorted(first + second)
    assert {by_name[n].model_version for n in first} == {initial}
    assert {by_name[n].model_version for n in second} == {"v2-test"}
    # the engine's rows are PyTorch's scores (same frames through the torch detector)
    torch_detector = build_detector(settings)
    batch = torch.stack([fast_transform(rgb, SIZE) for rgb in images])
    expected = torch_detector.predict(batch).scores.numpy()
    found = np.array([by_name[n].score for n in first])
    np.testing.assert_allclose(found, expected, atol=1e-3, rtol=0)
    # ...and the swapped-in version is really another model
    assert any(abs(by_name[a].score - by_name[b].score) > 1e-6 for a, b in zip(first, second, strict=True))
