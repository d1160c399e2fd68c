"""Where `daemon.config.settings.Settings` reads its values: pydantic-settings sources, highest precedence first.

1. explicit overrides (`load_config(overrides=...)`, then `Settings(**values)`);
2. the environment: `ANOMALYD_<SECTION>__<KEY>`, or `ANOMALYD_<SECTION>` holding JSON; values are JSON when the key
   is a list or table (`ANOMALYD_MODEL__LAYERS=[6,12]`), `null` is None;
3. a `.env` file in the current folder, read like the environment;
4. the TOML file (`daemon.config.file.find_config`);
5. a secrets directory: one file per value, named like the variable (`anomalyd_database__url`), holding the value;
   `$ANOMALYD_SECRETS_DIR`, else `$CREDENTIALS_DIRECTORY` (systemd's `LoadCredential=`), else `/run/secrets` when
   it exists (Docker).

The subclasses add what the library leaves out: an `ANOMALYD_` name that is not a section (`ANOMALYD_MQTT_HOST`,
`ANOMALYD_DATABSE__URL`) is an unknown key rather than ignored, `base_dir` cannot be set from outside, and each
source can say which file or variable gave a key, for the error messages. `<key>_file` entries (`password_file`)
are read by `Settings` once the sources are merged: a value given directly, in any source, wins over a file.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dotenv import dotenv_values
from pydantic_settings import (
    DotEnvSettingsSource,
    EnvSettingsSource,
    NestedSecretsSettingsSource,
    PydanticBaseSettingsSource,
    SettingsError,
    TomlConfigSettingsSource,
)
from pydantic_settings.sources.utils import parse_env_vars

from daemon.config.file import (
    DOTENV_FILE,
    ENV_DELIMITER,
    ENV_PREFIX,
    ConfigError,
    _read_secret_file,
    secrets_dir,
)

if TYPE_CHECKING:
    from pydantic_settings import BaseSettings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

# Not configuration, whatever a source says: the config file's directory, set by load_config.
INTERNAL_KEYS = ("base_dir",)


@dataclass
class LoadRequest:
    """What one `load_config` call reads: the TOML file, the environment, the `.env` file, the secrets directory,
    the overrides; `sources` holds the sources built for it (for the error messages)."""

    toml_file: Path | None = None
    environ: Mapping[str, str] = field(default_factory=lambda: os.environ)
    env_file: Path | None = None
    secrets_dir: Path | None = None
    sources: list[PydanticBaseSettingsSource] = field(default_factory=list)

    @classmethod
    def for_environment(cls, toml_file: Path | None, environ: Mapping[str, str] | None = None) -> LoadRequest:
        environ = os.environ if environ is None else environ
        env_file = Path(DOTENV_FILE)
        return cls(toml_file, environ, env_file if env_file.is_file() else None, secrets_dir(environ))

    def origin(self) -> str:
        """Every source that gave a value, for a message about the configuration as a whole."""
        named = [source.origin for source in self.sources if isinstance(source, _Described) and source.used()]
        return " + ".join(named) if named else "defaults"

    def origin_of(self, loc: tuple[Any, ...]) -> str:
        """The file or variable that gave the value at `loc` (the highest-precedence source that has it)."""
        best: tuple[int, str] | None = None
        for source in self.sources:
            if not isinstance(source, _Described):
                continue
            found = source.describe(loc)
            if found is not None and (best is None or found[0] > best[0]):
                best = found
        return best[1] if best is not None else self.origin()


_REQUEST: ContextVar[LoadRequest | None] = ContextVar("anomalyd_config_request", default=None)


@contextmanager
def loading(request: LoadRequest) -> Iterator[LoadRequest]:
    """`Settings(...)` inside this block reads what `request` names."""
    token = _REQUEST.set(request)
    try:
        yield request
    finally:
        _REQUEST.reset(token)


def build_sources(settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource
                  ) -> tuple[PydanticBaseSettingsSource, ...]:
    """The sources of one `Settings(...)`, in precedence (the hook `Settings.settings_customise_sources` calls)."""
    request = _REQUEST.get() or LoadRequest.for_environment(None)
    sources: list[PydanticBaseSettingsSource] = [Overrides(init_settings), Environment(settings_cls, request.environ)]
    if request.env_file is not None:
        sources.append(DotEnv(settings_cls, request.env_file))
    if request.toml_file is not None:
        sources.append(TomlFile(settings_cls, request.toml_file))
    if request.secrets_dir is not None:
        sources.append(SecretsDirectory(settings_cls, request.secrets_dir))
    request.sources = sources
    return tuple(sources)


class _Described:
    """A source that names itself (`origin`) and the file or variable behind a key (`describe`)."""

    origin: str

    def used(self) -> bool:
        raise NotImplementedError

    def describe(self, loc: tuple[Any, ...]) -> tuple[int, str] | None:
        """(how many parts of `loc` it matched, where the value came from), or None when it gave no such key."""
        raise NotImplementedError


class Overrides(PydanticBaseSettingsSource, _Described):
    """The explicit values (`load_config(overrides=...)`); `base_dir` comes this way from load_config alone."""

    origin = "overrides"

    def __init__(self, init_settings: PydanticBaseSettingsSource) -> None:
        super().__init__(init_settings.settings_cls)
        self._values: dict[str, Any] = dict(getattr(init_settings, "init_kwargs", {}))

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return self._values

    def used(self) -> bool:
        return any(key not in INTERNAL_KEYS for key in self._values)

    def describe(self, loc: tuple[Any, ...]) -> tuple[int, str] | None:
        return (1, self.origin) if loc and loc[0] in self._values and loc[0] not in INTERNAL_KEYS else None


class _Variables(_Described):
    """The environment's naming rules, shared by the environment, `.env` and the secrets directory: names are
    `<prefix><section>[__<key>...]`, case-insensitive."""

    env_vars: Mapping[str, Any]
    settings_cls: type[BaseSettings]
    _names: dict[tuple[str, ...], str]

    def _label(self, name: str) -> str:
        raise NotImplementedError

    def _collect_names(self, originals: Mapping[str, Any]) -> None:
        prefix = ENV_PREFIX.lower()
        self._names = {}
        for name in originals:
            lowered = name.lower()
            if lowered.startswith(prefix):
                parts = tuple(lowered[len(prefix):].split(ENV_DELIMITER))
                if all(parts):
                    self._names[parts] = name

    def _checked(self, data: dict[str, Any]) -> dict[str, Any]:
        """`data` plus, as unknown keys for the validation to report, the prefixed names that are not settings but
        look like them: `<prefix>FOO__X` (FOO not a section) and `<prefix>MQTT_HOST` (a section with one
        underscore). Other prefixed names (`ANOMALYD_CACHE`, `ANOMALYD_CONFIG`) configure other parts of the tool."""
        sections = [name for name in self.settings_cls.model_fields if name not in INTERNAL_KEYS]
        for parts, name in self._names.items():
            head = parts[0]
            if head in INTERNAL_KEYS:
                raise ConfigError(f"{self._label(name)}: unknown key {head}")
            if head in sections:
                continue
            if len(parts) > 1 or any(head.startswith(f"{section}_") for section in sections):
                data.setdefault(head, self.env_vars.get(name.lower(), ""))
        return data

    def used(self) -> bool:
        return bool(self._names)

    def describe(self, loc: tuple[Any, ...]) -> tuple[int, str] | None:
        wanted = tuple(str(part).lower() for part in loc)
        for depth in range(len(wanted), 0, -1):
            name = self._names.get(wanted[:depth])
            if name is not None:
                return depth, self._label(name)
        deeper = [name for parts, name in self._names.items() if wanted and parts[:len(wanted)] == wanted]
        return (len(wanted), self._label(deeper[0])) if deeper else None

    def _call(self, call: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """`call()` (the library's reading) checked; a list or table that is not JSON named with its variable."""
        try:
            data = call()
        except SettingsError as exc:
            field_name = re.search(r'field "([^"]+)"', str(exc))
            names = [name for parts, name in self._names.items() if field_name and parts[0] == field_name.group(1)]
            where = self._label(names[0]) if len(names) == 1 else self.origin
            raise ConfigError(f"{where}: not valid JSON: {exc.__cause__ or exc}") from None
        return self._checked(data)


class Environment(_Variables, EnvSettingsSource):
    origin = "environment"

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls)
        self._collect_names(environ)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(self._environ, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str)

    def _label(self, name: str) -> str:
        return f"environment variable {name}"

    def __call__(self) -> dict[str, Any]:
        return self._call(super().__call__)


