"""The configuration's sources beyond the TOML file and the environment: `.env`, the secrets directory (systemd's
LoadCredential=, Docker's /run/secrets), their precedence, and that the environment and the file say the same."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.config.settings import ConfigError, load_config
from tests.daemon.test_ops_cli import run


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_dotenv_is_read_below_the_environment_and_above_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = write(tmp_path / "config.toml", '[mqtt]\nhost = "file"\nport = 1884\n[runtime]\nmax_batch_size = 4\n')
    write(tmp_path / ".env", "# the plant's overrides\nANOMALYD_MQTT__HOST=dotenv\nexport ANOMALYD_RUNTIME__MAX_BATCH_SIZE=6\n"
                             "ANOMALYD_MODEL__LAYERS=[6, 12]\nPOSTGRES_PASSWORD=not-ours\nANOMALYD_CACHE=/elsewhere\n")
    settings = load_config(config, environ={})
    assert (settings.mqtt.host, settings.mqtt.port) == ("dotenv", 1884)
    assert settings.runtime.max_batch_size == 6 and settings.model.layers == [6, 12]
    settings = load_config(config, environ={"ANOMALYD_MQTT__HOST": "environment"})
    assert settings.mqtt.host == "environment" and settings.runtime.max_batch_size == 6

    write(tmp_path / ".env", "ANOMALYD_MQTT__HOTS=x\n")
    with pytest.raises(ConfigError, match=r"^\.env: ANOMALYD_MQTT__HOTS: unknown key \[mqtt\]\.hots$"):
        load_config(config, environ={})


def test_secrets_directory_below_the_file_and_unknown_names_named(tmp_path):
    secrets = tmp_path / "credentials"
    secrets.mkdir()
    write(secrets / "anomalyd_database__url", "postgresql+psycopg://u:s3cret@db/x\n")
    write(secrets / "ANOMALYD_MQTT__PASSWORD", "mqtt-pw\n")
    write(secrets / "db_password", "another program's secret")
    config = write(tmp_path / "config.toml", '[mqtt]\nusername = "u"\n')
    for variable in ("ANOMALYD_SECRETS_DIR", "CREDENTIALS_DIRECTORY"):
        settings = load_config(config, environ={variable: str(secrets)})
        assert settings.database_url == "postgresql+psycopg://u:s3cret@db/x"
        assert settings.mqtt.password.get_secret_value() == "mqtt-pw" and settings.mqtt.username == "u"
        assert "s3cret" not in repr(settings) and "mqtt-pw" not in repr(settings)
    # the file, the environment and .env win over the secrets directory
    write(config, '[database]\nurl = "sqlite:///var/file.db"\n')
    settings = load_config(config, environ={"ANOMALYD_SECRETS_DIR": str(secrets),
                                            "ANOMALYD_MQTT__PASSWORD": "from-env"})
    assert settings.database_url == f"sqlite:///{tmp_path / 'var' / 'file.db'}"
    assert settings.mqtt.password.get_secret_value() == "from-env"

    write(secrets / "anomalyd_database__pool", "3")
    with pytest.raises(ConfigError) as error:
        load_config(config, environ={"ANOMALYD_SECRETS_DIR": str(secrets)})
    assert str(error.value) == f"secret file {secrets / 'anomalyd_database__pool'}: unknown key [database].pool"
    with pytest.raises(ConfigError, match=r"secrets directory .*nowhere: not a directory"):
        load_config(config, environ={"ANOMALYD_SECRETS_DIR": str(tmp_path / "nowhere")})


def test_history_commands_find_the_database_in_dotenv_and_secrets(tmp_path, monkeypatch, capsys):
    """The history commands' fast read of [database] knows only the file and the environment: a database given in
    `.env` or the secrets directory must still be the one they open, not the file's."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ANOMALYD_CONFIG", raising=False)
    config = write(tmp_path / "config.toml", '[database]\nurl = "sqlite:///var/file.db"\n')
    write(tmp_path / ".env", f"ANOMALYD_DATABASE__URL=sqlite:///{tmp_path / 'dotenv.db'}\n")
    assert run(capsys, "db", "upgrade", "--config", str(config))[0] == 0
    code, out, err = run(capsys, "defects", "--config", str(config))
    assert code == 0 and "(no inspections match)" in out, err
    assert (tmp_path / "dotenv.db").is_file() and not (tmp_path / "var").exists()

    (tmp_path / ".env").unlink()
    write(config, "")  # the file's own URL would win over the secrets directory
    secrets = tmp_path / "credentials"
    secrets.mkdir()
    write(secrets / "anomalyd_database__url", f"sqlite:///{tmp_path / 'secret.db'}")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(secrets))
    code, _, err = run(capsys, "stats", "--config", str(config))
    assert code == 1 and f"no database at {tmp_path / 'secret.db'}" in err


