"""Reading the configuration's sources without validating them: finding the file (`find_config`), the TOML, the
`ANOMALYD_<SECTION>__<KEY>` environment overrides, secrets given as files, relative SQLite paths.

`daemon.config.load_config` validates the result with pydantic. This module imports no pydantic, so that the
operator commands that only need the database (`defects`, `label`, `models list`, `stats`) can read `[database]`
with `database_options` and answer without paying for the validation models (two thirds of a second on a slow
machine; see bench/bench_cli.py). Anything they cannot read plainly is left to `load_config` and its messages.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ENV_PREFIX = "ANOMALYD_"
ENV_DELIMITER = "__"
# The top-level sections of `daemon.config.Settings` (a test keeps the two the same).
SECTIONS = ("model", "runtime", "sources", "mqtt", "database", "storage", "api", "retraining", "redis", "webhooks",
            "opcua")
# [database]'s keys and defaults, shared with `daemon.config.DatabaseConfig`.
DATABASE_DEFAULTS: dict[str, Any] = {"url": "sqlite:///var/anomalyd.db", "url_file": None, "echo": False,
                                     "pool_size": 5}


class ConfigError(ValueError):
    """An unusable configuration; the message names the file and every bad key."""



def _read_secret_file(value: str | None, base_dir: Path | None, key: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{key}: expected the path of a file holding the secret, not {value!r}")
    path = Path(value)
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ValueError(f"{key}: cannot read secret file {path}: {exc.strerror or exc}") from exc



def resolve_sqlite_url(url: str, base_dir: Path) -> str:
    """`sqlite:///var/x.db` (relative) → `sqlite:////abs/base/var/x.db`; other URLs unchanged."""
    prefix = "sqlite:///"
    if not url.startswith(prefix) or url == "sqlite://" or url.startswith("sqlite:///:memory:"):
        return url
    path_part, sep, query = url[len(prefix):].partition("?")
    if not path_part or path_part.startswith("/"):
        return url
    absolute = (base_dir / path_part).resolve()
    return f"{prefix}{absolute}{sep}{query}"



def _parse_env_value(raw: str) -> Any:
    text = raw.strip()
    if text[:1] in "[{" or text in ("true", "false", "null") or _looks_numeric(text):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return raw
    return raw


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """`ANOMALYD_MQTT__HOST=x` → {"mqtt": {"host": "x"}}; keys are lower-cased.

    Only `ANOMALYD_<SECTION>__<KEY>` (and `ANOMALYD_<SECTION>` with a JSON value) names are configuration; other `ANOMALYD_*` variables belong to other parts
    of the tool (ANOMALYD_CACHE: the weights cache) and are left alone, unless they look like a section with a
    single underscore (`ANOMALYD_MQTT_HOST`), which is reported as an unknown key rather than silently ignored.
    """
    sections = (*SECTIONS, "base_dir")  # base_dir: an unknown key, reported as such by load_config
    section_prefixes = tuple(f"{name}_" for name in sections)
    tree: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.upper().startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX):].lower()
        if ENV_DELIMITER not in rest and rest not in sections and not rest.startswith(section_prefixes):
            continue
        parts = [part.lower() for part in name[len(ENV_PREFIX):].split(ENV_DELIMITER)]
        if not all(parts):
            continue
        node = tree
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                break
            node = child
        else:
            node[parts[-1]] = _parse_env_value(raw)
    return tree


def _deep_merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _deep_merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged



def _resolve_secret_files(data: dict[str, Any], base_dir: Path) -> None:
    """`<key>_file` entries → the secret they point at (a value given directly wins over the file)."""
    pairs = (("mqtt", "password"), ("mqtt", "command_secret"), ("database", "url"), ("redis", "url"))
    for section, key in pairs:
        table = data.get(section)
        if isinstance(table, dict) and table.get(f"{key}_file") and table.get(key) is None:
            table[key] = _read_secret_file(table[f"{key}_file"], base_dir, f"[{section}].{key}_file")
    api = data.get("api")
    if isinstance(api, dict):
        for index, token in enumerate(api.get("tokens") or []):
            if isinstance(token, dict) and token.get("token_file") and token.get("token") is None:
                token["token"] = _read_secret_file(token["token_file"], base_dir, f"[[api.tokens]][{index}].token_file")
    for index, hook in enumerate(data.get("webhooks") or []):
        if isinstance(hook, dict) and hook.get("secret_file") and hook.get("secret") is None:
            hook["secret"] = _read_secret_file(hook["secret_file"], base_dir, f"[[webhooks]][{index}].secret_file")
    opcua = data.get("opcua")
    if isinstance(opcua, dict):
        for index, user in enumerate(opcua.get("users") or []):
            if isinstance(user, dict) and user.get("password_file") and user.get("password") is None:
                user["password"] = _read_secret_file(user["password_file"], base_dir,
                                                     f"[opcua].users[{index}].password_file")


def section_names(data: dict[str, Any]) -> dict[str, Any]:
    """Top-level keys matched to the sections case-insensitively (`[MQTT]` is `[mqtt]`), as pydantic-settings did;
    when two spellings of one section are given, the first one wins, as there."""
    named: dict[str, Any] = {}
    for key, value in data.items():
        lowered = key.lower() if isinstance(key, str) else key
        section = lowered if lowered in SECTIONS else key
        named.setdefault(section, value)
    return named


@dataclass(frozen=True)
class ConfigData:
    """The merged, unvalidated configuration: `data` (file, then environment, then overrides, secrets read),
    the directory relative paths are resolved against, and where it came from (for messages)."""

    data: dict[str, Any]
    base_dir: Path
    origin: str


def read_config_data(
    path: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> ConfigData:
    """The TOML file at `path` (None: nothing), the environment and `overrides` merged, secret files read, section
    names matched; ConfigError when the file cannot be read or parsed or a secret file cannot be read."""
    environ = os.environ if environ is None else environ
    origin = "defaults"
    data: dict[str, Any] = {}
    base_dir = Path.cwd()
    if path is not None:
        path = Path(path).expanduser()
        origin = str(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"{path}: no such configuration file") from exc
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
        base_dir = path.resolve().parent
    env = _env_overrides(environ)
    if env:
        origin = f"{origin} + environment" if path is not None else "environment"
    data = _deep_merge(data, env)
    if overrides:
        data = _deep_merge(data, overrides)
    if "base_dir" in data:
        raise ConfigError(f"{origin}: unknown key base_dir")
    try:
        _resolve_secret_files(data, base_dir)
    except ValueError as exc:
        raise ConfigError(f"{origin}: {exc}") from exc
    return ConfigData(section_names(data), base_dir, origin)


@dataclass(frozen=True)
class DatabaseOptions:
    """What opening the configured database needs: the URL (a relative SQLite path made absolute) and the pool."""

    url: str
    echo: bool
    pool_size: int


def database_options(config: ConfigData) -> DatabaseOptions | None:
    """`[database]` read without pydantic, for the commands that need nothing else; None when the configuration is
    not plainly valid there (an unknown section or key, a value of the wrong type): then `load_config` must judge
    it, so that every mistake still gets its one message. Other sections are not looked at."""
    if any(not isinstance(key, str) or key not in SECTIONS for key in config.data):
        return None
    table = config.data.get("database", {})
    if not isinstance(table, dict) or not set(table) <= set(DATABASE_DEFAULTS):
        return None
    values = {**DATABASE_DEFAULTS, **table}
    url, echo, pool_size = values["url"], values["echo"], values["pool_size"]
    plain = (isinstance(url, str) and (values["url_file"] is None or isinstance(values["url_file"], str))
             and isinstance(echo, bool) and type(pool_size) is int and pool_size >= 1)
    if not plain:
        return None
    return DatabaseOptions(resolve_sqlite_url(url, config.base_dir), echo, pool_size)


# --- finding the configuration file ------------------------------------------------------------------------------

CONFIG_ENV = "ANOMALYD_CONFIG"
LOCAL_CONFIG = Path("config.toml")
SYSTEM_CONFIG = Path("/etc/anomalyd/config.toml")


def config_candidates(explicit: str | Path | None = None, environ: Mapping[str, str] | None = None,
                      cwd: Path | None = None) -> list[tuple[str, Path]]:
    """Where the configuration is looked for, in order: (how it was chosen, path)."""
    environ = os.environ if environ is None else environ
    cwd = Path.cwd() if cwd is None else cwd
    found: list[tuple[str, Path]] = []
    if explicit:
        found.append(("--config", Path(explicit).expanduser()))
    if environ.get(CONFIG_ENV):
        found.append((f"${CONFIG_ENV}", Path(environ[CONFIG_ENV]).expanduser()))
    found.append(("the current folder", cwd / LOCAL_CONFIG))
    found.append(("the system config", SYSTEM_CONFIG))
    return found


def find_config(explicit: str | Path | None = None, environ: Mapping[str, str] | None = None,
                cwd: Path | None = None) -> Path | None:
    """The one rule every command uses: `--config`, else `$ANOMALYD_CONFIG` (both must exist: a named file that
    is missing is an error), else `./config.toml`, else `/etc/anomalyd/config.toml`, else None (built-in
    defaults)."""
    for how, path in config_candidates(explicit, environ, cwd):
        if how in ("--config", f"${CONFIG_ENV}"):
            return path  # named explicitly: load_config reports a missing file
        if path.is_file():
            return path
    return None


def describe_config_search(explicit: str | Path | None = None, environ: Mapping[str, str] | None = None,
                           cwd: Path | None = None) -> str:
    """"config: X (from --config)" or "no config file (looked at ./config.toml, /etc/...)"; for error messages."""
    chosen = find_config(explicit, environ, cwd)
    candidates = config_candidates(explicit, environ, cwd)
    if chosen is not None:
        how = next(how for how, path in candidates if path == chosen)
        return f"config {chosen} (from {how})"
    return "no config file (looked at " + ", ".join(str(path) for _, path in candidates) + "; built-in defaults)"