class DotEnv(_Variables, DotEnvSettingsSource):
    """`.env`: read like the environment (other names in it are left alone, as in the environment)."""

    def __init__(self, settings_cls: type[BaseSettings], env_file: Path) -> None:
        self.origin = str(env_file)
        super().__init__(settings_cls, env_file=env_file, dotenv_filtering="only_existing")
        self._collect_names(dotenv_values(env_file, encoding="utf-8"))

    def _label(self, name: str) -> str:
        return f"{self.origin}: {name}"

    def __call__(self) -> dict[str, Any]:
        return self._call(super().__call__)


class SecretsDirectory(_Variables, NestedSecretsSettingsSource):
    """A directory of files named like the variables; files without the prefix belong to others and are not read."""

    def __init__(self, settings_cls: type[BaseSettings], directory: Path) -> None:
        self.origin = f"secrets in {directory}"
        self._directory = directory
        if not directory.is_dir():
            raise ConfigError(f"secrets directory {directory}: not a directory")
        super().__init__(settings_cls, secrets_dir=directory, secrets_dir_missing="ok",
                         secrets_prefix=ENV_PREFIX, secrets_nested_delimiter=ENV_DELIMITER)
        self._collect_names({path.name: None for path in self._files(directory)})

    @staticmethod
    def _files(directory: Path) -> list[Path]:
        prefix = ENV_PREFIX.lower()
        try:
            return [path for path in directory.iterdir() if path.name.lower().startswith(prefix) and path.is_file()]
        except OSError as exc:
            raise ConfigError(f"secrets directory {directory}: {exc.strerror or exc}") from exc

    @classmethod
    def load_secrets(cls, path: Path) -> dict[str, str]:
        values = {}
        for file in cls._files(path):
            try:
                values[file.name] = file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(f"secret file {file}: {exc.strerror or exc}") from exc
        return values

    def _label(self, name: str) -> str:
        return f"secret file {self._directory / name}"

    def __call__(self) -> dict[str, Any]:
        return self._call(super().__call__)


