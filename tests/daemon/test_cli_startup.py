"""What the operator commands load (their start-up time is in bench/bench_cli.py, not asserted here).

Each one runs in a fresh interpreter, the way an operator runs it, and the test asserts on `sys.modules` and the
output: no torch, numpy, OpenCV, PIL, FastAPI, uvicorn, Alembic or retraining code; no pydantic (nor
pydantic-settings) for the history commands (they read [database] plainly: daemon.config.file) and no SQLAlchemy ORM; no SQLAlchemy on
the "no database at ..." path; only the command's own module of `daemon/commands/`; no Alembic log lines. And the
parser built for one command parses, helps and fails exactly like the whole one.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from daemon import cli

ROOT = Path(__file__).resolve().parents[2]

# Never needed to read the history, label, list models and tokens, or say that there is no database.
HEAVY = ("torch", "torchvision", "open_clip", "numpy", "cv2", "PIL", "sklearn", "fastapi", "starlette", "uvicorn",
         "pydantic_settings", "dotenv",
         "alembic", "prometheus_client", "paho", "redis", "asyncua", "httpx", "daemon.learning.retraining",
         "daemon.process.service", "daemon.frames.pipeline", "daemon.commands.model_commands", "daemon.commands.export_commands",
         "daemon.commands.reference_commands", "daemon.commands.config_commands")

# What validating the whole configuration (daemon.config.settings.Settings, a pydantic-settings BaseSettings) loads: the
# commands that need more than [database] (retrain, tokens) load it; the history commands never do.
SETTINGS = ("pydantic", "pydantic_settings", "dotenv")

# Runs the command lines given as JSON, in order, in this one interpreter; after each one it records the exit
# status, the output and which of the watched modules are loaded by then.
PROBE = r"""
import contextlib, gc, io, json, sys
from daemon.cli import main
watched = json.loads(sys.argv[2])
report = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
    report.append({"argv": argv, "code": code, "out": out.getvalue(), "err": err.getvalue(),
                   "loaded": sorted(m for m in watched if m in sys.modules), "gc": gc.isenabled()})
