"""`[mutual] auto_accept` end to end on real cubes frames and real weights (issue 23): a `references = "auto"` source
starts with mutual scoring, and once `propose_after` of its judged frames looked normal the daemon approves its own
proposal: the proposed frames become the source's references, the source switches to PatchCore on them, calibrated,
and the approval is recorded as `daemon:auto_accept` (API and the references history file). Frames: ../shared (copied
into tmp_path, never into the repo)."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from daemon.api import routers
from daemon.api.app import create_app
from daemon.config.settings import load_config
from daemon.process.service import Service
from daemon.references.files import own_reference_dir
from tests.daemon.test_api import TOKENS, auth
from tests.daemon.test_e2e_mutual import _rows
from tests.waiting import wait_until

pytestmark = [pytest.mark.shared, pytest.mark.slow]

WINDOW, AFTER, COUNT = 16, 10, 4


def _feed(files: list[Path], inbox: Path, first: int) -> None:
    for index, file in enumerate(files, start=first):
        staged = inbox.parent / f".{index:03d}{file.suffix}"
        shutil.copyfile(file, staged)
        os.utime(staged, (1_700_000_000 + index, 1_700_000_000 + index))
        staged.rename(inbox / f"{index:03d}-{file.parent.name}-{file.name}")


def test_auto_accept_approves_the_proposal_and_switches_to_patchcore(samples_dir, tmp_path):
    cubes = samples_dir / "cubes" / "test"
    good = sorted((cubes / "good").glob("*.jpg"))
    defective = sorted((cubes / "abnormal").glob("*.jpg"))
    random.Random(3).shuffle(good)
    settings = load_config(None, environ={}, overrides={
        "model": {"name": "patchcore"},
        "runtime": {"device": "cpu", "max_batch_size": 4, "max_batch_delay_ms": 20, "shutdown_grace_s": 20},
        "mutual": {"window_frames": WINDOW, "propose_after": AFTER, "propose_count": COUNT, "auto_accept": True},
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
        manager.poll_s = 0.2
        assert manager.states["cubes"].version.startswith("mutual-")
        first = good[:8 + AFTER + 2]  # the window-filling frames, then enough judged normal-looking ones
        _feed(first, tmp_path / "inbox", 0)
        assert wait_until(lambda: len(_rows(service)) == len(first), timeout=600)
        # the daemon approves its own proposal and rebuilds the source on it
        assert wait_until(lambda: service.pipeline.detector.version_for("cubes").startswith("patchcore-"),
                          timeout=600), manager.states["cubes"].version
        version = service.pipeline.detector.version_for("cubes")
        assert f"-k{COUNT}" in version
        added = sorted(path.name for path in own_reference_dir(settings, "cubes").iterdir())
        assert len(added) == COUNT
        client = TestClient(create_app(service.app_state(), routers()))
        history = client.get("/api/sources/cubes/references/history", headers=auth("viewer")).json()["items"]
        assert [(h["action"], h["by"], sorted(h["names"])) for h in history] == [("added", "daemon:auto_accept", added)]
        by_id = {row.id: row for row in _rows(service)}
        approved = history[0]["inspection_ids"]
        assert all(by_id[i].model_version.startswith("mutual-") and by_id[i].is_anomalous is False for i in approved)
        # calibrated on them, and the next frames are PatchCore's
        shown = client.get("/api/sources/cubes/thresholds", headers=auth("viewer")).json()
        assert shown["model_version"] == version and shown["origin"] == "calibrated"
        later = [good[len(first)], defective[0]]
        _feed(later, tmp_path / "inbox", len(first))
        assert wait_until(lambda: len(_rows(service)) == len(first) + 2, timeout=600)
        newest = {Path(row.frame_name).name.split("-", 1)[1]: row for row in _rows(service)[-2:]}
        assert {row.model_version for row in newest.values()} == {version}
        good_row, defect_row = newest[f"good-{later[0].name}"], newest[f"abnormal-{later[1].name}"]
        assert defect_row.score > good_row.score  # the defect above the good part
        # nothing approved twice: the source runs PatchCore now
        manager.check()
        assert len(client.get("/api/sources/cubes/references/history", headers=auth("viewer")).json()["items"]) == 1
        client.close()
    finally:
        service.stop()