class TomlFile(TomlConfigSettingsSource, _Described):
    """The TOML file; section names match case-insensitively (`[MQTT]`: the first spelling given wins)."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path) -> None:
        self.origin = str(path)
        if not path.exists():
            raise ConfigError(f"{path}: no such configuration file")
        super().__init__(settings_cls, toml_file=path)
        for key in self.toml_data:
            if isinstance(key, str) and key.lower() in INTERNAL_KEYS:
                raise ConfigError(f"{path}: unknown key {key}")

    def _read_file(self, file_path: Any) -> dict[str, Any]:
        try:
            with open(file_path, "rb") as file:
                return tomllib.load(file)
        except OSError as exc:
            raise ConfigError(f"{file_path}: cannot read: {exc.strerror or exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{file_path}: not valid TOML: {exc}") from exc

    def used(self) -> bool:
        return True

    def describe(self, loc: tuple[Any, ...]) -> tuple[int, str] | None:
        return (1, self.origin) if loc and loc[0] in self.init_kwargs else None


# --- `<key>_file` secrets -----------------------------------------------------------------------------------------

_SECRET_KEYS = (("mqtt", "password"), ("mqtt", "command_secret"), ("database", "url"), ("redis", "url"))


def read_secret_files(data: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """`data` with each `<key>_file` entry's secret read into `<key>` (relative to `base_dir`), unless `<key>` is
    given directly; ValueError names the key and the file that cannot be read."""
    data = dict(data)
    for section, key in _SECRET_KEYS:
        table = data.get(section)
        if isinstance(table, dict) and table.get(f"{key}_file") and table.get(key) is None:
            data[section] = {**table, key: _read_secret_file(table[f"{key}_file"], base_dir, f"[{section}].{key}_file")}
    api = data.get("api")
    if isinstance(api, dict) and isinstance(api.get("tokens"), list):
        data["api"] = {**api, "tokens": _read_list(api["tokens"], "token", base_dir, "[[api.tokens]]")}
    if isinstance(data.get("webhooks"), list):
        data["webhooks"] = _read_list(data["webhooks"], "secret", base_dir, "[[webhooks]]")
    opcua = data.get("opcua")
    if isinstance(opcua, dict) and isinstance(opcua.get("users"), list):
        data["opcua"] = {**opcua, "users": _read_list(opcua["users"], "password", base_dir, "[opcua].users")}
    return data


def _read_list(entries: list[Any], key: str, base_dir: Path, where: str) -> list[Any]:
    read = []
    for index, entry in enumerate(entries):
        if isinstance(entry, dict) and entry.get(f"{key}_file") and entry.get(key) is None:
            entry = {**entry, key: _read_secret_file(entry[f"{key}_file"], base_dir, f"{where}[{index}].{key}_file")}
        read.append(entry)
    return read
