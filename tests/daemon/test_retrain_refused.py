"""Retraining a family with nothing to learn (PatchCore: built from its references) is refused up front with the
reason: 409 from `POST /api/retrain` (the UI shows the detail), a usage error from `anomalyd retrain --now`; no run
is started or recorded."""

from __future__ import annotations

from sqlalchemy import select

from adapters.db import TrainingRun
from tests.daemon.test_api import FakeRetrainer, auth, sqlite_env  # noqa: F401  (the fixture)


def test_retraining_patchcore_is_refused_with_the_reason(sqlite_env, tmp_path, capsys):  # noqa: F811
    env = sqlite_env
    env.state.settings = env.state.settings.model_copy(
        update={"model": env.state.settings.model.model_copy(update={"name": "patchcore"})})
    retrainer = FakeRetrainer()
    env.state.retrainer = retrainer
    response = env.client.post("/api/retrain", headers=auth("admin"))
    assert response.status_code == 409 and "'patchcore' has nothing to learn" in response.json()["detail"]
    assert retrainer.triggers == []
    with env.sessions() as session:
        assert session.scalars(select(TrainingRun)).all() == []

    from daemon.cli import main

    config = tmp_path / "config.toml"
    config.write_text(f'[model]\nname = "patchcore"\n[database]\nurl = "sqlite:///{tmp_path}/api.db"\n')
    try:
        code = main(["retrain", "--now", "--config", str(config)])
    except SystemExit as exc:
        code = exc.code
    assert code == 2 and "nothing to learn" in capsys.readouterr().err
