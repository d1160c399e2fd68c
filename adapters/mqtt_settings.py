"""The `[mqtt]` section's settings models, apart from the client (`adapters.mqtt`) so that reading the
configuration imports no paho/SQLAlchemy (operator commands load the config and must start fast)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator


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
    # when listed here: anyone who may publish on the broker could otherwise trigger or switch models. And each
    # command must pass `command_guard`: "hmac" (default) accepts only commands signed with `command_secret`
    # (adapters/mqtt_commands.py); "broker" trusts the broker's authentication and ACLs (the daemon must log in
    # with `username`, and the broker must let only trusted clients publish on the command topics).
    commands: list[Literal["trigger", "activate"]] = Field(default_factory=list)
    command_guard: Literal["hmac", "broker"] = "hmac"
    command_secret: SecretStr | None = None
    command_secret_file: str | None = None
    command_max_age_s: float = Field(60.0, gt=0, description="signed commands: accepted timestamp skew")

    @model_validator(mode="after")
    def _guarded_commands(self) -> MqttSettings:
        if not self.commands:
            return self
        if self.command_guard == "hmac" and self.command_secret is None:
            raise ValueError("[mqtt].commands needs command_secret (or command_secret_file): commands are signed "
                             "with it (HMAC-SHA256); or command_guard = \"broker\" with broker credentials and ACLs")
        if self.command_guard == "broker" and not self.username:
            raise ValueError("[mqtt] command_guard = \"broker\" needs username (and password): an anonymous "
                             "broker lets anyone publish commands")
        return self

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
