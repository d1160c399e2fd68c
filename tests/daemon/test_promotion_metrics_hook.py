"""The held-out metrics a retraining run decides on are the family's (`LabelLearning.promotion_metrics`, default
model/promotion.py): the head job hands the family each source's held-out frames, references, training normals
and geometry, and the daemon's own score scale and threshold rule; daemon/learning keeps only the decision."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from daemon.detectors.scale import scale_outputs
from daemon.learning import head_retraining_job as job
from model.factory import LabelLearning
from model.promotion import reference_holdout_metrics


def _spec() -> dict:
    return {
        "model": {"kind": "patchcore-head"}, "false_reject_rate": 0.01,
        "active": {"kind": "patchcore-head", "version": "v1", "prompts": "active.safetensors"},
        "train": [{"path": "n1.png", "label": 0, "category": "s1"}, {"path": "d1.png", "label": 1, "category": "s1"}],
        "holdout": [{"path": "h1.png", "label": 1, "category": "s1", "mask": "m1.png"},
                    {"path": "h2.png", "label": 0, "category": "s2"},
                    {"path": "h3.png", "label": 1, "category": "s3"}],
        "sources": {"s1": ["r1.png", "r2.png"], "s2": ["r3.png", "r4.png"], "s3": ["r5.png"]},
        "geometry": {"s2": {"resize": "fit"}},
    }


def test_the_head_job_measures_through_the_familys_hook_with_the_daemons_rules(capsys):
    calls: dict = {}

    def measure(learning, detector, models, sources, *, rate, rules, on_evaluated):
        calls.update(models=dict(models), sources=dict(sources), rate=rate, rules=rules)
        for name in models:
            on_evaluated(name)
        return {"candidate": {"metrics": {"image_auroc": 0.9}}, "active": {"metrics": {"image_auroc": 0.8}}}

    learning = LabelLearning(source_inputs=None, fit=None, load=lambda path: f"loaded {path}", scorer=None,
                             promotion_metrics=measure)
    result = job.evaluate(learning, object(), "candidate weights", _spec())
    assert result["candidate"]["metrics"]["image_auroc"] == 0.9
    assert calls["models"] == {"candidate": "candidate weights", "active": "loaded active.safetensors"}
    assert sorted(calls["sources"]) == ["s1", "s2"]  # s3 has one reference: no bank to judge it on
    s1, s2 = calls["sources"]["s1"], calls["sources"]["s2"]
    assert s1.references == [Path("r1.png"), Path("r2.png")] and s1.train_normals == [Path("n1.png")]
    assert [(s.path, s.label, s.mask_path) for s in s1.holdout] == [(Path("h1.png"), 1, Path("m1.png"))]
    assert s1.geometry.plain and s2.geometry.resize == "fit"
    assert calls["rate"] == 0.01
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert events == [{"event": "evaluated", "model": "candidate"}, {"event": "evaluated", "model": "active"}]
    # the daemon's rules: its 0-1 scale, and thresholds calibrated as daemon/references/manager.py does, floored
    assert calls["rules"].scale is scale_outputs
    head = SimpleNamespace(name="patchcore-head")
    image, pixel = calls["rules"].threshold(head, [0.1] * 400, [0.2] * 400, 0.01, "test")
    assert image == pixel == 0.5  # patchcore-head's declared threshold floor
    plain = SimpleNamespace(name="no-family")
    image, pixel = calls["rules"].threshold(plain, [0.1] * 400, [0.2] * 400, 0.01, "test")
    assert 0.1 < image < 0.11 and 0.2 < pixel < 0.21


def test_without_a_hook_the_default_measures_and_another_kind_active_is_the_base(monkeypatch):
    seen: dict = {}

    def default(learning, detector, models, sources, **kwargs):
        seen["models"] = dict(models)
        return {}

    monkeypatch.setattr("model.promotion.reference_holdout_metrics", default)
    spec = {**_spec(), "active": {"kind": "patchcore", "version": "base", "prompts": None}}
    learning = LabelLearning(source_inputs=None, fit=None, load=None, scorer=None)
    job.evaluate(learning, object(), "candidate weights", spec)
    assert seen["models"] == {"candidate": "candidate weights", "active": None}  # the base the labels improve on
    assert reference_holdout_metrics is not default
