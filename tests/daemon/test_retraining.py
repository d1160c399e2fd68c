"""Retraining from operator labels: schedule, training set and hold-out split, the training process, evaluation,
promotion by rule (passing and impossible), the records in training_runs/model_versions, the CLI and the API entry.

Real SQLite, real inspection samples stored as frame artifacts, the tiny golden CLIP at 112 px, 1 epoch.
"""

from __future__ import annotations

import argparse
import math
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from sqlalchemy import select

from adapters.db import (
    Inspection,
    Label,
    ModelVersion,
    TrainingRun,
    add_label,
    make_engine,
    make_session_factory,
    upgrade,
)
from adapters.storage import ArtifactStore
from daemon.config.schedule import COMPARABLE_METRICS, parse_schedule
from daemon.config.settings import ConfigError, load_config
from daemon.learning import versions as registry
from daemon.learning.promotion import promotion_decision
from daemon.learning.retraining import (
    Retrainer,
    RetrainingScheduler,
    new_labels_since_last_run,
    request_retrain,
)
from daemon.learning.training_set import LabelledFrame, split_holdout
from model.datasets import load_meta
from tests.waiting import wait_until

FRAME_SIDE = 160


# --- helpers (also used by test_models) --------------------------------------------------------------------------


def write_config(tmp_path: Path, golden_dir: Path, retraining: str = "", extra: str = "", epochs: int = 1) -> Path:
    config = tmp_path / "config.toml"
    config.write_text(f"""
[model]
backbone = "{golden_dir / 'tiny_clip_openai_fp16.safetensors'}"
backbone_config = "{golden_dir / 'tiny-clip-24L.json'}"
prompts = "{golden_dir / 'prompts_official_format.pth'}"
image_size = 112
[runtime]
device = "cpu"
max_batch_size = 4
max_batch_delay_ms = 5
shutdown_grace_s = 20
[mqtt]
enabled = false
[api]
enabled = false
[database]
url = "sqlite:///var/anomalyd.db"
[storage]
dir = "var/artifacts"
[retraining]
epochs = {epochs}
batch_size = 4
threads = 1
nice = 5
{retraining}
{extra}
""")
    return config


def open_db(settings):
    engine = make_engine(settings.database_url)
    upgrade(engine)
    return engine, make_session_factory(engine)


def small_rgb(path: Path, side: int = FRAME_SIDE) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    return cv2.cvtColor(cv2.resize(bgr, (side, side), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)


def seed_labelled(settings, sessions, samples_dir: Path, normals: int, defects: int, category: str = "hazelnut",
                  start: int = 0) -> list[int]:
    """Inspections with stored frames (as the pipeline writes them) and operator labels; defects get the
    ground-truth mask as the operator's mask. Returns the inspection ids."""
    store = ArtifactStore(settings.resolve(settings.storage.dir))
    test = [s for s in load_meta(samples_dir, split="test") if s.category == category]
    train = [s for s in load_meta(samples_dir, split="train") if s.category == category]
    good = [s for s in test + train if s.label == 0][start:start + normals]
    bad = [s for s in test if s.label == 1 and s.has_mask][start:start + defects]
    assert len(good) == normals and len(bad) == defects
    ids = []
    now = datetime.now(timezone.utc)
    for index, sample in enumerate(good + bad):
        rgb = small_rgb(sample.path)
        key = f"seed{start}-{index:03d}"
        paths = store.write(key, now, rgb=rgb, anomaly_map=np.zeros(rgb.shape[:2], np.float32),
                            mask=np.zeros(rgb.shape[:2], np.uint8))
        mask_rel = None
        if sample.label:
            mask = cv2.imread(str(sample.mask_path), cv2.IMREAD_GRAYSCALE)
            mask_rel = f"labels/{key}_label.png"
            (store.root / "labels").mkdir(exist_ok=True)
            cv2.imwrite(str(store.root / mask_rel), cv2.resize(mask, (FRAME_SIDE, FRAME_SIDE),
                                                               interpolation=cv2.INTER_NEAREST))
        with sessions() as session, session.begin():
            row = Inspection(uuid=key, frame_id=key, source="cam1", line="l1", captured_at=now, model_version="v0",
                             score=0.5, threshold=0.5, is_anomalous=False, regions=[], mask_path=paths.mask,
                             heatmap_path=paths.heatmap, frame_path=paths.frame, width=FRAME_SIDE,
                             height=FRAME_SIDE)
            session.add(row)
            session.flush()
            add_label(session, row.id, "anomalous" if sample.label else "normal", author="test", mask_path=mask_rel)
            ids.append(row.id)
    return ids


def register_initial(settings, sessions):
    """What the daemon does at start: the configured tiny model registered as the active version."""
    from daemon.process.service import build_detector

    detector = build_detector(settings)
    assert registry.startup_detector(settings, sessions, detector) is detector
    return detector


# --- pure logic ---------------------------------------------------------------------------------------------------


def test_schedule_parses_cron_and_intervals():
    start = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)
    assert parse_schedule("6h").next_after(start) == start + timedelta(hours=6)
    assert parse_schedule("every 30m").next_after(start) == start + timedelta(minutes=30)
    assert parse_schedule("90s").interval_s == 90
    cron = parse_schedule("0 3 * * *")
    due = cron.next_after(start)
    assert due > start and due.astimezone().hour == 3 and due.astimezone().minute == 0
    assert due - start <= timedelta(days=1)
    for bad in ("", "0 3 * *", "61 * * * *", "every", "5 parsecs"):
        with pytest.raises(ValueError, match="schedule"):
            parse_schedule(bad)