print(json.dumps(report))
"""


def probe(argvs: list[list[str]], cwd: Path, watched: tuple[str, ...]) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("ANOMALYD_CONFIG", None)
    result = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argvs), json.dumps(watched)], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "alembic" not in result.stderr.lower() and " INFO " not in result.stderr, result.stderr
    return json.loads(result.stdout)


@pytest.fixture
def plant(tmp_path) -> Path:
    """A config with the shipped sections (its [retraining] cron schedule once pulled in SQLAlchemy)
    and a migrated database holding one inspection."""
    config = tmp_path / "plant" / "config.toml"
    config.parent.mkdir()
    shipped = (ROOT / "config.toml").read_text()
    assert 'url = "sqlite:///var/anomalyd.db"' in shipped and 'schedule = "' in shipped
    config.write_text(shipped.replace('url = "sqlite:///var/anomalyd.db"', 'url = "sqlite:///var/ops.db"'))
    from datetime import datetime, timezone

    from adapters.db import Inspection, make_engine, make_session_factory, upgrade
    from daemon.config.settings import load_config

    engine = make_engine(load_config(config, environ={}).database_url)
    upgrade(engine)
    with make_session_factory(engine)() as session, session.begin():
        session.add(Inspection(frame_id="f1", source="cam1", line="l1", model_version="v1", score=0.9, threshold=0.5,
                               is_anomalous=True, captured_at=datetime(2024, 5, 1, tzinfo=timezone.utc)))
    engine.dispose()
    return config


def test_no_database_path_imports_no_sqlalchemy(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    argvs = [["defects"], ["defects", "--since", "24h", "--json"], ["label", "1", "normal"], ["models", "list"],
             ["stats", "--bucket", "15m"], ["retrain"]]
    report = probe(argvs, empty, (*HEAVY, "sqlalchemy", "pydantic"))
    for entry in report:
        assert entry["code"] == 1 and "no database at" in entry["err"], entry
        assert entry["loaded"] == ([] if entry["argv"][0] != "retrain" else sorted(SETTINGS)), entry
    assert list(empty.iterdir()) == []  # and no database was made


def test_operator_commands_load_only_what_they_need(plant):
    config = str(plant)
    argvs = [["defects", "--config", config], ["label", "1", "normal", "--author", "probe", "--config", config],
             ["defects", "--all", "--json", "--limit", "1", "--config", config],
             ["models", "list", "--config", config], ["models", "list", "--json", "--config", config],
             ["stats", "--since", "2024-04-30T00:00:00Z", "--until", "2024-05-02T00:00:00Z", "--json",
              "--config", config],
             ["tokens", "list", "--config", config], ["defects", "--limit", "0", "--config", config]]
    report = probe(argvs, plant.parent, (*HEAVY, "sqlalchemy", "sqlalchemy.orm", "pydantic"))
    by_command = {" ".join(entry["argv"][:2]): entry for entry in report}
    for entry in report[:-1]:
        assert entry["code"] == 0, entry
        if entry["argv"][0] == "tokens":  # the token commands validate the configuration and open no database
            assert set(entry["loaded"]) <= {"sqlalchemy", *SETTINGS}, entry
        else:  # the history commands read [database] without the validation models (daemon.config.file) and
            # the history with SQLAlchemy Core (adapters.db.history), not the ORM
            assert entry["loaded"] == ["sqlalchemy"], entry  # (the probe sees imports: SQLAlchemy is there)
    assert report[-1]["code"] == 2 and "--limit" in report[-1]["err"]  # a usage error, still nothing heavy
    assert set(report[-1]["loaded"]) <= {"sqlalchemy", "sqlalchemy.orm", *SETTINGS}
    assert "cam1" in report[0]["out"] and "0.900" in report[0]["out"]
    assert json.loads(by_command["defects --all"]["out"])[0]["label"]["label"] == "normal"
    assert "inspection 1 labelled normal by probe" in report[1]["out"]
    assert json.loads(report[4]["out"]) == []
    assert json.loads(report[5]["out"])["total"]["inspections"] == 1
    # the cyclic GC is off only while a short-lived command runs, and back on when main() returns
    assert all(entry["gc"] for entry in report)


def test_tokens_list_imports_no_sqlalchemy(plant):
    report = probe([["tokens", "list", "--config", str(plant)]], plant.parent, (*HEAVY, "sqlalchemy"))
    assert report[0]["code"] == 0 and "no API tokens" in report[0]["out"]
    assert set(report[0]["loaded"]) <= set(SETTINGS), report[0]  # the whole configuration is validated


def test_command_owners_match_what_the_modules_register():
    owners: dict[str, str] = {}
    for module_name in cli.COMMAND_MODULES:
        subparsers = argparse.ArgumentParser().add_subparsers()
        __import__(module_name, fromlist=["register"]).register(subparsers)
        owners.update(dict.fromkeys(subparsers.choices, module_name))
    assert owners == cli.COMMAND_OWNERS


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[object, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            namespace = parser.parse_args(argv)
            code: object = sorted((k, repr(v)) for k, v in vars(namespace).items())
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("command", sorted(cli.COMMAND_OWNERS))
def test_one_command_parser_behaves_like_the_whole_one(command):
    full = cli.build_parser()
    for argv in ([command, "--help"], [command, "--no-such-option"], [command]):
        assert _parse(cli.build_parser(command), argv) == _parse(full, argv), argv


def test_command_named():
    assert cli.command_named(["defects", "--json"]) == "defects"
    assert cli.command_named(["-v", "--verbose", "-vv", "models", "list"]) == "models"
    assert cli.command_named(["--help", "defects"]) is None  # top-level help lists every command
    assert cli.command_named(["defect"]) is None  # a typo gets the whole parser's "invalid choice" message
    assert cli.command_named([]) is None


def test_config_sections_keep_their_case_insensitive_names(tmp_path):
    """Section names match case-insensitively (pydantic-settings' TOML source), and an unknown key is still an
    error naming it."""
    from daemon.config.settings import ConfigError, load_config

    path = tmp_path / "config.toml"
    path.write_text('[MQTT]\nhost = "broker.plant"\n[Runtime]\nmax_batch_size = 3\n')
    settings = load_config(path, environ={})
    assert settings.mqtt.host == "broker.plant" and settings.runtime.max_batch_size == 3
    path.write_text('[mqtt]\nhots = "x"\n')
    with pytest.raises(ConfigError, match=r"unknown key \[mqtt\]\.hots"):
        load_config(path, environ={})
    path.write_text('BASE_DIR = "/elsewhere"\n')
    with pytest.raises(ConfigError, match="unknown key BASE_DIR"):
        load_config(path, environ={})


def test_python_dash_m_exits_like_the_console_script(tmp_path):
    """`python -m daemon.cli` once ran a second copy of the module whose UsageError did not catch the commands'
    (they import `daemon.cli`): a usage error exited 1 instead of 2."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("ANOMALYD_CONFIG", None)
    result = subprocess.run([sys.executable, "-m", "daemon.cli", "defects", "--limit", "0"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--limit must be between 1 and 1000" in result.stderr, result.stderr
    assert result.stderr.startswith("usage: anomalyd")
