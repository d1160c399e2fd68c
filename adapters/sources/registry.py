"""The registry of source kinds: a kind is one module that declares its settings model and its source class.

Adding a kind (see `docs/architecture.md`)::

    class WidgetSettings(SourceSettings):
        \"\"\"`kind = "widget"`: ... (document every key here).\"\"\"
        kind: Literal["widget"]
        poll_s: float = Field(1.0, gt=0, description="...")

    @register_source_kind("widget", settings=WidgetSettings, live=False)
    class WidgetSource(FrameSource):
        def _run(self) -> None: ...   # loop until self._stop_event is set; self._emit(Frame(...))

The daemon's configuration validates each `[[sources]]` entry against the settings model its `kind` names (a
discriminated union on `kind` resolved through this registry, so a kind registered at run time is a config kind
too); `build_source` builds the registered class. `live` kinds (cameras, streams) default to the `latest` queue
policy, the others to `all`.

A source class is built with `cls.from_context(settings, context)`: the default passes `queue_size` and
`on_status`; a kind that needs daemon-wide defaults (the `[redis]` URL, the `[mqtt]` credentials) overrides it
and reads them from the `SourceContext`.

The built-in kinds' modules are imported on the first lookup, so importing `adapters.sources` stays cheap;
validating an entry of a built-in kind imports only its settings model (`BUILTIN_KIND_SETTINGS`).
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

from adapters.sources.base import SourceSettings

if TYPE_CHECKING:
    from adapters.sources.base import QueuePolicy, SourceStatus
    from adapters.sources.source import FrameSource

BUILTIN_KIND_MODULES: tuple[str, ...] = (
    "adapters.sources.opencv_capture",  # camera, rtsp, http, video
    "adapters.sources.folder",
    "adapters.sources.redis_stream",
    "adapters.sources.mqtt_images",
)
# Each built-in kind's settings model ("module:class"), in registration order: validating a `[[sources]]` entry
# needs only this light model, not the kind's module (which imports cv2/redis/paho), so the configuration loads
# fast for the operator commands. The module registers the same class when a source is built.
BUILTIN_KIND_SETTINGS: dict[str, str] = {
    "camera": "adapters.sources.settings:CaptureSettings",
    "rtsp": "adapters.sources.settings:CaptureSettings",
    "http": "adapters.sources.settings:CaptureSettings",
    "video": "adapters.sources.settings:CaptureSettings",
    "folder": "adapters.sources.folder:FolderSettings",
    "redis": "adapters.sources.settings:RedisSourceSettings",
    "mqtt": "adapters.sources.settings:MqttSourceSettings",
}


@dataclass(frozen=True)
class SourceContext:
    """What a source gets from the daemon besides its own `[[sources]]` entry."""

    queue_size: int = 16
    on_status: Callable[[FrameSource, SourceStatus], None] | None = None
    redis_url: str | None = None  # [redis] url / stream / group / consumer: defaults for kind = "redis"
    redis_stream: str | None = None
    redis_group: str | None = None
    consumer_name: str | None = None
    mqtt_username: str | None = None  # [mqtt] credentials: defaults for kind = "mqtt"
    mqtt_password: str | None = None
    # (source id, frame-id prefix) -> frame ids of that source already in the database starting with the prefix,
    # newest first (bounded): `video` sources resume after the last inspected frame instead of inferring the
    # whole file again after a restart. None (tests, capture hosts): start at the first frame.
    recorded_frame_ids: Callable[[str, str], list[str]] | None = None


@dataclass(frozen=True)
class SourceKind:
    key: str
    settings: type[SourceSettings]
    source: type[FrameSource]
    live: bool = False


_kinds: dict[str, SourceKind] = {}
_builtins_loaded = False
_lock = threading.RLock()

SourceClass = TypeVar("SourceClass", bound="type[FrameSource]")


def register_source_kind(*keys: str, settings: type[SourceSettings], live: bool = False,
                         replace: bool = False) -> Callable[[SourceClass], SourceClass]:
    """Class decorator: register the decorated `FrameSource` subclass for each `kind` in `keys`.

    `settings.kind` must accept each key (a `Literal`). Registering a taken key raises unless `replace=True`.
    """
    if not keys:
        raise ValueError("register_source_kind needs at least one kind")

    def register(source: SourceClass) -> SourceClass:
        with _lock:
            for key in keys:
                if key in _kinds and not replace and _kinds[key].source is not source:
                    raise ValueError(f"source kind {key!r} is already registered by {_kinds[key].source.__name__}")
                _kinds[key] = SourceKind(key, settings, source, live)
        return source

    return register


def unregister_source_kind(key: str) -> None:
    """Remove a kind (tests that registered a toy kind clean up with this)."""
    with _lock:
        _kinds.pop(key, None)


def _load_builtins() -> None:
    global _builtins_loaded
    if _builtins_loaded:
        return
    with _lock:
        if not _builtins_loaded:
            for module in BUILTIN_KIND_MODULES:
                importlib.import_module(module)
            _builtins_loaded = True


def source_kinds() -> dict[str, SourceKind]:
    """Every registered kind by key (the built-in ones included)."""
    _load_builtins()
    return dict(_kinds)


def _settings_models() -> dict[str, type[SourceSettings] | str]:
    """Every kind's settings model, or its "module:class" when the kind is built in and its module not loaded yet.
    Registered kinds (plugins, replacements) win over the built-in table."""
    with _lock:
        models: dict[str, type[SourceSettings] | str] = {} if _builtins_loaded else dict(BUILTIN_KIND_SETTINGS)
        models.update({key: kind.settings for key, kind in _kinds.items()})
    return models


def _settings_model(model: type[SourceSettings] | str) -> type[SourceSettings]:
    if isinstance(model, str):
        module, _, name = model.partition(":")
        return getattr(importlib.import_module(module), name)
    return model


def source_kind(key: str) -> SourceKind:
    kinds = source_kinds()
    if key not in kinds:
        raise KeyError(f"unknown source kind {key!r}; expected one of {', '.join(kinds)}")
    return kinds[key]


def queue_policy(settings: SourceSettings) -> QueuePolicy:
    """The entry's queue policy: as set, else `latest` for live kinds (cameras) and `all` for the others."""
    if settings.policy is not None:
        return settings.policy
    return "latest" if source_kind(settings.kind).live else "all"


