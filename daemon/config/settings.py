"""The daemon's configuration: `Settings`, a pydantic-settings `BaseSettings`, and `load_config`.

`load_config(path)` reads, highest precedence first: explicit overrides, the environment
(`ANOMALYD_<SECTION>__<KEY>`), a `.env` file in the current folder, the TOML file, a secrets directory
(daemon/config/sources.py); validates every section with pydantic (unknown keys are errors that name the file or
variable and the key), resolves relative paths against the config file's directory and reads secrets given as files
(`password_file = "/run/secrets/mqtt"`). Secrets are `SecretStr`, so they never show up in logs or reprs.

Environment values are JSON where the key is a list or a table, e.g. `ANOMALYD_RUNTIME__MAX_BATCH_SIZE=16` or
`ANOMALYD_SOURCES='[{"id": "cam1", "kind": "folder", "uri": "in"}]'`; `null` is None.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    WrapValidator,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError

from adapters.mqtt_settings import MqttSettings
from adapters.opcua_settings import OpcUaConfig
from adapters.sources.base import SourceSettings
from adapters.sources.registry import validate_source_entry
from adapters.sources.settings import RedisConfig
from adapters.webhook_settings import WebhookConfig

# Finding the file, and the fast read of [database]: in config_file (no pydantic there; the operator commands
# read [database] through it alone). Re-exported: callers import them from here.
from daemon.config.file import (  # noqa: F401
    CONFIG_ENV,
    DATABASE_DEFAULTS,
    ENV_DELIMITER,
    ENV_PREFIX,
    LOCAL_CONFIG,
    SECTIONS,
    SYSTEM_CONFIG,
    ConfigError,
    DatabaseOptions,
    config_candidates,
    describe_config_search,
    find_config,
    resolve_sqlite_url,
)
from daemon.config.mutual import MutualConfig
from daemon.config.sources import LoadRequest, build_sources, loading, read_secret_files
from model.factory import DEFAULT_MODEL


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    """`[model]`: the family and the options every family takes; any further key is an option of the family's own
    (its options dataclass, model/options.py: e.g. `max_bank_rows`), checked against its declaration."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    name: str = DEFAULT_MODEL  # a registered model family (model.list_models(); listing them loads no torch)
    backbone: str = "ViT-L-14-336"
    backbone_config: str | None = None
    prompts: str | None = None
    layers: list[int] = Field(default_factory=lambda: [24])
    image_size: int = Field(518, ge=32, le=4096)
    class_name: str | None = None
    reference_preprocessing: bool = False
    # Known-good images for every source without its own `references` (see daemon/references/manager.py).
    references: str | None = None
    # Target false-reject rate the daemon calibrates both thresholds to, per source and model version, on
    # leave-one-out reference scores / labelled-normal frames; 0 keeps the configured thresholds.
    false_reject_rate: float = Field(0.005, ge=0.0, lt=1.0)
    # Frame geometry, the default of every [[sources]] entry (model/geometry.py, daemon/config/geometry.py): "squash" to
    # the square input, "fit" (aspect kept), "tile" (native resolution) or "auto" (tiles of the short side for long
    # frames, squash for the others); unset: the model's default (patchcore
    # on torch: model.geometry.DEFAULT_RESIZE, measured; others: squash); a crop, polygons never inspected.
    resize: Literal["squash", "fit", "tile", "auto"] | None = None
    roi: list[int] | None = Field(None, min_length=4, max_length=4)
    ignore_polygons: list[list[list[float]]] = Field(default_factory=list)
    tile_overlap: float = Field(0.25, ge=0.0, lt=0.9)
    # frame pixels each tile covers (resize = "tile"); None: the model's input size, i.e. native resolution
    tile_size: int | None = Field(None, ge=32, le=16384)

    @field_validator("name")
    @classmethod
    def _registered_model(cls, value: str) -> str:
        from model.factory import list_models

        if value not in list_models():
            raise ValueError(f"unknown model {value!r}: expected one of {', '.join(list_models())}")
        return value

    @model_validator(mode="after")
    def _family_options(self) -> ModelConfig:
        """Each further key: an own option of the family, checked (and converted from text) by its declaration;
        a refused one is a `family_option` error naming the key (format_validation_error)."""
        if self.__pydantic_extra__:
            from model.factory import options_of
            from model.options import OptionsError, check_options

            schema = options_of(self.name)
            for key, value in self.__pydantic_extra__.items():
                try:
                    self.__pydantic_extra__[key] = check_options(self.name, schema, {key: value}, common=False)[key]
                except OptionsError as exc:
                    raise PydanticCustomError("family_option", "{message}", {"key": key, "message": str(exc)}) from None
        return self

    def family_options(self) -> dict[str, Any]:
        """The family's own options this `[model]` sets."""
        return dict(self.__pydantic_extra__ or {})


