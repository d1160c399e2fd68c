"""The `[opcua]` section's settings models, apart from the server (`adapters.opcua`) so that reading the
configuration imports no asyncua (operator commands load the config and must start fast)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator


class OpcUaUser(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: str = Field(min_length=1)
    password: SecretStr | None = None
    password_file: str | None = None
    password_sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    role: Literal["viewer", "operator"] = "operator"

    @model_validator(mode="after")
    def _one_password(self) -> OpcUaUser:
        if self.password is None and self.password_sha256 is None:
            raise ValueError(f"opcua user {self.name!r}: give password, password_file or password_sha256")
        return self


class OpcUaConfig(BaseModel):
    """The OPC UA server (adapters/opcua.py), modelled on OPC 40100-1 (Machine Vision) concepts."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    enabled: bool = False
    endpoint: str = Field("opc.tcp://127.0.0.1:4840/anomalyd", pattern=r"^opc\.tcp://")
    namespace: str = "urn:anomalyd:machine-vision"
    allow_anonymous: bool = False
    users: list[OpcUaUser] = Field(default_factory=list)
    certificate: str | None = None  # PEM/DER server certificate; with private_key enables Sign/SignAndEncrypt
    private_key: str | None = None
    security: list[Literal["None", "Basic256Sha256_Sign", "Basic256Sha256_SignAndEncrypt"]] = Field(
        default_factory=lambda: ["None"])
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "WARNING", description="asyncua's own loggers (at INFO its start alone writes about a thousand lines)")

    @model_validator(mode="after")
    def _usable(self) -> OpcUaConfig:
        if self.enabled and not self.allow_anonymous and not self.users:
            raise ValueError("[opcua] enabled without users and allow_anonymous = false: nobody could connect")
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("[opcua] certificate and private_key go together")
        if any(mode != "None" for mode in self.security) and self.certificate is None:
            raise ValueError("[opcua] signed/encrypted security needs certificate and private_key")
        return self
