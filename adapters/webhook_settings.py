"""The `[[webhooks]]` tables' settings model, apart from the relay (`adapters.webhooks`) so that reading the
configuration imports no httpx/SQLAlchemy (operator commands load the config and must start fast). The relay's
destination check is imported only when a webhook is configured."""

from __future__ import annotations

import hashlib

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator


class WebhookConfig(BaseModel):
    """One `[[webhooks]]` table: alerts (and trigger answers) POSTed as JSON with the outbox's guarantee
    (adapters/sinks/webhook.py)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    url: str = Field(min_length=1)
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$", description="default: derived from the url")
    secret: SecretStr | None = None
    secret_file: str | None = None
    sources: list[str] | None = None  # None: every source
    lines: list[str] | None = None
    anomalous_only: bool = True
    timeout_s: float = Field(5.0, gt=0, le=300)
    # Private, loopback and link-local destinations are refused unless allowed: a webhook must not become a
    # way to reach the plant's internal services from the config file or the environment.
    allow_private: bool = False
    backoff_max_s: float = Field(60.0, gt=0)

    @model_validator(mode="after")
    def _safe_destination(self) -> WebhookConfig:
        from adapters.webhooks import check_destination

        check_destination(self.url, allow_private=self.allow_private)
        return self

    @property
    def key(self) -> str:
        """The name delivery state is stored under (stable across restarts and reordering)."""
        return self.name or "webhook-" + hashlib.sha256(self.url.encode()).hexdigest()[:10]