class RuntimeConfig(_Section):
    device: str = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    max_batch_size: int = Field(8, ge=1, le=1024)
    max_batch_delay_ms: float = Field(20.0, ge=0, le=60_000)
    queue_size: int = Field(64, ge=1)
    decode_threads: int = Field(2, ge=1, le=64)
    persist_threads: int = Field(1, ge=1, le=64)
    shutdown_grace_s: float = Field(20.0, gt=0)
    max_pixels: int = Field(50_000_000, ge=64)  # per frame, read from its header; larger frames are rejected
    decode_budget_mb: int = Field(512, ge=16)  # decoded frames in flight, in MiB of RGB pixels
    max_attempts: int = Field(5, ge=1)  # failures of one frame before it is dead-lettered
    # Resource faults (disk full, database down, out of memory) never count towards max_attempts: the frame is
    # handed back after a pause growing to resource_backoff_s, and readiness names the fault until a frame gets
    # through or resource_fault_hold_s pass without one failing on it (daemon/telemetry/health.py ResourceFaults).
    resource_backoff_s: float = Field(1.0, ge=0, le=60)
    resource_fault_hold_s: float = Field(30.0, gt=0)
    # Of each batch, the places `latest` live sources (cameras) get while a file/queue backlog waits; the rest
    # goes to the backlog, so neither starves (daemon/frames/batcher.py).
    live_share: float = Field(0.5, gt=0, lt=1)
    engine: Literal["torch", "onnxruntime", "openvino"] = "torch"
    # Where a frozen CNN trunk (PatchCore's backbone) runs on the CPU when engine = "torch": "auto" is ONNX Runtime
    # when installed (~2x faster, parity-gated at start, adapters/cnn_runtime.py), else PyTorch.
    cnn: Literal["auto", "torch", "onnxruntime"] = "auto"
    export_dir: str | None = Field(None, description="a prebuilt export for the engine; default: exported through "
                                   "the parity gate at start and on each model swap, under <[storage].dir>/exports")


# One [[sources]] entry: validated against the settings model its `kind` registered (adapters/sources/registry.py),
# so each kind's own keys are known and anything else is an unknown key.
SourceEntry = Annotated[SourceSettings, WrapValidator(lambda value, _handler: validate_source_entry(value))]


class DatabaseConfig(_Section):
    # defaults shared with config_file.database_options, the operator commands' plain reading of this section
    url: SecretStr = SecretStr(DATABASE_DEFAULTS["url"])
    url_file: str | None = DATABASE_DEFAULTS["url_file"]
    echo: bool = DATABASE_DEFAULTS["echo"]
    pool_size: int = Field(DATABASE_DEFAULTS["pool_size"], ge=1)


class StorageConfig(_Section):
    dir: str = "var/artifacts"
    retention_days: int | None = Field(90, ge=0, description="0 (or unset in code) = keep forever")
    save_frames: bool = True
    # "anomalous": mask and heatmap files only for frames at or above their threshold (fast lines; normal rows
    # then show the frame alone). "all": for every frame.
    artifacts: Literal["all", "anomalous"] = "all"
    jpeg_quality: int = Field(90, ge=10, le=100)


