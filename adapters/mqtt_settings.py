"""The `[mqtt]` section's settings models, apart from the client (`adapters.mqtt`) so that reading the
configuration imports no paho/SQLAlchemy (operator commands load the config and must start fast)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator


class TlsSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    enabled: bool = False
    ca_certs: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    insecure: bool = False


class MqttSettings(BaseModel):
    """The `[mqtt]` section: the broker, the topic prefix and the QoS of alerts and per-frame messages."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    enabled: bool = True
    host: str = "localhost"
    port: int = Field(1883, ge=1, le=65535)
    username: str | None = None
    password: SecretStr | None = None
    password_file: str | None = None
    tls: TlsSettings = Field(default_factory=TlsSettings)
    prefix: str = Field("anomalyd", min_length=1)
    qos: Literal[0, 1, 2] = Field(1, description="alerts")
    inspection_qos: Literal[0, 1, 2] = 0
    publish_inspections: bool = True
    client_id: str | None = Field(None, description="default: anomalyd-<hostname>-<pid>")
    keepalive: int = Field(30, ge=5)
    reconnect_min_s: float = Field(1.0, gt=0)
    reconnect_max_s: float = Field(30.0, gt=0)
    max_inflight: int = Field(100, ge=1)
    # Command topics (`<prefix>/<line>/<source>/trigger/set`, `<prefix>/models/activate/set`) are subscribed only
    # when listed here: anyone who may publish on the broker could otherwise trigger or switch models.
    commands: list[Literal["trigger", "activate"]] = Field(default_factory=list)

    @field_validator("tls", mode="before")
    @classmethod
    def _tls_flag(cls, value: Any) -> Any:
        return {"enabled": value} if isinstance(value, bool) else value

    def resolved(self, base_dir: Path) -> MqttSettings:
        """TLS file paths made absolute against the config file's directory."""
        tls = self.tls.model_copy(update={
            name: str(base_dir / Path(value).expanduser()) for name in ("ca_certs", "certfile", "keyfile")
            if (value := getattr(self.tls, name))})
        return self.model_copy(update={"tls": tls})
