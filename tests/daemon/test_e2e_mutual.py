"""End to end on real data and real weights: a source with `references = "auto"` and no references starts
inspecting on its first frames with mutual scoring (each frame against a window of its own recent normal-looking
frames), alerts defects, proposes known-good frames (API and CLI), an operator approves them through the API and the
source switches to PatchCore on them (the new version on its inspections records the switch).
Frames: ../shared/data/inspection-samples/cubes (linked, never copied into the repo).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from adapters.db import Inspection
from daemon.config.settings import load_config
from daemon.process.service import Service
from tests.daemon.test_api import TOKENS, auth
from tests.waiting import wait_until

pytestmark = [pytest.mark.shared]

N_GOOD, N_DEFECTIVE = 24, 8


def _rows(service: Service) -> list[Inspection]:
    with service.sessions() as session:
        return list(session.scalars(select(Inspection).order_by(Inspection.id)))


def _link(files: list[Path], folder: Path, first: int) -> None:
    """Copied (into tmp_path) with modification times in the given order: the folder source reads the oldest first."""
    for index, file in enumerate(files, start=first):
        staged = folder.parent / f".{index:03d}-{file.name}"
        shutil.copyfile(file, staged)
        os.utime(staged, (1_700_000_000 + index, 1_700_000_000 + index))
        staged.rename(folder / f"{index:03d}-{file.name}")


def test_zero_label_start_then_approved_references_switch_to_patchcore(samples_dir, tmp_path, capsys):
    cubes = samples_dir / "cubes" / "test"
    rng = random.Random(5)
    good = sorted((cubes / "good").glob("*.jpg"))
    defective = sorted((cubes / "abnormal").glob("*.jpg"))
    rng.shuffle(good)
    rng.shuffle(defective)
    warmup, mixed = good[:6], good[6:N_GOOD] + defective[:N_DEFECTIVE]
    rng.shuffle(mixed)
    later = good[N_GOOD:N_GOOD + 4] + defective[N_DEFECTIVE:N_DEFECTIVE + 3]
    settings = load_config(None, environ={}, overrides={
        "model": {"name": "patchcore"},
        "runtime": {"device": "cpu", "max_batch_size": 4, "max_batch_delay_ms": 20, "shutdown_grace_s": 20},
        "sources": [{"id": "cubes", "kind": "folder", "uri": str(tmp_path / "inbox"), "references": "auto",
                     "settle_s": 0.05, "poll_interval_s": 0.05}],
        "mqtt": {"enabled": False}, "database": {"url": f"sqlite:///{tmp_path}/anomalyd.db"},
        "storage": {"dir": str(tmp_path / "artifacts")},
        "api": {"enabled": False, "tokens": [{"name": r, "role": r, "token": t} for r, t in TOKENS.items()]},
    })
    (tmp_path / "inbox").mkdir()
    service = Service(settings, serve_http=False)
    service.start()
    try:
        manager = service.references
        version = manager.states["cubes"].version
        assert version and version.startswith("mutual-efficientnet-lite0"), version
        assert "cubes" not in manager.unavailable
        _link(warmup, tmp_path / "inbox", 0)  # a cold start: no references, no labels
        assert wait_until(lambda: len(_rows(service)) == len(warmup), timeout=600)
        _link(mixed, tmp_path / "inbox", len(warmup))
        expected = len(warmup) + len(mixed)
        assert wait_until(lambda: len(_rows(service)) == expected, timeout=600), f"{len(_rows(service))}/{expected}"
        rows = {Path(row.frame_name).name.split("-", 1)[1]: row for row in _rows(service)}
        assert {row.model_version for row in rows.values()} == {version}
        # the frames that filled the window have no decision (no score), never a pass; the others are judged
        undecided = [row for row in rows.values() if row.is_anomalous is None]
        assert 8 <= len(undecided) <= 12 and all(row.score is None for row in undecided)
        assert all(0.0 <= row.score <= 1.0 for row in rows.values() if row.is_anomalous is not None)
        alerted_bad = sum(bool(rows[f.name].is_anomalous) for f in defective[:N_DEFECTIVE])
        alerted_good = sum(bool(rows[f.name].is_anomalous) for f in warmup + good[6:N_GOOD])
        with capsys.disabled():
            print(f"mutual: {alerted_bad}/{N_DEFECTIVE} defective alerted, {alerted_good}/{N_GOOD} good alerted")
        assert alerted_bad >= N_DEFECTIVE // 2
        assert alerted_good <= 4
        # the window kept the alerted frames out and holds only normal-looking ones
        window = manager.states["cubes"].detector.window
        assert window.excluded >= alerted_bad and len(window) <= window.limits.max_frames
        # Approval: the operator picks the lowest-scoring good-looking frames as references through the API.
        from daemon.api import routers
        from daemon.api.app import create_app

        client = TestClient(create_app(service.app_state(), routers()))
        early = client.get("/api/sources/cubes/references/proposal", headers=auth("viewer")).json()
        assert early["ready"] is False and early["frames"] == []  # fewer than 50 judged frames yet
        proposal = client.get("/api/sources/cubes/references/proposal", params={"count": 4, "after": 12},
                              headers=auth("viewer")).json()
        assert proposal["ready"] is True and len(proposal["frames"]) == 4, proposal
        by_id = {r.id: name for name, r in rows.items()}
        chosen = [frame["inspection_id"] for frame in proposal["frames"]]
        assert not {by_id[i] for i in chosen} & {f.name for f in defective}, "a defective frame was proposed"
        assert all(rows[by_id[i]].score > 0 and not rows[by_id[i]].is_anomalous for i in chosen)
        # the CLI proposes the same frames from the same database
        from daemon.cli import main

        config = tmp_path / "config.toml"
        config.write_text(f"""
[model]
name = "patchcore"
[[sources]]
id = "cubes"
kind = "folder"
uri = "{tmp_path / 'inbox'}"
references = "auto"
[database]
url = "sqlite:///{tmp_path}/anomalyd.db"
[storage]
dir = "{tmp_path / 'artifacts'}"
[mqtt]
enabled = false
""")
        capsys.readouterr()
        assert main(["references", "propose", "--config", str(config), "--source", "cubes", "--count", "4",
                     "--after", "12", "--json"]) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["frames"] == proposal["frames"]
        answer = client.post("/api/sources/cubes/references", json={"inspection_ids": chosen},
                             headers=auth("operator"))
        assert answer.status_code == 201, answer.text
        assert wait_until(lambda: service.pipeline.detector.version_for("cubes").startswith("patchcore-"),
                          timeout=600)
        patchcore_version = service.pipeline.detector.version_for("cubes")
        assert "-k4" in patchcore_version
        _link(later, tmp_path / "inbox", expected)
        assert wait_until(lambda: len(_rows(service)) == expected + len(later), timeout=600)
        newest = {Path(r.frame_name).name.split("-", 1)[1]: r for r in _rows(service)[expected:]}
        assert {r.model_version for r in newest.values()} == {patchcore_version}
        # PatchCore on the 4 approved frames ranks the new defects above the new good frames
        assert min(newest[f.name].score for f in later[4:]) > max(newest[f.name].score for f in later[:4])
    finally:
        service.stop()