# --- the environment and the file give the same Settings ----------------------------------------------------------

TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12).filter(
    lambda text: text != "null")  # `null` in the environment is None
FIELDS = {
    "runtime": {"max_batch_size": st.integers(1, 1024), "max_batch_delay_ms": st.floats(0, 60_000),
                "dtype": st.sampled_from(["float32", "bfloat16", "float16"]), "live_share": st.floats(0.01, 0.99)},
    "mqtt": {"host": TEXT, "port": st.integers(1, 65535), "publish_inspections": st.booleans(),
             "keepalive": st.integers(5, 3600), "command_max_age_s": st.floats(1, 3600)},
    "model": {"layers": st.lists(st.integers(1, 24), min_size=1, max_size=4), "class_name": TEXT,
              "false_reject_rate": st.floats(0, 0.5)},
    "storage": {"save_frames": st.booleans(), "retention_days": st.integers(0, 3650), "dir": TEXT},
    "database": {"pool_size": st.integers(1, 50), "echo": st.booleans()},
}
SECTIONS = st.fixed_dictionaries({
    section: st.dictionaries(st.sampled_from(sorted(keys)), st.none(), max_size=len(keys)).flatmap(
        lambda chosen, keys=keys: st.fixed_dictionaries({key: keys[key] for key in chosen}))
    for section, keys in FIELDS.items()})
SOURCES = st.lists(st.fixed_dictionaries({"id": st.from_regex(r"[a-z][a-z0-9]{0,6}", fullmatch=True),
                                          "kind": st.just("folder"), "uri": TEXT}),
                   max_size=2, unique_by=lambda source: source["id"])


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, str):
        escaped = (f"\\{char}" if char in '"\\' else f"\\u{ord(char):04x}" if ord(char) < 0x20 or ord(char) == 0x7F
                   else char for char in value)
        return '"' + "".join(escaped) + '"'
    return repr(value)


def env_value(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value) if isinstance(value, bool | list) else repr(value)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sections=SECTIONS, sources=SOURCES, as_json=st.sets(st.sampled_from(sorted(FIELDS))))
def test_environment_and_toml_give_the_same_settings(tmp_path, sections, sources, as_json):
    """Each value written in config.toml, or as `ANOMALYD_<SECTION>__<KEY>` (or `ANOMALYD_<SECTION>` holding a
    JSON table, for the sections in `as_json`), gives the same Settings."""
    toml = "".join("[[sources]]\n" + "".join(f"{key} = {toml_value(value)}\n" for key, value in source.items())
                   for source in sources)
    environ = {"ANOMALYD_SOURCES": json.dumps(sources)} if sources else {}
    for section, table in sections.items():
        if not table:
            continue
        toml += f"[{section}]\n" + "".join(f"{key} = {toml_value(value)}\n" for key, value in table.items())
        if section in as_json:
            environ[f"ANOMALYD_{section.upper()}"] = json.dumps(table)
        else:
            environ.update({f"ANOMALYD_{section.upper()}__{key.upper()}": env_value(value)
                            for key, value in table.items()})
    from_file = load_config(write(tmp_path / "config.toml", toml), environ={})
    from_environment = load_config(write(tmp_path / "empty.toml", ""), environ=environ)
    assert from_environment.model_dump() == from_file.model_dump()
    assert from_environment.database_options() == from_file.database_options()
    for section, table in sections.items():
        for key, value in table.items():  # and the values are the ones written (not defaults on both sides)
            assert getattr(getattr(from_file, section), key) == value
