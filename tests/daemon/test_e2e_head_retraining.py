"""End to end on real weights and real frames: operator labels make `patchcore` better through retraining.

The daemon runs `patchcore` (EfficientNet-Lite0) on 8 good metal_plate references (../shared, linked, never
copied) and inspects a first batch. Through the HTTP API an operator labels half of the defective frames it missed anomalous (half
with the dataset's pixel masks, half with the image label only) and the good ones normal, and asks for a retraining
run (POST /api/retrain). The run trains a patchcore-head, registers it as a candidate version, and the promotion
gate promotes it because, at the calibrated thresholds, it misses fewer of the held-out labelled defects than the
running PatchCore without alerting more held-out normals. The model watcher hot-swaps it in; each source gets a
calibration row and a threshold-history record for the new version; fresh defective frames (never labelled) are
scored by it above its threshold. The good frames it now alerts are labelled normal, a second run is promoted, and
sent again they pass.
"""

from __future__ import annotations

import io
import random
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from adapters.db import Inspection, ModelVersion, SourceThreshold, TrainingRun
from adapters.db.schema import threshold_history
from daemon.config.settings import load_config
from daemon.learning.versions import models_dir
from daemon.process.service import Service
from tests.waiting import wait_until

pytestmark = [pytest.mark.shared]

ADMIN = "e2e-admin-token"
SOURCE = "plates"
SIZE = 128  # small frames: the whole test is about a minute on two busy cores
N_DEFECTIVE = 60


def _link(files: list[Path], folder: Path, prefix: str = "") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for file in files:
        (folder / f"{prefix}{file.name}").symlink_to(file.resolve())


def label_through_api(client: TestClient, headers: dict, rows: dict, defective: list[Path], normals: list[Path],
                      mask_of) -> None:
    """Label frames the way an operator does: every other defect with its mask (pixel supervision, `mask_of(frame)`
    the dataset's mask file), the others by their image label alone, and `normals` as normal."""
    for index, frame in enumerate(defective):
        row = rows[frame.name]
        if index % 2 == 0:
            mask = mask_of(frame).read_bytes()
            response = client.post(f"/api/inspections/{row.id}/label", data={"label": "anomalous"},
                                   files={"mask": ("mask.png", io.BytesIO(mask), "image/png")}, headers=headers)
        else:
            response = client.post(f"/api/inspections/{row.id}/label", json={"label": "anomalous"}, headers=headers)
        assert response.status_code == 201, response.text
    for frame in normals:
        response = client.post(f"/api/inspections/{rows[frame.name].id}/label", json={"label": "normal"},
                               headers=headers)
        assert response.status_code == 201, response.text


def retrain_through_api(client: TestClient, headers: dict, service) -> tuple[TrainingRun, ModelVersion]:
    """POST /api/retrain as an operator does, wait for the run, and return it (succeeded) with its candidate."""
    response = client.post("/api/retrain", headers=headers)
    assert response.status_code == 202, response.text
    assert service.retrainer.wait(timeout=300)
    with service.sessions() as session:
        run = session.get(TrainingRun, response.json()["run_id"])
        assert run.status == "succeeded", run.log
        candidate = session.scalars(select(ModelVersion).where(ModelVersion.version == run.candidate_version)).one()
    return run, candidate


def _plates(samples_dir: Path) -> tuple[list[Path], list[Path], Path]:
    root = samples_dir / "metal_plate"
    good = sorted((root / "test" / "good").glob("*.png"))
    defective = sorted((root / "test" / "defect").glob("*.png"))
    rng = random.Random(21)
    rng.shuffle(good)
    rng.shuffle(defective)
    return good, defective, root / "ground_truth" / "defect"


