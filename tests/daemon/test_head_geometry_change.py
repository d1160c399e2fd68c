"""An operator changes the resize of a source whose active version is a patchcore-head trained on another resize
mode (issue 21): the head does not fit the new geometry, and the source must not stop. It goes on with the family's
base model (the untrained head, which ranks like PatchCore) on its references, recalibrated as its own version, says
why in its reference state (API and UI), and its frames are inspected. Real EfficientNet-Lite0 weights, metal_plate
frames from ../shared, 64 px, a head trained on squashed frames (tests/model/test_supervised_export.py)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from sqlalchemy import select

from adapters.db import Inspection, TrainingRun
from daemon.config.settings import load_config
from daemon.learning.versions import activate_version, register_version
from daemon.process.service import Service
from daemon.references.geometry_overrides import save_override
from tests.daemon.test_engine_head_daemon import _link
from tests.model.test_supervised_export import SIZE, plate_files, trained_head
from tests.waiting import wait_until

pytestmark = [pytest.mark.shared]

SOURCE = "plates"


def test_a_resize_change_the_active_head_does_not_fit_keeps_the_source_inspecting(samples_dir, tmp_path):
    good, defective, _ = plate_files(samples_dir)
    held = good[10:]
    random.Random(7).shuffle(held)
    references, frames = held[:8], held[8:10] + defective[60:62]
    _link(references, tmp_path / "references")
    (tmp_path / "inbox").mkdir()
    settings = load_config(None, environ={}, overrides={
        "model": {"name": "patchcore", "references": str(tmp_path / "references"), "image_size": SIZE},
        "runtime": {"device": "cpu", "max_batch_delay_ms": 20, "shutdown_grace_s": 20, "max_batch_size": 4},
        "sources": [{"id": SOURCE, "kind": "folder", "uri": str(tmp_path / "inbox"), "line": "press",
                     "settle_s": 0.05, "poll_interval_s": 0.05}],
        "mqtt": {"enabled": False}, "database": {"url": f"sqlite:///{tmp_path}/anomalyd.db"},
        "storage": {"dir": str(tmp_path / "artifacts")}, "api": {"enabled": False},
        # the schedule's runs need 50 new labels: the only run here is the one the geometry change asks for
        "retraining": {"enabled": True, "schedule": "0 3 * * *"},
    })
    head_file = tmp_path / "versions" / "head.safetensors"
    head_file.parent.mkdir()
    trained_head(samples_dir).checkpoint.save(head_file)  # trained on squashed frames

    service = Service(settings, serve_http=False)
    service.start()
    try:
        with service.sessions() as session, session.begin():
            register_version(session, version="patchcore-head-r1", kind="patchcore-head", prompts_path=head_file)
        activate_version(service.sessions, "patchcore-head-r1")
        assert wait_until(lambda: str(service.references.states[SOURCE].version).startswith("patchcore-head-"),
                          timeout=180), service.references.states[SOURCE].as_dict()
        trained_version = service.references.states[SOURCE].version
        assert service.references.states[SOURCE].warning is None

        save_override(settings, SOURCE, {"resize": "fit"}, set_by="test")  # what the API / UI / CLI write
        service.references.wake()
        assert wait_until(lambda: "-s64-fit" in str(service.references.states[SOURCE].version), timeout=180), \
            service.references.states[SOURCE].as_dict()
        state = service.references.states[SOURCE].as_dict()
        assert state["error"] is None and state["ready"], state
        assert "trained on resize 'squash'" in state["warning"] and "until labels retrain" in state["warning"]
        assert state["version"] != trained_version and SOURCE not in service.references.unavailable
        ready, checks = service.readiness()
        assert ready, checks  # it inspects, so health says ready; the state says what it runs and why

        # [retraining] is on: the change asks for a run that learns weights for the new geometry at once. With no
        # labelled frames it is refused, with the reason, like any run (a labelled history trains the fit head).
        def geometry_runs() -> list[TrainingRun]:
            with service.sessions() as session:
                return [r for r in session.scalars(select(TrainingRun)) if (r.params or {}).get("trigger") == "geometry"]

        assert wait_until(lambda: [r.status for r in geometry_runs()] == ["failed"], timeout=120), \
            [(r.status, r.log) for r in geometry_runs()]
        assert "labelled defective frame(s)" in geometry_runs()[0].log, geometry_runs()[0].log

        _link(frames, tmp_path / "inbox")

        def rows() -> list[Inspection]:
            with service.sessions() as session:
                return list(session.scalars(select(Inspection)))

        assert wait_until(lambda: len(rows()) == len(frames), timeout=120), f"{len(rows())} of {len(frames)}"
    finally:
        service.stop()
    assert {r.model_version for r in rows()} == {state["version"]}
    assert all(r.score is not None for r in rows())
    assert Path(rows()[0].frame_name).name in {f.name for f in frames}
