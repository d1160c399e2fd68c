"""The family contract drives the daemon (model.factory.Capabilities): a family registered from this test, under a
name no project file knows, gets the frame geometry, the score scale, the reference handling and the retraining
refusal from what it declares, and the same builder declared otherwise gets the other behaviour."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from sqlalchemy import select

from adapters.db import TrainingRun
from daemon.config.geometry import default_resize, source_geometry
from daemon.config.settings import ConfigError, load_config
from daemon.detectors.scale import scale_outputs
from daemon.references.manager import NeedsReferences, ReferenceManager
from model.factory import Capabilities, ModelFamily, capabilities, register_family, unregister_model
from model.geometry import DEFAULT_RESIZE
from tests.daemon.test_api import FakeRetrainer, auth, sqlite_env  # noqa: F401  (the fixture)
from tests.daemon.test_model_family_plugin import IMAGE_SIZE, create_toy

TOY = "toy-capable"


@pytest.fixture
def declare():
    """declare(**capabilities): (re-)register the toy family with these capabilities, and nothing else."""

    def register(**declared) -> ModelFamily:
        return register_family(ModelFamily(name=TOY, create=create_toy, summary="capabilities test family",
                                           capabilities=Capabilities(clip_backbone=False, **declared)))

    yield register
    unregister_model(TOY)


def _toy_detector():
    detector = create_toy(device=torch.device("cpu"), dtype=torch.float32)
    detector.name = TOY  # the builder of test_model_family_plugin, under this test's family name
    return detector


def _settings(tmp_path: Path, **model):
    return load_config(None, environ={}, overrides={
        "model": {"name": TOY, "image_size": IMAGE_SIZE, **model},
        "runtime": {"device": "cpu"},
        "sources": [{"id": "cam", "kind": "folder", "uri": str(tmp_path / "cam")}],
        "mqtt": {"enabled": False}, "api": {"enabled": False},
        "database": {"url": f"sqlite:///{tmp_path}/anomalyd.db"}, "storage": {"dir": str(tmp_path / "artifacts")},
    })


def test_frame_geometry_follows_supports_geometry(declare, tmp_path):
    declare(supports_geometry=True)
    assert default_resize(TOY) == DEFAULT_RESIZE and default_resize(TOY, engine="onnxruntime") == "squash"
    settings = _settings(tmp_path, roi=[4, 4, 28, 28])
    geometry = source_geometry(settings, "cam")
    assert geometry.resize == DEFAULT_RESIZE and tuple(geometry.roi) == (4, 4, 28, 28)

    declare(supports_geometry=False)
    assert default_resize(TOY) == "squash"
    with pytest.raises(ConfigError, match=rf"\[model\]: resize .* need model patchcore or patchcore-head; model '{TOY}' takes whole "
                                          "frames squashed"):
        _settings(tmp_path, roi=[4, 4, 28, 28])


def test_score_scale_follows_the_declared_kind(declare):
    detector = _toy_detector()
    detector.distance_scale = 2.0
    scores, maps = torch.tensor([2.0, 0.0]), torch.full((2, 4, 4), 4.0)
    declare(score_scale="distance")
    scaled_scores, scaled_maps = scale_outputs(detector, scores, maps)
    torch.testing.assert_close(scaled_scores, torch.tensor([1 - math.exp(-1.0), 0.0]))
    torch.testing.assert_close(scaled_maps, torch.full((2, 4, 4), 1 - math.exp(-2.0)))
    declare(score_scale="unit")
    unchanged = scale_outputs(detector, scores, maps)
    assert unchanged[0] is scores and unchanged[1] is maps
    with pytest.raises(ValueError, match="score_scale 'decibel'"):
        Capabilities(score_scale="decibel")


def test_a_family_that_needs_references_makes_a_source_without_them_unavailable(declare, tmp_path):
    (tmp_path / "cam").mkdir()
    declare(needs_references=True, uses_references=True)
    assert capabilities(TOY).needs_references
    manager = ReferenceManager(_settings(tmp_path), source_ids=["cam"])
    manager.route(NeedsReferences(TOY, f"{TOY}-v1", IMAGE_SIZE))
    assert manager.unavailable["cam"].startswith(f"source cam: {TOY} needs references")
    assert manager.status()["cam"]["ready"] is False

    declare()  # the defaults: it needs no references
    manager = ReferenceManager(_settings(tmp_path), source_ids=["cam"])
    routed = manager.route(_toy_detector())
    assert manager.unavailable == {} and manager.status()["cam"]["ready"] is True
    assert routed.per_source == {}  # every frame goes to the shared base


def test_retraining_a_family_without_training_is_refused_with_the_reason(declare, sqlite_env):  # noqa: F811
    family = declare()
    assert not family.trainable and not family.learns_from_labels and not family.exportable
    env = sqlite_env
    env.state.settings = env.state.settings.model_copy(
        update={"model": env.state.settings.model.model_copy(update={"name": TOY})})
    retrainer = FakeRetrainer()
    env.state.retrainer = retrainer
    response = env.client.post("/api/retrain", headers=auth("admin"))
    assert response.status_code == 409 and f"'{TOY}' has nothing to learn" in response.json()["detail"]
    assert retrainer.triggers == []
    with env.sessions() as session:
        assert session.scalars(select(TrainingRun)).all() == []


def test_known_good_scores_come_from_the_hook_the_family_registers(tmp_path):
    """The calibration's known-good scores come from the family's `known_good` hook (PatchCore's maths live in
    model/patchcore/known_good.py, never in daemon/): computed once through it, cached, read back on a restart; a
    family without the hook has none, and eval reports no operating point for it."""
    from daemon.references.bank import cached_known_good
    from daemon.references.operating_point import daemon_threshold
    from model.known_good import CALIBRATION_HOLDOUTS, KnownGoodScores

    calls = []

    def toy_known_good(detector, files, limit):
        calls.append(([f.name for f in files], limit))
        return KnownGoodScores([1.0, 2.5, 3.0], [4.0, 5.0, 6.0], 2.0, 2, 1, [1.0, 3.0])

    register_family(ModelFamily(name=TOY, create=create_toy, known_good=toy_known_good, capabilities=Capabilities(
        clip_backbone=False, needs_references=True, uses_references=True)))
    try:
        settings, detector = _settings(tmp_path), _toy_detector()
        files = [tmp_path / "ref-b.png", tmp_path / "ref-a.png", tmp_path / "ref-c.png"]
        bank = tmp_path / "cam.safetensors"
        known = cached_known_good(settings, detector, files, bank)
        assert calls == [(["ref-b.png", "ref-a.png", "ref-c.png"], CALIBRATION_HOLDOUTS)]
        assert (known.scores, known.distance_scale, known.own_files) == ([1.0, 2.5, 3.0], 2.0, ["ref-b.png", "ref-a.png"])
        again = cached_known_good(settings, detector, files, bank)  # the restart: read back, the hook not called
        assert len(calls) == 1 and (again.scores, again.own, again.own_files) == (known.scores, known.own,
                                                                                  known.own_files)
        threshold = daemon_threshold(detector, files, 0.5)
        assert threshold is not None and len(calls) == 2 and threshold[2] == [1.0, 2.5, 3.0]

        register_family(ModelFamily(name=TOY, create=create_toy, capabilities=Capabilities(
            clip_backbone=False, needs_references=True, uses_references=True)))
        assert cached_known_good(settings, detector, files, tmp_path / "other.safetensors") is None
        assert daemon_threshold(detector, files, 0.5) is None and len(calls) == 2
    finally:
        unregister_model(TOY)


def test_threshold_floor_follows_the_declaration(tmp_path):
    """A family whose known-good frames are frames it learned from declares its decision boundary as the floor of
    its calibrated threshold (the head's 0.5); the rule says it was raised. Without the declaration, no floor."""
    from daemon.references.operating_point import daemon_threshold
    from model.known_good import KnownGoodScores

    def low_known_good(detector, files, limit):
        return KnownGoodScores([0.01, 0.02, 0.03], [0.02, 0.03, 0.04], 1.0, 3, 0, [0.01, 0.02, 0.03])

    files = [tmp_path / f"ref-{i}.png" for i in range(3)]
    try:
        for floor in (0.5, None):
            register_family(ModelFamily(name=TOY, create=create_toy, known_good=low_known_good, capabilities=Capabilities(
                clip_backbone=False, needs_references=True, uses_references=True, threshold_floor=floor)))
            value, rule, scores = daemon_threshold(_toy_detector(), files, 0.5)
            assert scores == pytest.approx([0.01, 0.02, 0.03])
            if floor is None:
                assert value < 0.1 and "raised" not in rule
            else:
                assert value == 0.5 and "raised from" in rule and "decision boundary 0.5" in rule
    finally:
        unregister_model(TOY)
