"""End to end on real weights: a source with `resize = "fit"` on real non-square frames (magnetic_tile from
../shared, linked, never copied: its frames have hundreds of different sizes and aspect ratios) retrains a
patchcore-head on its own geometry. Labels arrive through the HTTP API (defects with masks and without, good frames
labelled normal); the retraining job trains and judges on the frames cut as the daemon cuts them (each frame's own
shape, the masks cut the same way); the head is promoted (rule "always": see _settings) after both models were
judged on the same held-out frames at their calibrated thresholds (in most runs it misses far fewer); it is built
for the source with that geometry, and its inspections come back through it with maps in the frame's own pixels.
`tile` and `auto` with a head are accepted (the head's tiles: tests/model/test_supervised_tile.py)."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import select

from adapters.db import Inspection
from daemon.config.settings import load_config
from daemon.process.service import Service
from tests.daemon.test_e2e_head_retraining import label_through_api, retrain_through_api
from tests.waiting import wait_until

pytestmark = [pytest.mark.shared]

ADMIN = "e2e-admin-token"
SOURCE = "tiles"
SIZE = 128  # the short side of each frame's input: the test runs in about a minute on two busy cores
N_DEFECTIVE = 40


def _wide(files: list[Path]) -> list[Path]:
    """Frames clearly not square (aspect 1.3 or more), the ones a squash would stretch."""
    out = []
    for file in files:
        width, height = Image.open(file).size
        if max(width, height) >= 1.3 * min(width, height):
            out.append(file)
    return out


def _tiles(samples_dir: Path) -> tuple[list[Path], list[Path], Path]:
    root = samples_dir / "magnetic_tile"
    good = _wide(sorted((root / "test" / "good").glob("*.jpg")))
    defective = _wide(sorted(p for kind in sorted((root / "test").iterdir()) if kind.name != "good"
                             for p in kind.glob("*.jpg")))
    rng = random.Random(20)
    rng.shuffle(good)
    rng.shuffle(defective)
    return good, defective, root / "ground_truth"


def _link(files: list[Path], folder: Path, prefix: str = "") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for file in files:
        (folder / f"{prefix}{file.name}").symlink_to(file.resolve())


def _settings(tmp_path: Path, resize: str = "fit", **model):
    return load_config(None, environ={}, overrides={
        "model": {"name": "patchcore", "references": str(tmp_path / "references"), "image_size": SIZE, **model},
        "runtime": {"device": "cpu", "max_batch_delay_ms": 20, "shutdown_grace_s": 20, "max_batch_size": 8},
        "sources": [{"id": SOURCE, "kind": "folder", "uri": str(tmp_path / "inbox"), "settle_s": 0.05,
                     "poll_interval_s": 0.05, "resize": resize}],
        # rule "always": the held-out split follows the inspections' random uuids, and on a few held-out frames of
        # a hard category the strict gate passed 5 runs of 7 (it refused on one extra false alarm or AUROC); what
        # the gate proves on real labels is tests/daemon/test_e2e_head_retraining.py's, here the geometry, and the
        # operating point measured through it is asserted below
        "retraining": {"promotion": "auto", "rule": "always", "holdout_fraction": 0.3, "threads": 1, "seed": 3},
        "mqtt": {"enabled": False}, "database": {"url": f"sqlite:///{tmp_path}/anomalyd.db"},
        "storage": {"dir": str(tmp_path / "artifacts")},
        "api": {"enabled": False, "tokens": [{"name": "admin", "role": "admin", "token": ADMIN}]},
    })


# auto: at 128 px, the frames of 2:1 and 256 px or more are tiles of their short side, the others squashed
@pytest.mark.parametrize("resize", ["fit", "auto"])
def test_fit_source_retrains_and_runs_a_head_on_its_own_geometry(samples_dir, tmp_path, resize):
    from daemon.api import routers
    from daemon.api.app import create_app
    from model.supervised.detector import HeadCheckpoint

    good, defective, masks = _tiles(samples_dir)
    references, normals, fresh_good = good[:8], good[8:18], good[18:22]  # held-out normals judge the gate
    _link(references, tmp_path / "references")
    (tmp_path / "inbox").mkdir()
    service = Service(_settings(tmp_path, resize), serve_http=False)
    started = time.monotonic()
    service.start()
    try:
        first_version = service.references.states[SOURCE].version
        assert first_version.startswith("patchcore-") and f"-{resize}" in first_version, first_version
        _link(normals + defective[:N_DEFECTIVE], tmp_path / "inbox")

        def rows() -> dict[str, Inspection]:
            with service.sessions() as session:
                return {Path(r.frame_name).name: r for r in session.scalars(select(Inspection))}

        first = len(normals) + N_DEFECTIVE
        assert wait_until(lambda: len(rows()) == first, timeout=180), f"{len(rows())} of {first} inspected"
        before = rows()
        client = TestClient(create_app(service.app_state(), routers()))
        headers = {"Authorization": f"Bearer {ADMIN}"}
        # the dataset's masks are in the frames' own pixels
        label_through_api(client, headers, before, defective[:N_DEFECTIVE], normals,
                          lambda frame: masks / frame.parent.name / f"{frame.stem}_mask.png")

        run, candidate = retrain_through_api(client, headers, service)
        point = candidate.metrics["operating_point"]
        print(f"held-out operating point: candidate {point['candidate']}, active {point['active']}")
        assert candidate.kind == "patchcore-head" and run.promoted and candidate.status == "active", run.log
        # the job trained and judged the source on its own geometry
        job = json.loads((tmp_path / "artifacts" / "models" / "runs" / str(run.id) / "job.json").read_text())
        assert job["geometry"][SOURCE]["resize"] == resize
        # judged through it, both models at their own calibrated thresholds for the source, on the same held-out
        # defects and normals. Who wins is not asserted: the split follows the inspections' random uuids and holds
        # 2-17 defects (measured in 11 runs, the head missed 1/11, 5/15, 4/8, 6/15, 3/7, 3/5, 1/2, 16/17, 8/11, 9/9
        # and 12/12 where PatchCore missed 11, 15, 8, 15, 7, 5, 2, 16, 10, 9 and 11), which is why this test's rule
        # is "always"; the gain on a fixed split is measured in docs/models.md
        candidate_point, active_point = point["candidate"], point["active"]
        assert candidate_point["defects"] == active_point["defects"] >= 2
        assert candidate_point["normals"] == active_point["normals"]
        assert set(candidate_point["thresholds"]) == set(active_point["thresholds"]) == {SOURCE}
        assert 0.5 <= candidate_point["thresholds"][SOURCE] < 1.0  # the head's threshold floor is its boundary
        assert 0 <= candidate_point["missed"] <= candidate_point["defects"]
        # trained on the source's geometry: the checkpoint says so, and a squash detector would refuse it
        assert HeadCheckpoint.load(candidate.prompts_path).metadata["geometry"].split("-")[0] == resize

        # hot swap: the source's head is built with the source's geometry (its version carries its tag)
        assert wait_until(lambda: str(service.references.states[SOURCE].version).startswith("patchcore-head-"),
                          timeout=120)
        head_version = service.references.states[SOURCE].version
        assert f"-{resize}" in head_version, head_version
        fresh = defective[N_DEFECTIVE:N_DEFECTIVE + 4] + fresh_good
        _link(fresh, tmp_path / "inbox", prefix="again-")
        assert wait_until(lambda: len(rows()) == first + len(fresh), timeout=120)
        after = rows()
        artifacts = tmp_path / "artifacts"
        for frame in fresh:
            row = after[f"again-{frame.name}"]
            width, height = Image.open(frame).size
            assert row.model_version == head_version and (row.width, row.height) == (width, height)
            assert Image.open(artifacts / row.heatmap_path).size == (width, height)  # the map in frame pixels
            assert 0.0 <= row.score <= 1.0
        scores = {name: round(r.score, 3) for name, r in after.items() if name.startswith("again-")}
        print(f"head on {resize}: {scores}; {time.monotonic() - started:.0f} s")
    finally:
        service.stop()


@pytest.mark.parametrize("resize", ["tile", "auto"])  # auto tiles long frames
def test_tile_with_a_head_is_accepted(resize: str):
    """A head labels tiles itself (model/supervised/frames.py), so tile and auto run with it, and with a PatchCore
    daemon whose retraining trains one."""
    assert load_config(None, environ={}, overrides={"model": {"name": "patchcore-head", "resize": resize}})
    assert load_config(None, environ={}, overrides={
        "model": {"name": "patchcore"}, "retraining": {"enabled": True},
        "sources": [{"id": "a", "kind": "folder", "uri": "/tmp/x", "resize": resize}]})
    # fit is accepted for the head
    assert load_config(None, environ={}, overrides={"model": {"name": "patchcore-head", "resize": "fit"}})