class ApiToken(_Section):
    name: str = Field(min_length=1)
    role: Literal["viewer", "operator", "admin"] = "viewer"
    token: SecretStr | None = None
    token_file: str | None = None
    token_sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")

    @model_validator(mode="after")
    def _one_token(self) -> ApiToken:
        if self.token is None and self.token_sha256 is None and self.token_file is None:
            raise ValueError(f"api token {self.name!r}: give token, token_file or token_sha256")
        return self

    def matches(self, presented: str) -> bool:
        """Constant-time comparison of a presented bearer token with this one."""
        import hmac

        digest = hashlib.sha256(presented.encode()).hexdigest()
        if self.token_sha256 is not None:
            return hmac.compare_digest(digest, self.token_sha256.lower())
        assert self.token is not None
        return hmac.compare_digest(digest, hashlib.sha256(self.token.get_secret_value().encode()).hexdigest())


class ApiConfig(_Section):
    enabled: bool = True
    bind: str = Field("127.0.0.1:8080", pattern=r"^[^\s:]*:\d{1,5}$|^\[[0-9a-fA-F:]+\]:\d{1,5}$")
    tokens: list[ApiToken] = Field(default_factory=list)
    # Tokens made by the first start and `anomalyd tokens create` (hashes only); default: api_tokens.json in the
    # folder holding [storage].dir (var/ for the shipped config). See daemon/api/tokens.py.
    tokens_file: str | None = None
    auth_health: bool = False
    auth_metrics: bool = False

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.bind.rpartition(":")
        return host.strip("[]") or "127.0.0.1", int(port)


class RetrainingConfig(_Section):
    """Retraining from operator labels (daemon/learning/retraining.py): a patchcore-head for `patchcore` / `patchcore-head`
    (daemon/learning/head_retraining.py: its steps are fixed; epochs, batch_size, learning_rate, min_anomalous and synthetic
    are the CLIP families'), new prompts (and heads) for the CLIP families.

    schedule: a 5-field cron expression in the host's local time ("0 3 * * *") or an interval ("6h", "30m",
    "every 2d"). A scheduled run starts only with at least `min_new_labels` labels since the last completed run.
    The candidate is compared with the active model on a held-out part of the labelled frames by `rule` on
    `metric` (not_worse: candidate >= active - tolerance; better: candidate > active + tolerance; always);
    promotion "auto" activates a passing candidate at once (hot swap), "manual" leaves it for the operator.
    """

    enabled: bool = False
    schedule: str = "0 3 * * *"
    min_new_labels: int = Field(50, ge=1)
    promotion: Literal["manual", "auto"] = "manual"
    rule: Literal["not_worse", "better", "always"] = "not_worse"
    metric: str = "image_auroc"
    tolerance: float = Field(0.0, ge=0.0, le=1.0)
    holdout_fraction: float = Field(0.25, gt=0.0, lt=1.0)
    epochs: int = Field(15, ge=1)
    batch_size: int = Field(8, ge=1)
    learning_rate: float = Field(1e-3, gt=0.0)
    image_size: int | None = Field(None, ge=32, le=4096, description="default: [model].image_size")
    min_anomalous: int = Field(10, ge=0, description="fewer labelled defects: add synthetic ones on normals")
    synthetic: Literal["auto", "on", "off"] = "auto"
    seed: int = 111
    nice: int = Field(10, ge=0, le=19, description="niceness of the training process")
    threads: int | None = Field(None, ge=1, description="torch threads of the training process")
    device: str | None = Field(None, description="default: [runtime].device")
    timeout_s: float = Field(6 * 3600.0, gt=0)
    output_dir: str | None = Field(None, description="model version files; default <[storage].dir>/models")

    @field_validator("schedule")
    @classmethod
    def _valid_schedule(cls, value: str) -> str:
        from daemon.config.schedule import parse_schedule

        parse_schedule(value)  # raises ValueError naming the problem
        return value

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, value: str) -> str:
        from daemon.config.schedule import COMPARABLE_METRICS

        if value not in COMPARABLE_METRICS:
            raise ValueError(f"metric must be one of {', '.join(COMPARABLE_METRICS)}")
        return value


