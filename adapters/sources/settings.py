"""The settings models of the built-in source kinds whose implementations import heavy libraries (OpenCV,
redis-py, paho): reading and validating the configuration needs only these, so operator commands load no cv2.
Each kind's module (`opencv_capture`, `redis_stream`, `mqtt_images`) imports its model from here and registers
it with its source class; `adapters.sources.registry` finds a built-in kind's model here without importing that
module."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from adapters.sources.base import DEFAULT_MAX_BYTES, SourceSettings, resolve_path_uri


class CaptureSettings(SourceSettings):
    """`kind = "camera"` (uri: device index or /dev/video*), `"rtsp"` / `"http"` (stream URL) or `"video"` (a file;
    relative: to the config file's directory)."""

    kind: Literal["camera", "rtsp", "http", "video"]
    loop: bool = Field(False, description="video: start over at the end")
    open_timeout_ms: int = Field(10000, ge=0, description="backend open timeout")
    read_timeout_ms: int = Field(5000, ge=0, description="backend read timeout")
    watchdog_s: float | None = Field(None, gt=0, description="abandon a grabber stuck this long; default: "
                                                             "the larger timeout + 5 s")
    backoff_initial_s: float = Field(0.5, gt=0, description="first reconnect delay")
    backoff_max_s: float = Field(30.0, gt=0, description="longest reconnect delay")
    backend: str | None = Field(None, description='an OpenCV API name such as "FFMPEG" or "V4L2"')
    width: float | None = Field(None, gt=0, description="camera: requested frame width")
    height: float | None = Field(None, gt=0, description="camera: requested frame height")
    fps: float | None = Field(None, gt=0, description="camera: requested frame rate")

    def resolved(self, base_dir: Path) -> CaptureSettings:
        return resolve_path_uri(self, base_dir) if self.kind == "video" else self  # type: ignore[return-value]


class RedisConfig(BaseModel):
    """The `[redis]` section: the stream that capture hosts write frames to (`RedisFrameWriter`) and `kind =
    "redis"` sources read, with its consumer group; a source's own url/stream/group override it."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    url_file: str | None = None
    stream: str = "anomalyd:frames"
    group: str = "anomalyd-workers"
    consumer: str | None = None
    maxlen: int | None = Field(10_000, ge=1)


class RedisSourceSettings(SourceSettings):
    """`kind = "redis"`: frames from a Redis stream (uri: a redis:// URL, else `url` or [redis] url)."""

    kind: Literal["redis"]
    url: SecretStr | None = Field(None, description="default: the uri when it is a Redis URL, else [redis] url")
    stream: str | None = Field(None, description="default: [redis] stream")
    group: str | None = Field(None, description="consumer group; default: [redis] group")
    consumer: str | None = Field(None, description="consumer name; default: [redis] consumer or <host>-<pid>")
    claim_idle_ms: int = Field(30000, ge=1, description="claim entries another consumer left pending this long")
    block_ms: int = Field(500, ge=1, description="XREADGROUP block time")
    count: int | None = Field(None, ge=1, description="entries per read; default: the queue size")
    backoff_initial_s: float = Field(0.5, gt=0, description="first reconnect delay")
    backoff_max_s: float = Field(30.0, gt=0, description="longest reconnect delay")
    max_bytes: int = Field(DEFAULT_MAX_BYTES, ge=1, description="an entry's data above this is a rejected frame")


class MqttSourceSettings(SourceSettings):
    """`kind = "mqtt"`: uri `mqtt://[user[:password]@]host[:port]/topic/+/wildcards` (`mqtts://` for TLS)."""

    kind: Literal["mqtt"]
    topics: list[str] = Field(default_factory=list, description="more topics besides the uri's")
    client_id: str | None = Field(None, description="default: anomalyd-<hostname>-<source id> (keep it stable)")
    qos: Literal[0, 1, 2] = Field(1, description="subscription QoS")
    session_expiry_s: int = Field(7 * 24 * 3600, ge=0, description="the broker keeps our session this long")
    receive_maximum: int | None = Field(None, ge=1, description="unacknowledged messages in flight; default: "
                                                                "the queue size")
    keepalive: int = Field(30, ge=1, description="seconds")
    username: str | None = Field(None, description="default: from the uri, else [mqtt] username")
    password: SecretStr | None = Field(None, description="default: from the uri, else [mqtt] password")
    tls: bool | None = Field(None, description="default: true for mqtts://")
    backoff_initial_s: float = Field(1.0, gt=0, description="first reconnect delay")
    backoff_max_s: float = Field(30.0, gt=0, description="longest reconnect delay")
    max_bytes: int = Field(DEFAULT_MAX_BYTES, ge=1, description="a payload above this is a rejected frame")
