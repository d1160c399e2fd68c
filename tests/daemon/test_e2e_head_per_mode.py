"""End to end on real weights: two sources run different resize modes (`squash` and `fit`), labels for both come
through the HTTP API, and one retraining run trains one patchcore-head per mode (a head fits only the inputs it was
trained on). The candidate version's one weights file holds both heads; the gate judges it on both sources' held-out
frames through their own geometry; promoted, each source's detector runs the head of its own mode (their head
digests differ), its rows carry that version. A mode with too few labelled defects learns no head: its sources keep
the base model (unit test of the grouping below), and only when no mode has enough is the run refused.
metal_plate frames from ../shared (linked, never copied), 64 px, a few frames: about a minute on two busy cores."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from adapters.db import Inspection
from daemon.config.settings import load_config
from daemon.learning.head_retraining import MIN_LABELLED_DEFECTS, HeadTrainingSet
from daemon.learning.training_set import LabelledFrame, RetrainError
from daemon.process.service import Service
from tests.daemon.test_e2e_head_retraining import _link, _plates, label_through_api, retrain_through_api
from tests.waiting import wait_until

ADMIN = "e2e-admin-token"
SIZE = 64
MODES = {"squashed": "squash", "fitted": "fit"}  # source id → its resize


def _settings(tmp_path: Path):
    return load_config(None, environ={}, overrides={
        "model": {"name": "patchcore", "references": str(tmp_path / "references"), "image_size": SIZE},
        "runtime": {"device": "cpu", "max_batch_delay_ms": 20, "shutdown_grace_s": 20, "max_batch_size": 8},
        "sources": [{"id": source, "kind": "folder", "uri": str(tmp_path / source), "settle_s": 0.05,
                     "poll_interval_s": 0.05, "resize": resize} for source, resize in MODES.items()],
        # rule "always": what the gate proves on real labels is tests/daemon/test_e2e_head_retraining.py's; here
        # that it judges both sources, each through its own geometry and head
        "retraining": {"promotion": "auto", "rule": "always", "holdout_fraction": 0.3, "threads": 1, "seed": 3},
        "mqtt": {"enabled": False}, "database": {"url": f"sqlite:///{tmp_path}/anomalyd.db"},
        "storage": {"dir": str(tmp_path / "artifacts")},
        "api": {"enabled": False, "tokens": [{"name": "admin", "role": "admin", "token": ADMIN}]},
    })


@pytest.mark.shared
def test_sources_of_two_resize_modes_get_one_head_each_from_one_run(samples_dir, tmp_path):
    from daemon.api import routers
    from daemon.api.app import create_app
    from model.supervised.head_set import load_heads

    good, defective, masks = _plates(samples_dir)
    _link(good[:6], tmp_path / "references")
    frames = {"squashed": (defective[0:6], good[6:8]), "fitted": (defective[6:12], good[8:10])}
    for source in MODES:
        (tmp_path / source).mkdir()
    service = Service(_settings(tmp_path), serve_http=False)
    started = time.monotonic()
    service.start()
    try:
        for source, (bad, normal) in frames.items():
            _link(bad + normal, tmp_path / source)

        def rows() -> dict[str, Inspection]:
            with service.sessions() as session:
                return {Path(r.frame_name).name: r for r in session.scalars(select(Inspection))}

        first = sum(len(b) + len(n) for b, n in frames.values())
        assert wait_until(lambda: len(rows()) == first, timeout=180), f"{len(rows())} of {first} inspected"
        before = rows()
        client = TestClient(create_app(service.app_state(), routers()))
        headers = {"Authorization": f"Bearer {ADMIN}"}
        for bad, normal in frames.values():
            label_through_api(client, headers, before, bad, normal, lambda frame: masks / f"{frame.stem}_mask.png")

        run, candidate = retrain_through_api(client, headers, service)
        assert candidate.kind == "patchcore-head" and run.promoted and candidate.status == "active", run.log
        assert "one set of weights per mode (fit: fitted; squash: squashed)" in run.log
        # the job trained and judged each source on its own geometry, held-out frames of both
        job = json.loads((tmp_path / "artifacts" / "models" / "runs" / str(run.id) / "job.json").read_text())
        assert {s: g["resize"] for s, g in job["geometry"].items()} == MODES
        assert {i["category"] for i in job["holdout"]} == set(MODES) == {i["category"] for i in job["train"]}
        point = candidate.metrics["operating_point"]["candidate"]
        assert set(point["thresholds"]) == set(MODES) and point["defects"] >= 2
        # one weights file, one head per mode
        heads = load_heads(candidate.prompts_path)
        assert heads.modes == ["fit", "squash"]
        digests = {source: heads.for_resize(mode).digest() for source, mode in MODES.items()}
        assert digests["squashed"] != digests["fitted"]
        assert {m: heads.for_resize(m).metadata["geometry"] for m in heads.modes} == {"fit": "fit",
                                                                                      "squash": "squash"}

        # promoted: every source runs the head of its own mode, with no warning
        def on_heads() -> bool:
            return all(str(service.references.states[s].version).startswith("patchcore-head-") for s in MODES)

        assert wait_until(on_heads, timeout=120), {s: service.references.states[s].as_dict() for s in MODES}
        versions = {s: str(service.references.states[s].version) for s in MODES}
        for source in MODES:
            assert f"-h{digests[source]}-" in versions[source], versions
            assert service.references.states[source].warning is None
        assert "-fit" in versions["fitted"] and "-fit" not in versions["squashed"]

        fresh = {"squashed": defective[12:14], "fitted": defective[14:16]}
        for source, files in fresh.items():
            _link(files, tmp_path / source, prefix="again-")
        second = first + sum(len(f) for f in fresh.values())
        assert wait_until(lambda: len(rows()) == second, timeout=120), f"{len(rows())} of {second} inspected"
        after = rows()
        for source, files in fresh.items():
            for frame in files:
                row = after[f"again-{frame.name}"]
                assert row.source == source and row.model_version == versions[source]
                assert 0.0 <= row.score <= 1.0
        print(f"per-mode heads {versions}; {time.monotonic() - started:.0f} s")
    finally:
        service.stop()


def _frames(source: str, defects: int, normals: int, start: int) -> list[LabelledFrame]:
    return [LabelledFrame(inspection_id=start + i, uuid=f"{source}-{i}", frame=Path(f"/x/{source}-{i}.png"),
                          label=int(i < defects), mask=None, category=source) for i in range(defects + normals)]


def test_a_mode_with_too_few_defects_keeps_the_base_model_and_none_enough_is_refused():
    geometries = {"a": {"resize": "squash"}, "b": {"resize": "fit"}, "c": {"resize": "fit"}}
    frames = _frames("a", MIN_LABELLED_DEFECTS, 2, 0) + _frames("b", 1, 2, 100) + _frames("c", 1, 1, 200)
    notes: list[str] = []
    kept, modes = HeadTrainingSet._by_mode(frames, geometries, "patchcore-head", notes.append)
    assert modes == {"squash": ["a"]} and {f.category for f in kept} == {"a"} and len(kept) == 6
    assert notes == [f"resize fit: 2 labelled defective frame(s) of sources b, c, a patchcore-head needs at least "
                     f"{MIN_LABELLED_DEFECTS}: no weights are learned for this mode, its sources keep the base model"]
    with pytest.raises(RetrainError, match=r"resize fit \(sources b, c\): 2; resize squash \(sources a\): 1"):
        HeadTrainingSet._by_mode(_frames("a", 1, 2, 0) + frames[6:], geometries, "patchcore-head", notes.append)
    # a family that takes squashed frames only (no geometries): one mode, as before
    kept, modes = HeadTrainingSet._by_mode(frames, {}, "patchcore-head", notes.append)
    assert modes == {"squash": ["a", "b", "c"]} and len(kept) == len(frames)
