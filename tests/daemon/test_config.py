"""Configuration: shipped file, unknown keys named, bad types, environment overrides, secrets from files."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.config.settings import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_shipped_config_loads_with_contract_values():
    settings = load_config(REPO / "config.toml", environ={})
    assert settings.model.name == "anomalyclip" and settings.model.backbone == "ViT-L-14-336"
    assert settings.database_url == f"sqlite:///{REPO / 'var' / 'anomalyd.db'}"
    assert settings.sources[0].kind == "folder"
    assert settings.sources[0].source_spec(settings.base_dir)["uri"] == str(REPO / "var" / "inbox")
    assert (settings.mqtt.host, settings.mqtt.port, settings.mqtt.prefix) == ("localhost", 1883, "anomalyd")
    assert settings.resolve(settings.storage.dir) == REPO / "var" / "artifacts"


def test_unknown_key_is_named(tmp_path):
    path = write(tmp_path, '[mqtt]\nhots = "broker"\n')
    with pytest.raises(ConfigError) as error:
        load_config(path, environ={})
    assert f"{path}: unknown key [mqtt].hots" in str(error.value)


def test_unknown_key_in_source_and_top_level(tmp_path):
    path = write(tmp_path, 'colour = 1\n[[sources]]\nid = "a"\nkind = "folder"\nurl_typo = 3\n')
    with pytest.raises(ConfigError) as error:
        load_config(path, environ={})
    assert "unknown key colour" in str(error.value)
    assert "unknown key [[sources]][0].url_typo" in str(error.value)


def test_bad_type_names_key_and_value(tmp_path):
    path = write(tmp_path, '[runtime]\nmax_batch_size = "many"\n[[sources]]\nid = "a"\nkind = "webcam"\n')
    with pytest.raises(ConfigError) as error:
        load_config(path, environ={})
    text = str(error.value)
    assert "[runtime].max_batch_size" in text and "'many'" in text
    assert "[[sources]][0].kind" in text and "'webcam'" in text


def test_environment_overrides_file(tmp_path):
    path = write(tmp_path, '[mqtt]\nhost = "file-host"\nport = 1884\n[runtime]\nmax_batch_size = 4\n')
    env = {"ANOMALYD_MQTT__HOST": "env-host", "ANOMALYD_RUNTIME__MAX_BATCH_SIZE": "16",
           "ANOMALYD_SOURCES": '[{"id": "cam", "kind": "folder", "uri": "in"}]'}
    settings = load_config(path, environ=env)
    assert settings.mqtt.host == "env-host"
    assert settings.mqtt.port == 1884
    assert settings.runtime.max_batch_size == 16
    assert [s.id for s in settings.sources] == ["cam"]


def test_unknown_environment_key_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key \[mqtt\]\.hots"):
        load_config(write(tmp_path, ""), environ={"ANOMALYD_MQTT__HOTS": "x"})


def test_secrets_from_files_are_secret(tmp_path):
    (tmp_path / "mqtt_pw").write_text("s3cret\n")
    (tmp_path / "db_url").write_text("postgresql+psycopg://u:p@db/x\n")
    path = write(tmp_path, '[mqtt]\npassword_file = "mqtt_pw"\n[database]\nurl_file = "db_url"\n'
                           '[[api.tokens]]\nname = "ops"\nrole = "operator"\ntoken = "tok"\n')
    settings = load_config(path, environ={})
    assert settings.mqtt.password.get_secret_value() == "s3cret"
    assert settings.database_url == "postgresql+psycopg://u:p@db/x"
    assert "s3cret" not in repr(settings) and "u:p@" not in repr(settings)
    assert settings.api.tokens[0].matches("tok") and not settings.api.tokens[0].matches("other")


def test_missing_secret_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"\[mqtt\]\.password_file: cannot read secret file .*nope"):
        load_config(write(tmp_path, '[mqtt]\npassword_file = "nope"\n'), environ={})


def test_source_options_and_duplicates(tmp_path):
    path = write(tmp_path, '[[sources]]\nid = "a"\nkind = "folder"\nuri = "in"\nsettle_s = 0.1\n'
                           '[[sources]]\nid = "a"\nkind = "video"\n')
    with pytest.raises(ConfigError, match="duplicate source id 'a'"):
        load_config(path, environ={})
    settings = load_config(write(tmp_path, '[[sources]]\nid = "a"\nkind = "folder"\nuri = "in"\nsettle_s = 0.1\n'),
                           environ={})
    assert settings.sources[0].options == {"settle_s": 0.1}


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="no such configuration file"):
        load_config(tmp_path / "absent.toml", environ={})
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[mqtt\n"), environ={})


def test_other_anomalyd_variables_are_not_configuration(tmp_path):
    """ANOMALYD_CACHE and friends configure other parts of the tool; only <SECTION>__<KEY> names are config."""
    from daemon.config.settings import ConfigError, load_config

    settings = load_config(None, environ={"ANOMALYD_CACHE": "/tmp/x", "ANOMALYD_CONFIG": "c.toml",
                                          "ANOMALYD_MQTT__PORT": "1999"})
    assert settings.mqtt.port == 1999
    with pytest.raises(ConfigError, match="mqtt_host"):
        load_config(None, environ={"ANOMALYD_MQTT_HOST": "broker"})


def test_pipeline_options_default_to_the_configuration_defaults():
    """One source of truth: the pipeline's own defaults are what an empty config gives (decode budget included)."""
    from daemon.config.settings import load_config
    from daemon.frames.record import PipelineOptions

    assert PipelineOptions() == PipelineOptions.from_settings(load_config(None, environ={}))
    assert PipelineOptions().decode_budget_bytes == 512 << 20