def validate_source_entry(value: Any) -> SourceSettings:
    """Pydantic validation of one `[[sources]]` entry: dispatch on `kind` to the registered settings model.

    Raises ValidationError with locations relative to the entry (`kind`, `settle_s`, ...), so the config loader
    names the bad key.
    """
    if isinstance(value, SourceSettings):
        return value
    if not isinstance(value, Mapping):
        raise PydanticCustomError("source_entry", "a source must be a table, got {type}",
                                  {"type": type(value).__name__})
    kinds = _settings_models()  # no source module imported: the config of a cv2 camera loads without cv2
    kind = value.get("kind")
    if kind is None:
        raise ValidationError.from_exception_data(
            "SourceSettings", [InitErrorDetails(type="missing", loc=("kind",), input=dict(value))])
    if kind not in kinds:
        expected = ", ".join(repr(key) for key in kinds)
        raise ValidationError.from_exception_data("SourceSettings", [InitErrorDetails(
            type="literal_error", loc=("kind",), input=kind, ctx={"expected": expected})])
    return _settings_model(kinds[kind]).model_validate(dict(value))


def parse_source_settings(spec: SourceSettings | Mapping[str, Any] | Any) -> SourceSettings:
    """One source's settings from its registered model, a mapping or a model with `model_dump()`.

    `kind` is case-insensitive here (as it always was for `build_source`). Raises ValueError naming the source.
    """
    if isinstance(spec, SourceSettings):
        if type(spec) is source_kind(spec.kind).settings:
            return spec
        spec = spec.model_dump(exclude_unset=True) | {"id": spec.id, "kind": spec.kind}
    elif hasattr(spec, "model_dump"):
        spec = spec.model_dump()
    if not isinstance(spec, Mapping):
        raise TypeError(f"source settings must be a mapping or SourceSettings, got {type(spec).__name__}")
    for required in ("id", "kind"):
        if not spec.get(required):
            raise ValueError(f"source spec {dict(spec)!r} has no {required!r}")
    values = {key: value for key, value in spec.items() if value is not None}  # None: the default
    values["kind"] = str(values["kind"]).lower()
    values["id"] = str(values["id"])
    kinds = source_kinds()
    if values["kind"] not in kinds:
        raise ValueError(f"source {values['id']!r}: unknown kind {spec['kind']!r}; expected one of {', '.join(kinds)}")
    try:
        return kinds[values["kind"]].settings.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(part) for part in error['loc']) or 'entry'}: {error['msg']}"
                             for error in exc.errors())
        raise ValueError(f"source {values['id']!r}: {problems}") from None


def build_source(spec: SourceSettings | Mapping[str, Any] | Any, context: SourceContext | None = None,
                 **context_values: Any) -> FrameSource:
    """Create (not start) the source for one `[[sources]]` entry. Bad config raises ValueError naming the source.

    The context is given as a `SourceContext` or as its fields by keyword (`queue_size=`, `on_status=`,
    `redis_url=`, ...).
    """
    settings = parse_source_settings(spec)
    if context is None:
        context = SourceContext(**context_values)
    elif context_values:
        raise TypeError("give the context either as a SourceContext or by keyword, not both")
    return source_kind(settings.kind).source.from_context(settings, context)
