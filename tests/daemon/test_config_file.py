"""The operator commands' plain reading of [database] (`daemon.config.file.database_options`, no pydantic) against
the validated configuration (`daemon.config.settings.load_config`): same database whenever it answers, and every mistake
it cannot judge left to the full validation and its messages."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.config.file import (
    DATABASE_DEFAULTS,
    SECTIONS,
    ConfigError,
    DatabaseOptions,
    database_options,
    read_config_data,
)
from daemon.config.settings import DatabaseConfig, Settings, load_config
from tests.daemon.test_ops_cli import run


def test_plain_reading_knows_the_validated_sections_keys_and_defaults():
    assert set(SECTIONS) == set(Settings.model_fields) - {"base_dir"}
    assert set(DATABASE_DEFAULTS) == set(DatabaseConfig.model_fields)
    defaults = DatabaseConfig()
    assert {"url": defaults.url.get_secret_value(), "url_file": defaults.url_file,
                                 "echo": defaults.echo, "pool_size": defaults.pool_size} == DATABASE_DEFAULTS


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


URLS = st.sampled_from(["sqlite:///var/a.db", "sqlite:////abs/b.db", "sqlite://", "sqlite:///rel/../c.db?x=1",
                        "postgresql+psycopg://u:p@127.0.0.1:5/db"])
VALUES = {
    "url": st.one_of(URLS, st.integers(-2, 2)),
    "url_file": st.sampled_from(["secret.txt", "missing.txt", 3]),
    "echo": st.one_of(st.booleans(), st.sampled_from(["true", "no", 1, 0])),
    "pool_size": st.one_of(st.integers(-1, 40), st.sampled_from(["7", 2.0, True, "x"])),
    "pool": st.integers(1, 3),  # not a key of [database]
}
TABLES = st.dictionaries(st.sampled_from(sorted(VALUES)), st.none(), max_size=4).flatmap(
    lambda keys: st.fixed_dictionaries({key: VALUES[key] for key in keys}))
OTHER = st.sampled_from(["", '[mqtt]\nport = 1884\n', '[MQTT]\nhost = "b"\n', '[Database]\necho = true\n',
                         '[databse]\nurl = "sqlite:///x.db"\n', 'pool_size = 3\n'])
ENVIRONS = st.sampled_from([{}, {"ANOMALYD_DATABASE__POOL_SIZE": "9"}, {"ANOMALYD_DATABASE__URL": "sqlite:///e.db"},
                            {"ANOMALYD_DATABASE__ECHO": "maybe"}, {"ANOMALYD_DATABASE": '{"echo": true}'}])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(table=TABLES, other=OTHER, environ=ENVIRONS)
def test_plain_reading_agrees_with_validation_or_leaves_it_to_validation(tmp_path, table, other, environ):
    (tmp_path / "secret.txt").write_text("sqlite:///from-file.db\n")
    path = tmp_path / "config.toml"
    body = "".join(f"{key} = {toml_value(value)}\n" for key, value in table.items())
    path.write_text(("[database]\n" + body if table else "") + other)
    try:
        expected = load_config(path, environ=environ).database_options()
    except ConfigError:
        expected = None
    try:
        plain = database_options(read_config_data(path, environ=environ))
    except ConfigError:  # the file or a secret file could not be read: load_config said so too
        assert expected is None
        return
    if plain is not None:  # the only section looked at is [database]: when it answers, it is the validated answer
        assert plain == expected


@pytest.mark.parametrize(("text", "environ"), [
    ("", {}),
    ('[database]\nurl = "sqlite:///var/a.db"\necho = true\npool_size = 2\n[mqtt]\nport = 1884\n', {}),
    ('[DATABASE]\nurl = "postgresql+psycopg://u:p@127.0.0.1:5/db"\n', {"ANOMALYD_DATABASE__POOL_SIZE": "9"}),
    ("[[sources]]\nid = 'a'\nkind = 'folder'\n", {"ANOMALYD_DATABASE": '{"echo": true}'}),
])
def test_a_plainly_valid_database_section_is_read_without_the_validation(tmp_path, text, environ):
    path = tmp_path / "config.toml"
    path.write_text(text)
    plain = database_options(read_config_data(path, environ=environ))
    assert plain is not None and plain == load_config(path, environ=environ).database_options()


def test_relative_sqlite_path_and_secret_file_resolve_like_the_validated_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plant = tmp_path / "plant"
    plant.mkdir()
    (plant / "db-url").write_text("sqlite:///var/from-secret.db\n")
    path = plant / "config.toml"
    path.write_text('[database]\nurl_file = "db-url"\npool_size = 3\n')
    plain = database_options(read_config_data(path, environ={}))
    assert plain == DatabaseOptions(f"sqlite:///{plant / 'var' / 'from-secret.db'}", False, 3)
    assert plain == load_config(path, environ={}).database_options()


def test_operator_commands_still_report_every_database_mistake_the_validation_finds(tmp_path, capsys):
    path = tmp_path / "config.toml"
    for text, message in [('[database]\npool_size = 0\n', r"\[database\]\.pool_size"),
                          ('[database]\npool = 2\n', r"unknown key \[database\]\.pool"),
                          ('[databse]\nurl = "sqlite:///x.db"\n', "unknown key databse"),
                          ('[database]\nurl_file = "nowhere"\n', "cannot read secret file")]:
        path.write_text(text)
        for argv in (["defects"], ["stats"], ["models", "list"], ["label", "1", "normal"]):
            code, _, err = run(capsys, *argv, "--config", str(path))
            assert code == 2, (text, argv, err)
            assert re.search(message, err), (text, argv, err)
    assert not (tmp_path / "x.db").exists() and not (tmp_path / "var").exists()


def test_history_commands_read_the_database_despite_a_broken_unrelated_section(tmp_path, capsys):
    """`anomalyd defects` needs [database] only: a mistake in [mqtt] is for `anomalyd config check` and `run`
    to report, not a reason to refuse an operator the history."""
    path = tmp_path / "config.toml"
    path.write_text('[database]\nurl = "sqlite:///var/h.db"\n')
    assert run(capsys, "db", "upgrade", "--config", str(path))[0] == 0
    path.write_text('[database]\nurl = "sqlite:///var/h.db"\n[mqtt]\nport = "not a port"\n')
    code, out, err = run(capsys, "defects", "--config", str(path))
    assert code == 0 and "(no inspections match)" in out, err
    code, _, err = run(capsys, "config", "check", "--config", str(path))
    assert code != 0 and "[mqtt].port" in err
    assert Path(tmp_path / "var" / "h.db").is_file()
