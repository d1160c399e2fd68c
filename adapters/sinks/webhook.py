"""The webhook sink: the outbox (alerts, trigger answers) POSTed to every `[[webhooks]]` URL with the outbox's
delivery guarantee, per-URL delivery state in the database and an HMAC-SHA256 signature (adapters/webhooks.py).

Configured by the `[[webhooks]]` tables (`adapters.webhook_settings.WebhookConfig`); no table, no sink.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from adapters.sinks import ResultSink, SinkContext, register_sink
from adapters.webhooks import WebhookRelay, WebhookTarget


class WebhookSink(ResultSink):
    name = "webhooks"

    def __init__(self, targets: Sequence[WebhookTarget], context: SinkContext) -> None:
        if context.sessions is None:
            raise ValueError("the webhook sink needs the database (its messages wait in the outbox)")
        self.relay = WebhookRelay(targets, context.sessions)

    def start(self) -> None:
        self.relay.start()

    def alerts_committed(self) -> None:
        self.relay.notify()

    def flush(self, timeout: float) -> bool:
        return self.relay.flush(timeout)

    def pending(self) -> int:
        return sum(state.pending for state in self.relay.state.values())

    def health(self) -> dict[str, Any]:
        return self.relay.snapshot()

    def problem(self) -> str | None:
        return None if self.relay.crashed is None else f"webhook relay crashed: {self.relay.crashed!r}"

    def stop(self, timeout: float = 2.0) -> None:
        self.relay.stop(timeout)


def targets_from_config(webhooks: Sequence[Any]) -> list[WebhookTarget]:
    """`[[webhooks]]` tables (adapters.webhook_settings.WebhookConfig) → relay targets."""
    return [WebhookTarget(name=w.key, url=w.url, secret=w.secret.get_secret_value() if w.secret else None,
                          sources=w.sources, lines=w.lines, anomalous_only=w.anomalous_only, timeout_s=w.timeout_s,
                          allow_private=w.allow_private, backoff_max_s=w.backoff_max_s) for w in webhooks]


@register_sink("webhooks", section="webhooks")
def build_webhook_sink(webhooks: Sequence[Any], context: SinkContext) -> WebhookSink | None:
    return WebhookSink(targets_from_config(webhooks), context) if webhooks else None
