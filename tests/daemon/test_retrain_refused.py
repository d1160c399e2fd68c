"""Retraining requests that cannot train are refused up front with the reason: 409 from `POST /api/retrain` (the
UI shows the detail), a usage error from `anomalyd retrain --now`; no run is started or recorded.

- `patchcore` (and `patchcore-head`) retrain a head from labelled defects: refused while fewer than
  MIN_LABELLED_DEFECTS frames are labelled anomalous, with how many are there and how many are needed;
- a family with nothing to learn and no head (`mutual`) is refused whatever the labels.

A run that starts and then fails is recorded, and its reason shows in the Models page data (`GET /api/models`,
`runs`) and in `anomalyd models list`."""

from __future__ import annotations

from sqlalchemy import select

from adapters.db import TrainingRun
from daemon.learning.head_retraining import MIN_LABELLED_DEFECTS, make_retrainer
from tests.daemon.test_api import FakeRetrainer, auth, sqlite_env  # noqa: F401  (the fixture)


def _with_model(env, name: str) -> None:
    env.state.settings = env.state.settings.model_copy(
        update={"model": env.state.settings.model.model_copy(update={"name": name})})


def _cli(tmp_path, capsys, model: str, *argv: str) -> tuple[int, str, str]:
    from daemon.cli import main

    config = tmp_path / "config.toml"
    config.write_text(f'[model]\nname = "{model}"\n[database]\nurl = "sqlite:///{tmp_path}/api.db"\n'
                      f'[storage]\ndir = "{tmp_path}/artifacts"\n')
    try:
        code = main([*argv, "--config", str(config)])
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_retraining_patchcore_needs_labelled_defects(sqlite_env, tmp_path, capsys):  # noqa: F811
    env = sqlite_env
    _with_model(env, "patchcore")
    retrainer = FakeRetrainer()
    env.state.retrainer = retrainer
    response = env.client.post("/api/retrain", headers=auth("admin"))
    assert response.status_code == 409
    assert f"0 frame(s) labelled anomalous, at least {MIN_LABELLED_DEFECTS} needed" in response.json()["detail"]

    code, _, err = _cli(tmp_path, capsys, "patchcore", "retrain", "--now")
    assert code == 2 and f"at least {MIN_LABELLED_DEFECTS} needed" in err

    rows = [env.add() for _ in range(MIN_LABELLED_DEFECTS)]
    for row in rows[:-1]:
        env.label(row, "anomalous")
    env.label(rows[-1], "normal")  # a normal does not count
    detail = env.client.post("/api/retrain", headers=auth("admin")).json()["detail"]
    assert f"{MIN_LABELLED_DEFECTS - 1} frame(s) labelled anomalous" in detail and "label 1 more" in detail
    assert retrainer.triggers == []
    with env.sessions() as session:
        assert session.scalars(select(TrainingRun)).all() == []

    env.label(rows[-1], "anomalous")  # the newest label counts
    response = env.client.post("/api/retrain", headers=auth("admin"))
    assert response.status_code == 202 and retrainer.triggers == ["api"]


def test_a_family_with_nothing_to_learn_is_refused(sqlite_env, tmp_path, capsys):  # noqa: F811
    env = sqlite_env
    _with_model(env, "mutual")
    env.state.retrainer = FakeRetrainer()
    for _ in range(MIN_LABELLED_DEFECTS):
        env.label(env.add(), "anomalous")
    response = env.client.post("/api/retrain", headers=auth("admin"))
    assert response.status_code == 409 and "'mutual' has nothing to learn" in response.json()["detail"]
    code, _, err = _cli(tmp_path, capsys, "mutual", "retrain", "--now")
    assert code == 2 and "nothing to learn" in err


def test_a_failed_head_run_shows_in_the_models_data_and_cli(sqlite_env, tmp_path, capsys):  # noqa: F811
    """Enough labelled defects, but their source has no references: the run fails, with the reason."""
    env = sqlite_env
    _with_model(env, "patchcore")
    for _ in range(MIN_LABELLED_DEFECTS):
        env.label(env.add(artifacts=True), "anomalous")
    settings = env.state.settings.model_copy(update={"storage": env.state.settings.storage.model_copy(
        update={"dir": str(env.store.root)})})
    outcome = make_retrainer(settings, env.sessions).run(trigger="api")
    assert outcome.status == "failed" and "has 2 or more references" in outcome.reason, outcome

    runs = env.client.get("/api/models", headers=auth("viewer")).json()["runs"]
    assert [(r["id"], r["status"]) for r in runs] == [(outcome.run_id, "failed")]
    assert "failed: no source of the labelled frames (cam1) has 2 or more references" in runs[0]["reason"]
    assert runs[0]["candidate_version"] is None

    code, out, err = _cli(tmp_path, capsys, "patchcore", "models", "list")
    assert code == 0, err
    assert f"run #{outcome.run_id} failed" in out and "no source of the labelled frames (cam1)" in out