def _settings(tmp_path: Path):
    return load_config(None, environ={}, overrides={
        "model": {"name": "patchcore", "references": str(tmp_path / "references"), "image_size": SIZE},
        "runtime": {"device": "cpu", "max_batch_delay_ms": 20, "shutdown_grace_s": 20, "max_batch_size": 8},
        "sources": [{"id": SOURCE, "kind": "folder", "uri": str(tmp_path / "inbox"), "line": "press",
                     "settle_s": 0.05, "poll_interval_s": 0.05}],
        "retraining": {"promotion": "auto", "holdout_fraction": 0.3, "threads": 1, "seed": 3},
        "mqtt": {"enabled": False}, "database": {"url": f"sqlite:///{tmp_path}/anomalyd.db"},
        "storage": {"dir": str(tmp_path / "artifacts")},
        "api": {"enabled": False, "tokens": [{"name": "admin", "role": "admin", "token": ADMIN}]},
    })


def test_labels_retrain_a_head_that_the_gate_promotes(samples_dir, tmp_path):
    from daemon.api import routers
    from daemon.api.app import create_app

    good, defective, masks = _plates(samples_dir)
    references, normals = good[:8], good[8:12]
    fresh_good = good[12:20]  # never labelled: false alarms before and after
    _link(references, tmp_path / "references")
    (tmp_path / "inbox").mkdir()
    service = Service(_settings(tmp_path), serve_http=False)
    started = time.monotonic()
    service.start()
    try:
        first_version = service.references.states[SOURCE].version
        assert first_version.startswith("patchcore-")
        _link(normals + fresh_good + defective[:N_DEFECTIVE], tmp_path / "inbox")

        def rows() -> dict[str, Inspection]:
            with service.sessions() as session:
                return {Path(r.frame_name).name: r for r in session.scalars(select(Inspection))}

        first = len(normals) + len(fresh_good) + N_DEFECTIVE
        assert wait_until(lambda: len(rows()) == first, timeout=180), f"{len(rows())} of {first} inspected"
        before = rows()
        # The operator labels defects the line let through: of the defective frames the first version missed
        # (PatchCore and its calibration are deterministic: the same ones every run), every other one is labelled,
        # the others come back later as fresh frames of the same kinds.
        missed = sorted((f for f in defective[:N_DEFECTIVE] if not before[f.name].is_anomalous),
                        key=lambda f: before[f.name].score)
        print(f"first version: {len(missed)} of {N_DEFECTIVE} defects missed, "
              f"{sum(before[f.name].is_anomalous for f in fresh_good)} of {len(fresh_good)} good frames alerted")
        assert len(missed) >= 10
        labelled, fresh = missed[0::2], missed[1::2]
        client = TestClient(create_app(service.app_state(), routers()))
        headers = {"Authorization": f"Bearer {ADMIN}"}
        label_through_api(client, headers, before, labelled, normals, lambda frame: masks / f"{frame.stem}_mask.png")

        run, candidate = retrain_through_api(client, headers, service)
        assert candidate.kind == "patchcore-head" and Path(candidate.prompts_path).is_file()
        assert run.promoted and candidate.status == "active", run.log
        # the job embedded its frames on the daemon's CPU trunk runtime (its default, auto: ONNX Runtime)
        job_log = (models_dir(service.settings) / "runs" / str(run.id) / "job.log").read_text(encoding="utf-8")
        assert "CNN trunks run on onnxruntime" in job_log, job_log[-2000:]
        point = candidate.metrics["operating_point"]
        print(f"held-out operating point: candidate {point['candidate']}, active {point['active']}")
        assert point["candidate"]["defects"] == point["active"]["missed"] >= 1  # every held-out one was missed
        # promoted: at the operating point it misses no more held-out labelled defects, with no more false alarms (the
        # gate's rule; with 2-3 held-out defects, drawn by the inspections' random uuids, a tie happens). That the
        # labels taught it something is asserted below, on fresh frames of the defects it missed before.
        assert point["candidate"]["missed"] <= point["active"]["missed"]
        assert point["candidate"]["false_alarms"] <= point["active"]["false_alarms"]
        runs = client.get("/api/models", headers=headers).json()["runs"]
        assert runs[0]["id"] == run.id and runs[0]["promoted"] and runs[0]["status"] == "succeeded"

        # hot swap: the source's detector is rebuilt on the head and calibrated for the new version
        assert wait_until(lambda: str(service.references.states[SOURCE].version).startswith("patchcore-head-"),
                          timeout=120)
        new_version = service.references.states[SOURCE].version
        with service.sessions() as session:
            calibration = session.scalars(select(SourceThreshold).where(
                SourceThreshold.source == SOURCE, SourceThreshold.model_version == new_version)).one()
            history = session.execute(select(threshold_history).where(
                threshold_history.c.model_version == new_version)).all()
        assert 0.5 <= calibration.threshold < 1 and [h.action for h in history] == ["applied"]

        _link(fresh + fresh_good, tmp_path / "inbox", prefix="again-")
        second = first + len(fresh) + len(fresh_good)
        assert wait_until(lambda: len(rows()) == second, timeout=120), f"{len(rows())} of {second} inspected"
        after = rows()
        old = [before[f.name] for f in fresh]
        new = [after[f"again-{f.name}"] for f in fresh]
        assert all(r.model_version == new_version and r.threshold == pytest.approx(calibration.threshold) for r in new)
        print(f"fresh defects alerted: {sum(r.is_anomalous for r in old)}/{len(old)} by {first_version}, "
              f"{sum(r.is_anomalous for r in new)}/{len(new)} by {new_version}; scores "
              f"{[round(r.score, 3) for r in new]} vs threshold {calibration.threshold:.3f}; "
              f"{time.monotonic() - started:.0f} s")
        old_good = [before[f.name] for f in fresh_good]
        new_good = [after[f"again-{f.name}"] for f in fresh_good]
        print(f"fresh good frames alerted: {sum(r.is_anomalous for r in old_good)}/{len(old_good)} before, "
              f"{sum(r.is_anomalous for r in new_good)}/{len(new_good)} after; scores "
              f"{[round(r.score, 4) for r in new_good]}")
        assert not any(r.is_anomalous for r in old)  # the first version missed them all
        # measured 3 and 4 of 5 (the held-out split, by the inspections' random uuids, varies the training set)
        assert sum(r.is_anomalous and r.score >= r.threshold for r in new) >= 2
        # The head's price, measured: 2 of these 8 good frames alert at its threshold (0.5, its decision
        # boundary), 0 before; labelled normal, they train the next run (labelled false alarms always train).
        assert sum(r.is_anomalous for r in new_good) <= 3

        # The loop closed: the false alarms are labelled normal, a second run trains on them; sent again, they pass.
        false_alarms = [r for r in new_good if r.is_anomalous]
        if not false_alarms:  # measured 1 or 2 in every run so far
            return
        for row in false_alarms:
            response = client.post(f"/api/inspections/{row.id}/label", json={"label": "normal"}, headers=headers)
            assert response.status_code == 201, response.text
        response = client.post("/api/retrain", headers=headers)
        assert response.status_code == 202, response.text
        assert service.retrainer.wait(timeout=300)
        with service.sessions() as session:
            second = session.get(TrainingRun, response.json()["run_id"])
        print(f"second run: {second.status}, promoted {second.promoted}: {(second.metrics or {}).get('reason')}")
        assert second.status == "succeeded" and second.promoted, second.log
        assert wait_until(lambda: service.references.states[SOURCE].version not in (first_version, new_version),
                          timeout=120)
        third_version = service.references.states[SOURCE].version
        names = [Path(r.frame_name).name.removeprefix("again-") for r in false_alarms]
        _link([f for f in fresh_good if f.name in names] + fresh, tmp_path / "inbox", prefix="third-")
        third = len(rows()) + len(names) + len(fresh)
        assert wait_until(lambda: len(rows()) == third, timeout=120), f"{len(rows())} of {third} inspected"
        final = rows()
        again = [final[f"third-{name}"] for name in names]
        again_fresh = [final[f"third-{f.name}"] for f in fresh]
        print(f"labelled false alarms alerted by {third_version}: {sum(r.is_anomalous for r in again)}/{len(again)}; "
              f"fresh defects {sum(r.is_anomalous for r in again_fresh)}/{len(again_fresh)}; "
              f"{time.monotonic() - started:.0f} s")
        assert all(r.model_version == third_version for r in again) and not any(r.is_anomalous for r in again)
    finally:
        service.stop()