class Settings(BaseSettings):
    """The whole configuration. Build it with `load_config`, which also finds the file and names the source of
    each mistake; `Settings()` alone reads the environment, `.env` and the secrets directory, without a file.

    Sources, highest precedence first: explicit values, the environment, `.env`, the TOML file, the secrets
    directory (`settings_customise_sources`; daemon/config/sources.py). Section names match case-insensitively.
    """

    model_config = SettingsConfigDict(extra="forbid", validate_assignment=True, validate_default=True,
                                      arbitrary_types_allowed=True, env_prefix=ENV_PREFIX,
                                      env_nested_delimiter=ENV_DELIMITER, env_parse_none_str="null",
                                      case_sensitive=False)

    model: ModelConfig = Field(default_factory=ModelConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    sources: list[SourceEntry] = Field(default_factory=list)
    mqtt: MqttSettings = Field(default_factory=MqttSettings)
    database: DatabaseConfig = Field(default_factory=DatabaseConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    api: ApiConfig = Field(default_factory=ApiConfig)
    retraining: RetrainingConfig = Field(default_factory=RetrainingConfig)
    redis: RedisConfig = Field(default_factory=RedisConfig)
    webhooks: list[WebhookConfig] = Field(default_factory=list)
    opcua: OpcUaConfig = Field(default_factory=OpcUaConfig)
    mutual: MutualConfig = Field(default_factory=MutualConfig)  # mutual scoring's window (daemon/config/mutual.py)
    base_dir: Path = Field(default_factory=Path.cwd, exclude=True, description="the config file's directory")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return build_sources(settings_cls, init_settings)

    @model_validator(mode="before")
    @classmethod
    def _secret_files(cls, data: Any) -> Any:
        """`<key>_file` entries read, once every source is merged (a value given directly anywhere wins)."""
        if not isinstance(data, dict):
            return data
        base_dir = data.get("base_dir")
        return read_secret_files(data, Path(base_dir) if base_dir is not None else Path.cwd())

    @field_validator("sources")
    @classmethod
    def _unique_source_ids(cls, sources: list[SourceSettings]) -> list[SourceSettings]:
        seen: set[str] = set()
        for source in sources:
            if source.id in seen:
                raise ValueError(f"duplicate source id {source.id!r}")
            seen.add(source.id)
        return sources

    @model_validator(mode="after")
    def _geometry_supported(self) -> Settings:
        from daemon.config.geometry import check_geometries

        check_geometries(self)
        return self

    @field_validator("webhooks")
    @classmethod
    def _unique_webhook_keys(cls, webhooks: list[WebhookConfig]) -> list[WebhookConfig]:
        keys = [webhook.key for webhook in webhooks]
        duplicates = sorted({key for key in keys if keys.count(key) > 1})
        if duplicates:
            raise ValueError(f"duplicate webhook name/url: {', '.join(duplicates)}")
        return webhooks

    def resolve(self, path: str | Path) -> Path:
        """A path from the config, made absolute against the config file's directory."""
        path = Path(path).expanduser()
        return path if path.is_absolute() else (self.base_dir / path)

    def resolve_model_value(self, value: str | None) -> str | None:
        """A [model] value that may be a file relative to the config file, else as is (e.g. an open_clip name)."""
        if value is None:
            return None
        candidate = self.resolve(value)
        return str(candidate) if candidate.exists() else value

    def prompts_file(self) -> str | None:
        """[model].prompts as a file: a path, a released name fetched into the cache, or by default the family's
        released weights (AnomalyCLIP's; WeightsError says how to fetch them when they are missing)."""
        from adapters.weights import resolve_prompts
        from model.factory import get_family

        value = self.model.prompts
        if value is None:
            value = get_family(self.model.name).default_weights
        resolved = resolve_prompts(self.resolve_model_value(value))
        return str(resolved) if resolved is not None else None

    def backbone_file(self) -> str:
        """[model].backbone as the daemon loads it: a file (relative to the config), or a named open_clip backbone's
        weights file in the cache `anomalyd weights fetch` filled; never a download (WeightsError names the file,
        its URL and where to put it)."""
        from adapters.weights import local_backbone
        from model.factory import get_family

        value = self.resolve_model_value(self.model.backbone)
        if not value or not get_family(self.model.name).caps.clip_backbone:  # e.g. PatchCore's CNN: not open_clip's
            return value
        return local_backbone(value)

    def check_weights(self) -> None:
        """WeightsError naming every downloadable file the configured model needs and lacks (none: no error)."""
        from adapters.weights import ensure_weights, required_weights

        ensure_weights(required_weights(self.model.name, self.resolve_model_value(self.model.backbone),
                                        self.resolve_model_value(self.model.prompts)))

    @property
    def database_url(self) -> str:
        """The database URL with a relative SQLite path made absolute against the config directory."""
        return resolve_sqlite_url(self.database.url.get_secret_value(), self.base_dir)

    def database_options(self) -> DatabaseOptions:
        """What opening the database needs (the operator commands' `existing_database`)."""
        return DatabaseOptions(self.database_url, self.database.echo, self.database.pool_size)

    def source(self, source_id: str) -> SourceSettings:
        for source in self.sources:
            if source.id == source_id:
                return source
        raise KeyError(f"no source {source_id!r} in the configuration")


# --- loading -----------------------------------------------------------------------------------------------------


def _location(loc: tuple[Any, ...]) -> str:
    """('mqtt', 'hots') → "[mqtt].hots"; ('sources', 0, 'kind') → "[[sources]][0].kind"."""
    if not loc:
        return "(top level)"
    head, *rest = loc
    if head == "sources":
        text = "[[sources]]"
    elif head == "webhooks":
        text = "[[webhooks]]"
    elif head == "api" and rest[:1] == ["tokens"]:
        text, rest = "[[api.tokens]]", rest[1:]
    elif rest:
        text = f"[{head}]"
    else:
        return str(head)
    for part in rest:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text


def format_validation_error(exc: ValidationError, request: LoadRequest) -> str:
    lines = []
    for error in exc.errors():
        loc = tuple(error["loc"])
        where = _location(loc)
        origin = request.origin_of(loc) if loc else request.origin()
        if error["type"] == "family_option":  # loc: the section; the key is in the context
            loc = (*loc, error["ctx"]["key"])
            lines.append(f"{request.origin_of(loc)}: {_location(loc)}: {error['ctx']['message']}")
        elif error["type"] == "extra_forbidden":
            lines.append(f"{origin}: unknown key {where}")
        elif not loc and error["type"] == "value_error":  # a whole-configuration check: its message names the key
            lines.append(f"{origin}: {error['ctx']['error']}")
        else:
            value = error.get("input")
            shown = "" if isinstance(value, dict | list) or value is None else f" (got {value!r})"
            lines.append(f"{origin}: {where}: {error['msg']}{shown}")
    return "\n".join(lines)


def load_config(
    path: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Read `path` (TOML; None = no file), the environment (`environ`, default os.environ), `.env`, the secrets
    directory and `overrides` (highest precedence), and validate.

    Raises ConfigError naming the file or variable and each bad key.
    """
    path = Path(path).expanduser() if path is not None else None
    request = LoadRequest.for_environment(path, environ)
    values = dict(overrides or {})
    if "base_dir" in values:
        raise ConfigError("overrides: unknown key base_dir")
    base_dir = path.resolve().parent if path is not None else Path.cwd()
    with loading(request):
        try:
            return Settings(**values, base_dir=base_dir)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, request)) from None
        except SettingsError as exc:  # a value the source could not decode (JSON of a list or table)
            cause = f": {exc.__cause__}" if exc.__cause__ else ""
            raise ConfigError(f"{request.origin()}: {exc}{cause}") from None
