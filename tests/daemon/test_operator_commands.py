"""Operator commands as a newcomer meets them: one config discovery rule, no accidental databases, exit codes,
and no torch/Alembic in the history commands (that is what makes them answer in well under a second)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.cli import main, split_config_option
from daemon.config import file as config_module  # where the config search lives
from daemon.config.settings import find_config

ROOT = Path(__file__).resolve().parents[2]


def write_config(directory: Path, db_name: str = "ops.db") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.toml"
    path.write_text(f'[database]\nurl = "sqlite:///var/{db_name}"\n[storage]\ndir = "var/artifacts"\n')
    return path


def create_database(config: Path, capsys=None) -> None:
    assert main(["db", "upgrade", "--config", str(config)]) == 0
    if capsys is not None:
        capsys.readouterr()


def run(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_find_config_order(tmp_path, monkeypatch):
    explicit, env, local, system = (write_config(tmp_path / name) for name in ("a", "b", "c", "d"))
    monkeypatch.setattr(config_module, "SYSTEM_CONFIG", system)
    cwd = local.parent
    assert find_config(str(explicit), {"ANOMALYD_CONFIG": str(env)}, cwd) == explicit
    assert find_config(None, {"ANOMALYD_CONFIG": str(env)}, cwd) == env
    assert find_config(None, {}, cwd) == cwd / "config.toml"
    assert find_config(None, {}, tmp_path) == system
    monkeypatch.setattr(config_module, "SYSTEM_CONFIG", tmp_path / "none.toml")
    assert find_config(None, {}, tmp_path) is None


def test_config_option_anywhere_on_the_command_line():
    for argv in (["--config", "x.toml", "models", "list"], ["models", "--config", "x.toml", "list"],
                 ["models", "list", "--config=x.toml"]):
        rest, config = split_config_option(argv)
        assert rest == ["models", "list"] and config == "x.toml"


def test_models_config_before_action_and_env_config(tmp_path, capsys, monkeypatch):
    config = write_config(tmp_path / "plant")
    create_database(config, capsys)
    code, out, err = run(capsys, "models", "--config", str(config), "list", "--json")
    assert code == 0, err
    assert json.loads(out) == []
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("ANOMALYD_CONFIG", str(config))
    code, out, err = run(capsys, "defects", "--json")
    assert code == 0, err
    assert json.loads(out) == []
    assert not (elsewhere / "var").exists()


def test_commands_other_than_run_and_db_upgrade_create_no_database(tmp_path, capsys, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    monkeypatch.delenv("ANOMALYD_CONFIG", raising=False)
    monkeypatch.setattr(config_module, "SYSTEM_CONFIG", tmp_path / "etc" / "config.toml")
    for argv in (["defects"], ["models", "list"], ["label", "1", "normal"], ["retrain"]):
        code, _, err = run(capsys, *argv)
        assert code == 1, (argv, err)
        assert "no database at" in err and str(empty / "config.toml") in err and "etc" in err, err
        assert "anomalyd db upgrade" in err
    assert list(empty.iterdir()) == []

    config = write_config(tmp_path / "plant")
    code, _, err = run(capsys, "defects", "--config", str(config))
    assert code == 1 and f"config {config} (from --config)" in err
    assert not (config.parent / "var").exists()


def test_label_of_unknown_inspection_is_a_runtime_failure(tmp_path, capsys):
    config = write_config(tmp_path / "plant")
    create_database(config, capsys)
    code, _, err = run(capsys, "label", "99999", "normal", "--config", str(config))
    assert code == 1 and "99999" in err
    code, _, _ = run(capsys, "label", "abc", "normal", "--config", str(config))
    assert code == 2  # usage: not a number


def test_history_commands_import_no_torch_and_print_no_alembic_chatter(tmp_path):
    config = write_config(tmp_path / "plant")
    # the shipped config's sections, [retraining] included (its validation once pulled in torch)
    shipped = (ROOT / "config.toml").read_text()
    config.write_text(shipped.replace('url = "sqlite:///var/anomalyd.db"', 'url = "sqlite:///var/ops.db"')
                      # sources of the kinds whose modules import cv2/redis/paho: validating them must not
                      + '\n[[sources]]\nid = "cam"\nkind = "rtsp"\nuri = "rtsp://127.0.0.1:1/x"\n'
                      + '\n[[sources]]\nid = "bus"\nkind = "mqtt"\nuri = "mqtt://127.0.0.1:1/cam/+"\n'
                      + '\n[[sources]]\nid = "stream"\nkind = "redis"\nuri = "redis://127.0.0.1:1/0"\n')
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "daemon.cli", "db", "upgrade", "--config", str(config)], env=env,
                   check=True, capture_output=True)
    probe = ("import sys; from daemon.cli import main; code = main(sys.argv[1:]); "
             "print('HEAVY', sorted(m for m in ('torch', 'alembic', 'open_clip', 'cv2', 'numpy', 'paho', 'redis') "
             "if m in sys.modules)); "
             "sys.exit(code)")
    for argv in (["defects"], ["models", "list"], ["tokens", "list"]):
        result = subprocess.run([sys.executable, "-c", probe, *argv, "--config", str(config)], env=env,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert "HEAVY []" in result.stdout, (argv, result.stdout)
        assert "alembic" not in result.stderr.lower(), result.stderr


@pytest.mark.parametrize("argv", [["defects", "--limit", "0"], ["models"]])
def test_usage_errors_exit_2(tmp_path, capsys, argv):
    config = write_config(tmp_path / "plant")
    create_database(config, capsys)
    code, _, _ = run(capsys, *argv, "--config", str(config))
    assert code == 2
