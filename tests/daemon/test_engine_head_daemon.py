"""A promoted patchcore-head on `[runtime].engine = "onnxruntime"`: the daemon runs PatchCore (real EfficientNet-Lite0
weights, 8 metal_plate references from ../shared, linked, 64 px) exported per source; a head trained on other
metal_plate frames is registered and activated (what the promotion gate does), the model watcher hot-swaps it in,
and the source's detector is the head exported with the source's bank through the parity gate, run by ONNX Runtime.
Its rows carry the head's version and the scores the PyTorch head gives the same frames."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
import torch
from sqlalchemy import select

from adapters.db import Inspection
from adapters.export import ExportedDetector, read_manifest
from daemon.config.settings import load_config
from daemon.learning.versions import activate_version, register_version
from daemon.process.service import Service
from model import create_detector
from model.preprocess import decode_image, fast_transform
from tests.model.test_supervised_export import SIZE, plate_files, trained_head
from tests.waiting import wait_until

pytestmark = [pytest.mark.shared]

SOURCE = "plates"


def _link(files: list[Path], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for file in files:
        (folder / file.name).symlink_to(file.resolve())


def test_a_promoted_head_runs_exported_per_source_on_onnxruntime(samples_dir, tmp_path):
    good, defective, _ = plate_files(samples_dir)
    rng = random.Random(5)
    held = good[10:]  # good[:10] trained the head (tests/model/test_supervised_export.py trains on good[:6])
    rng.shuffle(held)
    references, frames = held[:8], held[8:11] + defective[50:53]
    _link(references, tmp_path / "references")
    (tmp_path / "inbox").mkdir()
    settings = load_config(None, environ={}, overrides={
        "model": {"name": "patchcore", "references": str(tmp_path / "references"), "image_size": SIZE},
        "runtime": {"device": "cpu", "engine": "onnxruntime", "max_batch_delay_ms": 20, "shutdown_grace_s": 20,
                    "max_batch_size": 4},
        "sources": [{"id": SOURCE, "kind": "folder", "uri": str(tmp_path / "inbox"), "line": "press",
                     "settle_s": 0.05, "poll_interval_s": 0.05}],
        "mqtt": {"enabled": False}, "database": {"url": f"sqlite:///{tmp_path}/anomalyd.db"},
        "storage": {"dir": str(tmp_path / "artifacts")}, "api": {"enabled": False},
    })
    head_file = tmp_path / "versions" / "head.safetensors"
    head_file.parent.mkdir()
    trained_head(samples_dir).checkpoint.save(head_file)

    service = Service(settings, serve_http=False)
    service.start()
    try:
        state = service.references.states[SOURCE]
        assert state.version.startswith("patchcore-") and isinstance(state.detector.base, ExportedDetector)
        with service.sessions() as session, session.begin():
            register_version(session, version="patchcore-head-r1", kind="patchcore-head", prompts_path=head_file)
        activate_version(service.sessions, "patchcore-head-r1")  # what a promotion does
        assert wait_until(lambda: str(service.references.states[SOURCE].version).startswith("patchcore-head-"),
                          timeout=180), service.references.states[SOURCE].as_dict()
        state = service.references.states[SOURCE]
        exported = state.detector.base
        assert isinstance(exported, ExportedDetector) and exported.engine == "onnxruntime"
        assert exported.name == "patchcore-head" and exported.version == state.version
        folders = list((tmp_path / "artifacts" / "exports").glob("patchcore-head-*-onnx"))
        assert len(folders) == 1
        manifest = read_manifest(folders[0])
        assert manifest["details"]["n_references"] == 8 and manifest["details"]["trained"]
        assert all(manifest["parity"]["max_abs_diff"][k] <= 1e-4 for k in ("scores", "maps"))
        assert state.detector.known_good is not None  # calibrated from the PyTorch head's known-good scores

        started = time.monotonic()
        _link(frames, tmp_path / "inbox")

        def rows() -> dict[str, Inspection]:
            with service.sessions() as session:
                return {Path(r.frame_name).name: r for r in session.scalars(select(Inspection))}

        assert wait_until(lambda: len(rows()) == len(frames), timeout=120), f"{len(rows())} of {len(frames)}"
        found = rows()
        print(f"{len(frames)} frames on the exported head in {time.monotonic() - started:.1f} s")
    finally:
        service.stop()
    assert all(r.model_version == state.version for r in found.values())
    # the PyTorch head on the same bank and frames: the daemon's rows hold its scores (unit scale: unchanged)
    torch_head = create_detector("patchcore-head", head=head_file, references=[str(f) for f in references],
                                 image_size=SIZE, device="cpu")
    expected = torch_head.predict(torch.stack([fast_transform(decode_image(f), SIZE) for f in frames])).scores
    for frame, score in zip(frames, expected.tolist(), strict=True):
        assert found[frame.name].score == pytest.approx(score, abs=1e-4), frame.name
