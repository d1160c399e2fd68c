"""Finding the configuration file (`find_config`), and the fast read of `[database]` for the history commands.

`daemon.config.settings.Settings` reads the configuration with pydantic-settings (overrides, environment, `.env`, the TOML
file, a secrets directory; see daemon/config/sources.py). This module stays apart from it, and imports no pydantic,
for what the library cannot do:
- finding the file: `--config`, `$ANOMALYD_CONFIG`, `./config.toml`, `/etc/anomalyd/config.toml`, a rule of ours;
- the operator commands that need only the database (`defects`, `label`, `models list`, `stats`) read `[database]`
  here (`read_config_data` + `database_options`) and answer without importing pydantic and pydantic-settings and
  building the validation models: two thirds of their start-up (bench/bench_cli.py). It reads the file's
  `[database]`, the `ANOMALYD_DATABASE*` variables and `url_file`, the same way the sources do; whenever anything
  else could matter (an unknown section or variable, a value it cannot read plainly, database values in `.env` or
  the secrets directory) it answers None and `load_config` judges, so every mistake keeps its one message.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ENV_PREFIX = "ANOMALYD_"
ENV_DELIMITER = "__"
DOTENV_FILE = ".env"  # in the current folder, as pydantic-settings reads it
SECRETS_DIR_ENV = "ANOMALYD_SECRETS_DIR"
CREDENTIALS_ENV = "CREDENTIALS_DIRECTORY"  # systemd, with LoadCredential=
DOCKER_SECRETS = Path("/run/secrets")
# The top-level sections of `daemon.config.settings.Settings` (a test keeps the two the same).
SECTIONS = ("model", "runtime", "sources", "mqtt", "database", "storage", "api", "retraining", "redis", "webhooks",
            "opcua", "mutual")
# [database]'s keys and defaults, shared with `daemon.config.settings.DatabaseConfig`.
DATABASE_DEFAULTS: dict[str, Any] = {"url": "sqlite:///var/anomalyd.db", "url_file": None, "echo": False,
                                     "pool_size": 5}


class ConfigError(ValueError):
    """An unusable configuration; the message names the file or variable and every bad key."""


def secrets_dir(environ: Mapping[str, str]) -> Path | None:
    """The secrets directory: `$ANOMALYD_SECRETS_DIR`, else `$CREDENTIALS_DIRECTORY` (systemd's LoadCredential=),
    else /run/secrets when it exists (Docker), else None."""
    for name in (SECRETS_DIR_ENV, CREDENTIALS_ENV):
        if environ.get(name):
            return Path(environ[name]).expanduser()
    return DOCKER_SECRETS if DOCKER_SECRETS.is_dir() else None


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


def section_names(data: dict[str, Any]) -> dict[str, Any]:
    """Top-level keys matched to the sections case-insensitively (`[MQTT]` is `[mqtt]`), as pydantic-settings does;
    when two spellings of one section are given, the first one wins, as there."""
    named: dict[str, Any] = {}
    for key, value in data.items():
        lowered = key.lower() if isinstance(key, str) else key
        section = lowered if lowered in SECTIONS else key
        named.setdefault(section, value)
    return named


# --- the fast read of [database] ---------------------------------------------------------------------------------

_UNPLAIN = "<not read plainly>"  # a top-level key no section has: database_options then leaves it to load_config


def _variable_parts(names: Iterable[str]) -> Iterator[tuple[str, tuple[str, ...]]]:
    """(name, lower-cased parts after the prefix) of the `ANOMALYD_*` names that are configuration (the sources'
    rule: `<SECTION>[__<KEY>...]`, or an unknown key: `FOO__X`, `MQTT_HOST`); other names (`ANOMALYD_CACHE`) skip."""
    for name in names:
        if not name.upper().startswith(ENV_PREFIX):
            continue
        parts = tuple(name[len(ENV_PREFIX):].lower().split(ENV_DELIMITER))
        head = parts[0]
        if head in SECTIONS or len(parts) > 1 or head == "base_dir" or head.startswith(
                tuple(f"{section}_" for section in SECTIONS)):
            yield name, parts


def _database_variables(environ: Mapping[str, str], data: dict[str, Any]) -> None:
    """The environment's `ANOMALYD_DATABASE` (JSON) and `ANOMALYD_DATABASE__<KEY>` onto data["database"]; anything
    that is not plainly a [database] value marks `data` unplain."""
    table: dict[str, Any] = {}
    keys: dict[str, Any] = {}
    for name, parts in _variable_parts(environ):
        raw = environ[name]
        if parts[0] != "database":
            if parts[0] not in SECTIONS:
                data[_UNPLAIN] = name
            continue
        if len(parts) == 1:
            try:
                table = json.loads(raw)
            except ValueError:
                table = None
            if not isinstance(table, dict):
                data[_UNPLAIN] = name
                return
        elif len(parts) == 2 and raw != "null" and all(parts):
            keys[parts[1]] = _plain_value(parts[1], raw)
        else:
            data[_UNPLAIN] = name
    if table or keys:
        base = data.get("database")
        data["database"] = {**(base if isinstance(base, dict) else {}), **table, **keys}


def _plain_value(key: str, raw: str) -> Any:
    """An environment value as pydantic reads it for [database]'s key, where that is plain; else the text (which
    database_options does not take)."""
    if key == "echo" and raw in ("true", "false"):
        return raw == "true"
    if key == "pool_size" and raw.isascii() and raw.isdigit():
        return int(raw)
    return raw


_DOTENV_NAME = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=", re.MULTILINE)


def _touches_database(names: Iterable[str]) -> str | None:
    """The first of `names` (a `.env` file's, a secrets directory's) that sets [database] or is an unknown key."""
    for name, parts in _variable_parts(names):
        if parts[0] == "database" or parts[0] not in SECTIONS:
            return name
    return None


def _other_sources(environ: Mapping[str, str]) -> str | None:
    """A `.env` or secrets-directory entry the fast read would have to judge, or None."""
    dotenv = Path(DOTENV_FILE)
    if dotenv.is_file():
        try:
            found = _touches_database(_DOTENV_NAME.findall(dotenv.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError):
            found = str(dotenv)
        if found:
            return found
    directory = secrets_dir(environ)
    if directory is not None:
        try:
            return _touches_database(path.name for path in directory.iterdir())
        except OSError:
            return str(directory)
    return None


@dataclass(frozen=True)
class ConfigData:
    """What the fast read found: the file's tables (section names matched) with `[database]` completed from the
    environment and its `url_file` read, the directory relative paths resolve against, and the file's name."""

    data: dict[str, Any]
    base_dir: Path
    origin: str