def test_config_rejects_bad_schedule_and_metric(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('[retraining]\nschedule = "0 25 * * *"\n')
    with pytest.raises(ConfigError, match=r"\[retraining\].schedule"):
        load_config(config, environ={})
    config.write_text('[retraining]\nmetric = "accuracy"\n')
    with pytest.raises(ConfigError, match=r"\[retraining\].metric"):
        load_config(config, environ={})
    settings = load_config(None, environ={"ANOMALYD_RETRAINING__SCHEDULE": "every 2d"})
    assert parse_schedule(settings.retraining.schedule).interval_s == 2 * 86400


def test_metric_names_match_the_model_metrics():
    from model.metrics import METRIC_NAMES

    assert tuple(COMPARABLE_METRICS) == tuple(METRIC_NAMES)


def test_promotion_rules():
    def decide(cand, act, rule="not_worse", tol=0.0):
        return promotion_decision({"image_auroc": cand}, {"image_auroc": act}, rule=rule, metric="image_auroc",
                                  tolerance=tol)[0]

    assert decide(0.80, 0.80) and decide(0.79, 0.80, tol=0.02) and not decide(0.77, 0.80, tol=0.02)
    assert decide(0.81, 0.80, "better") and not decide(0.80, 0.80, "better")
    assert not decide(1.0, 0.0, "better", tol=1.0)  # the impossible rule
    assert decide(math.nan, 0.9, "always")
    passes, reason = promotion_decision({"image_auroc": math.nan}, {"image_auroc": 0.5}, rule="not_worse",
                                        metric="image_auroc", tolerance=0)
    assert not passes and "undefined" in reason
    passes, reason = promotion_decision({"image_auroc": 0.9}, None, rule="not_worse", metric="image_auroc",
                                        tolerance=0)
    assert not passes and "active" in reason


def test_holdout_split_is_stable_and_covers_both_classes():
    def frames(n, label, offset):
        return [LabelledFrame(offset + i, f"uuid-{label}-{i}", Path("x.jpg"), label, None, "c") for i in range(n)]

    first = frames(30, 0, 0) + frames(6, 1, 100)
    train, holdout = split_holdout(first, 0.25)
    assert len(train) + len(holdout) == 36
    assert {f.label for f in holdout} == {0, 1} and {f.label for f in train} == {0, 1}
    assert 3 <= len(holdout) <= 16
    more = first + frames(40, 0, 1000)[30:] + frames(12, 1, 2000)[6:]
    _, holdout2 = split_holdout(more, 0.25)
    assert {f.inspection_id for f in holdout} <= {f.inspection_id for f in holdout2}  # nothing moves to training
    tiny_train, tiny_holdout = split_holdout(frames(2, 0, 0) + frames(1, 1, 10), 0.25)
    assert len(tiny_holdout) == 1 and tiny_holdout[0].label == 0 and len(tiny_train) == 2


# --- database, scheduler, CLI ---------------------------------------------------------------------------------------


def test_scheduler_waits_for_enough_new_labels(tmp_path, golden_dir, samples_dir, capsys):
    settings = load_config(write_config(tmp_path, golden_dir, 'min_new_labels = 5\nenabled = true\nschedule = "1h"'),
                           environ={})
    engine, sessions = open_db(settings)
    try:
        seed_labelled(settings, sessions, samples_dir, normals=2, defects=1)
        scheduler = RetrainingScheduler(Retrainer(settings, sessions))
        assert scheduler.tick() is None
        assert scheduler.last_decision == "skipped: 3 new labels, 5 needed"
        with sessions() as session:
            assert session.scalars(select(TrainingRun)).all() == []
            # a completed run resets the count: only labels after its start count
            session.add(TrainingRun(status="succeeded", started_at=datetime.now(timezone.utc) + timedelta(seconds=1)))
            session.commit()
            assert new_labels_since_last_run(session) == 0

        from daemon.commands import retrain_commands

        parser = argparse.ArgumentParser()
        retrain_commands.register(parser.add_subparsers())
        args = parser.parse_args(["retrain", "--config", str(tmp_path / "config.toml")])
        assert args.func(args) == 0
        out = capsys.readouterr().out
        assert "scheduled retraining: on, every 3600 s" in out
        assert ": 0 of 5 needed (not enough yet)" in out
        assert "last run: #1 succeeded" in out
    finally:
        engine.dispose()


def test_too_few_labels_fail_with_a_recorded_reason(tmp_path, golden_dir, samples_dir):
    settings = load_config(write_config(tmp_path, golden_dir), environ={})
    engine, sessions = open_db(settings)
    try:
        ids = seed_labelled(settings, sessions, samples_dir, normals=1, defects=0)
        with sessions() as session:  # a labelled row whose frame is gone is named, not silently dropped
            row = session.get(Inspection, ids[0])
            (settings.resolve(settings.storage.dir) / row.frame_path).unlink()
        outcome = Retrainer(settings, sessions).run(trigger="test")
        assert outcome.status == "failed" and "0 labelled frame(s)" in outcome.reason
        with sessions() as session:
            run = session.scalars(select(TrainingRun)).one()
            assert run.status == "failed" and run.finished_at is not None
            assert f"inspection {ids[0]}: frame file" in run.log
            assert session.scalars(select(ModelVersion)).all() == []
    finally:
        engine.dispose()


# --- a real run: train, evaluate, promote / reject -------------------------------------------------------------------


def test_retraining_promotes_then_rejects_by_rule(tmp_path, golden_dir, samples_dir):
    settings = load_config(write_config(tmp_path, golden_dir, 'promotion = "auto"\nrule = "always"\n'
                                        'min_anomalous = 10'), environ={})
    engine, sessions = open_db(settings)
    try:
        initial = register_initial(settings, sessions)
        seed_labelled(settings, sessions, samples_dir, normals=8, defects=4)
        events = []
        outcome = Retrainer(settings, sessions).run(trigger="test", progress=events.append)
        assert outcome.status == "succeeded", outcome.reason
        assert outcome.promoted and outcome.passes
        assert [e["event"] for e in events] == ["start", "epoch", "evaluated", "evaluated", "done"]
        with sessions() as session:
            run = session.scalars(select(TrainingRun)).one()
            assert run.status == "succeeded" and run.promoted and run.candidate_version == outcome.candidate_version
            assert run.params["epochs"] == 1 and run.params["image_size"] == 112 and run.params["trigger"] == "test"
            data = run.metrics["data"]
            assert data["labelled"] == 12 and data["train"] + data["holdout"] == 12
            assert data["train_with_mask"] >= 1 and data["synthetic_train"] is True  # 4 defects < min_anomalous
            assert 0.0 <= run.metrics["holdout"]["image_auroc"] <= 1.0
            assert 0.0 <= run.metrics["active_holdout"]["image_auroc"] <= 1.0
            assert "epoch 1/1" in run.log
            versions = {v.version: v for v in registry.list_versions(session)}
            assert versions[outcome.candidate_version].status == "active"
            assert versions[outcome.candidate_version].activated_at is not None
            assert versions[initial.version].status == "retired"
            assert versions[outcome.candidate_version].metrics["active_version"] == initial.version
        from model import load_prompts

        candidate_file = registry.version_file(settings, outcome.candidate_version)
        trained = load_prompts(candidate_file)
        assert trained.metadata["version"] == outcome.candidate_version
        start = load_prompts(registry.version_file(settings, initial.version))
        assert not torch.equal(trained.state["ctx_pos"], start.state["ctx_pos"])  # one epoch changed the prompts

        # An impossible rule: the candidate is recorded, retired, and the active version stays. Via the API entry.
        impossible = load_config(write_config(tmp_path, golden_dir, 'promotion = "auto"\nrule = "better"\n'
                                              'tolerance = 1.0'), environ={})
        state = SimpleNamespace(settings=impossible, sessions=sessions, retrainer=None)
        started = request_retrain(state)
        assert started["status"] == "running"
        assert state.retrainer.wait(120)  # the retrainer the API made (was state.extra["retrainer"])
        with sessions() as session:
            run = session.get(TrainingRun, started["run_id"])
            assert run.status == "succeeded" and not run.promoted, run.log
            assert run.params["trigger"] == "api"
            rejected = registry.get_version(session, run.candidate_version)
            assert rejected.status == "retired" and rejected.metrics["passes"] is False
            assert "better" in rejected.notes
            assert registry.get_version(session, outcome.candidate_version).status == "active"
    finally:
        engine.dispose()


def test_busy_runs_are_refused(tmp_path, golden_dir):
    from daemon.learning.retraining import RetrainBusyError

    settings = load_config(write_config(tmp_path, golden_dir), environ={})
    engine, sessions = open_db(settings)
    try:
        with sessions() as session:
            session.add(TrainingRun(status="running", params={"host": "elsewhere"}))
            session.commit()
        retrainer = Retrainer(settings, sessions)
        assert retrainer.recover_interrupted() == 0  # another host's run is left alone
        with pytest.raises(RetrainBusyError, match="#1 is in progress"):
            retrainer.run()
        with sessions() as session:
            assert len(session.scalars(select(TrainingRun)).all()) == 1
            assert session.scalars(select(Label)).all() == []
    finally:
        engine.dispose()




def test_daemon_stop_cancels_a_run_in_progress(tmp_path, golden_dir, samples_dir):
    from daemon.process.service import Service

    settings = load_config(write_config(tmp_path, golden_dir, epochs=50), environ={})
    engine, sessions = open_db(settings)
    seed_labelled(settings, sessions, samples_dir, normals=3, defects=2)
    engine.dispose()
    service = Service(settings, sources=[])
    service.start()
    try:
        run_id = request_retrain(SimpleNamespace(retrainer=service.retrainer, settings=settings, sessions=service.sessions))[
            "run_id"]
        assert wait_until(lambda: service.retrainer._process is not None, 30)
        process = service.retrainer._process
    finally:
        service.stop()
    assert process.poll() is not None  # the training process is gone with the daemon
    engine, sessions = open_db(settings)
    try:
        with sessions() as session:
            run = session.get(TrainingRun, run_id)
            assert run.status == "cancelled" and run.finished_at is not None and not run.promoted
            assert len(registry.list_versions(session)) == 1  # only the configured model, no candidate
    finally:
        engine.dispose()


def adaclip_environ(golden_dir: Path, class_name: str | None = "hazelnut") -> dict[str, str]:
    environ = {"ANOMALYD_MODEL__NAME": "adaclip",
               "ANOMALYD_MODEL__PROMPTS": str(golden_dir.parent / "adaclip" / "adaclip_prompts_official_format.pth")}
    if class_name:
        environ["ANOMALYD_MODEL__CLASS_NAME"] = class_name
    return environ


def test_adaclip_retraining_trains_its_prompts_and_heads(tmp_path, golden_dir, samples_dir):
    from model.adaclip import load_adaclip_checkpoint

    settings = load_config(write_config(tmp_path, golden_dir, 'promotion = "auto"\nrule = "always"'),
                           environ=adaclip_environ(golden_dir))
    engine, sessions = open_db(settings)
    try:
        initial = register_initial(settings, sessions)
        assert initial.name == "adaclip"
        seed_labelled(settings, sessions, samples_dir, normals=6, defects=4)
        outcome = Retrainer(settings, sessions).run(trigger="test")
        assert outcome.status == "succeeded", outcome.reason
        assert outcome.promoted and outcome.candidate_version.startswith("adaclip-")
        with sessions() as session:
            row = registry.get_version(session, outcome.candidate_version)
            assert row.kind == "adaclip" and row.status == "active"
            assert 0.0 <= row.metrics["holdout"]["image_auroc"] <= 1.0
            assert row.metrics["active_version"] == initial.version  # the released weights, evaluated alike
            assert 0.0 <= row.metrics["active_holdout"]["image_auroc"] <= 1.0
        trained = load_adaclip_checkpoint(registry.version_file(settings, outcome.candidate_version))
        start = load_adaclip_checkpoint(golden_dir.parent / "adaclip" / "adaclip_prompts_official_format.pth")
        assert trained.metadata["class_names"] == ["hazelnut"] and trained.metadata["model"] == "adaclip"
        assert trained.metadata["gelu"] == "gelu"
        changed = [k for k in start.state if not torch.equal(trained.state[k], start.state[k])]
        assert changed, "one epoch from the active weights changed nothing"
        # What the watcher does on promotion: the new version loads and inspects with the source's class.
        detector = registry.build_version_detector(settings, row)
        prediction = detector.predict(torch.zeros(2, 3, 112, 112), ["hazelnut", "hazelnut"])
        assert prediction.scores.shape == (2,) and prediction.maps.shape == (2, 112, 112)
    finally:
        engine.dispose()


def test_adaclip_retraining_without_a_class_name_says_which_sources(tmp_path, golden_dir, samples_dir):
    settings = load_config(write_config(tmp_path, golden_dir), environ=adaclip_environ(golden_dir, None))
    engine, sessions = open_db(settings)
    try:
        seed_labelled(settings, sessions, samples_dir, normals=3, defects=2)
        outcome = Retrainer(settings, sessions).run(trigger="test")
        assert outcome.status == "failed"
        assert "class_name on source(s) cam1 or [model].class_name" in outcome.reason
    finally:
        engine.dispose()