def read_config_data(
    path: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> ConfigData:
    """The TOML file at `path` (None: nothing) with [database] from the environment and `overrides`, its url_file
    read; ConfigError when the file cannot be read or parsed or the secret file cannot be read."""
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
    data = section_names(data)
    _database_variables(environ, data)
    elsewhere = _other_sources(environ)
    if elsewhere:
        data[_UNPLAIN] = elsewhere
    for key, value in (overrides or {}).items():
        if key == "database" and isinstance(value, Mapping) and isinstance(data.get("database", {}), dict):
            data["database"] = {**data.get("database", {}), **value}
        else:
            data[key] = value
    table = data.get("database")
    if isinstance(table, dict) and table.get("url_file") and table.get("url") is None:
        try:
            table["url"] = _read_secret_file(table["url_file"], base_dir, "[database].url_file")
        except ValueError as exc:
            raise ConfigError(f"{origin}: {exc}") from exc
    return ConfigData(data, base_dir, origin)


@dataclass(frozen=True)
class DatabaseOptions:
    """What opening the configured database needs: the URL (a relative SQLite path made absolute) and the pool."""

    url: str
    echo: bool
    pool_size: int


def database_options(config: ConfigData) -> DatabaseOptions | None:
    """`[database]` read without pydantic, for the commands that need nothing else; None when the configuration is
    not plainly valid there (an unknown section or key, a value of the wrong type, a value from elsewhere): then
    `load_config` must judge it, so that every mistake still gets its one message. Other sections are not looked
    at."""
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
