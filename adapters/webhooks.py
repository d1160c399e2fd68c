"""Webhooks: outbox events (alerts, trigger results, drifts, threshold changes) POSTed as JSON to configured URLs,
with the outbox's delivery guarantee.

Every event a sink must see is an `outbox` row (a neutral event, adapters/events.py) written in the same
transaction as what it reports. `webhook_request` is this sink's formatter: the body is the contract's JSON
message (the same document MQTT publishes, ../shared/spec/interfaces.md), the headers name the event and sign the
body. Each webhook keeps its own place in the outbox, in the database, so a receiver outage or a daemon restart
loses nothing and one slow receiver holds back no other sink:

- its cursor (`sink_cursors` row `webhook:<name>`): every outbox row up to it is delivered to the webhook (a 2xx
  came back) or filtered out by its filters. A webhook seen for the first time (or whose URL changed) starts at
  the newest row: it gets the events from then on.
- The relay POSTs the rows after the cursor one by one in `seq` order (seq order is commit order,
  adapters.db.tables.next_outbox_seq) and moves the cursor past each row in one transaction with the webhook's
  counters once the 2xx came back; a failure stops that webhook (order is kept) and retries the same row with
  capped exponential backoff.

The cursor moves only after the 2xx, so a crash between the two sends that message again: receivers deduplicate
on the payload `id` (the `X-Anomalyd-Id` header), as MQTT consumers do. Otherwise each event leaves once per
webhook, in `seq` order.

Destinations (unless a target has `allow_private`): public internet addresses only (`not is_global` is refused,
so carrier-grade NAT and its cloud metadata address too); the host is resolved once per POST, checked, and the
connection goes to that address with the original Host header and TLS SNI (`pinned_destination`), so a DNS answer
that changes between the check and the connection (rebinding) is never used. Logs and readiness show a target's URL
as `scheme://host:port` only (`adapters.redact.url_origin`): Slack, Discord and Teams keep the secret in the path.

Each POST carries `X-Anomalyd-Signature: sha256=<hex HMAC-SHA256 of the raw body with the shared secret>` (when
a secret is configured), `X-Anomalyd-Id`, `X-Anomalyd-Event` (`anomaly` | `result` | `drift` | `threshold` | `geometry`) and `X-Anomalyd-Timestamp`.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any
from urllib.parse import SplitResult, urlsplit

import httpx
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from adapters.db.outbox import (
    last_outbox_seq,
    outbox_after,
    reset_sink_cursor,
    set_sink_cursor,
    sink_cursor,
    webhook_sink,
)
from adapters.db.tables import WebhookEndpoint, utcnow
from adapters.events import OutboxEvent, contract_message
from adapters.redact import url_origin

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Anomalyd-Signature"


class WebhookConfigError(ValueError):
    """A webhook URL that is unusable or not allowed."""


def _is_blocked(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Anything but a public internet address: private, loopback, link-local, carrier-grade NAT (100.64.0.0/10,
    which holds the 100.100.100.200 cloud metadata address), documentation, reserved, multicast, unspecified."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return not address.is_global or address.is_multicast


def check_destination(url: str, *, allow_private: bool, resolve: bool = True) -> None:
    """Raise WebhookConfigError unless `url` is http(s) with a host that is public or explicitly allowed.

    A name is resolved (when `resolve`): each address it resolves to must be allowed. A name that does not
    resolve now is accepted (DNS may be down at start); the relay resolves and checks again before each
    connection, and connects to the address it checked (`pinned_destination`).
    """
    parts = _checked_parts(url)
    if allow_private:
        return
    host = parts.hostname or ""
    addresses = _literal_addresses(host)
    if addresses is None:
        addresses = _resolve(host) if resolve else []
    _refuse_blocked(url, addresses)


@dataclass(frozen=True)
class PinnedDestination:
    """Where a POST goes: the URL with the host replaced by the checked address, and the original host for the
    Host header and TLS (SNI and certificate check), so that a second DNS answer (rebinding) is never used."""

    url: str
    host_header: str | None = None
    sni_hostname: str | None = None


def pinned_destination(url: str, *, allow_private: bool) -> PinnedDestination:
    """Resolve `url`'s host once, check the address (unless `allow_private`), and pin the connection to it."""
    parts = _checked_parts(url)
    if allow_private:
        return PinnedDestination(url)
    host = parts.hostname or ""
    addresses = _literal_addresses(host)
    if addresses is not None:  # an address literal: no DNS involved
        _refuse_blocked(url, addresses)
        return PinnedDestination(url)
    addresses = _resolve(host)
    if not addresses:
        raise WebhookConfigError(f"webhook host {host!r} does not resolve")
    _refuse_blocked(url, addresses)
    address = addresses[0]
    literal = f"[{address}]" if address.version == 6 else str(address)
    netloc = f"{literal}:{parts.port}" if parts.port else literal
    return PinnedDestination(parts._replace(netloc=netloc).geturl(), host_header=parts.netloc,
                             sni_hostname=host if parts.scheme == "https" else None)


def _checked_parts(url: str) -> SplitResult:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise WebhookConfigError(f"webhook url {url_origin(url)!r}: scheme must be http or https, "
                                 f"not {parts.scheme or 'none'!r}")
    if not parts.hostname:
        raise WebhookConfigError(f"webhook url {url_origin(url)!r} has no host")
    if parts.username or parts.password:
        raise WebhookConfigError(f"webhook url {url_origin(url)!r}: credentials in the url; use a secret (HMAC) "
                                 "instead")
    return parts


def _literal_addresses(host: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address] | None:
    """The address a literal (or `localhost`) names; None for a name that needs DNS."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        if host == "localhost" or host.endswith(".localhost"):
            return [ipaddress.ip_address("127.0.0.1")]
        return None


def _refuse_blocked(url: str, addresses: Sequence[ipaddress.IPv4Address | ipaddress.IPv6Address]) -> None:
    blocked = [str(address) for address in addresses if _is_blocked(address)]
    if blocked:
        raise WebhookConfigError(
            f"webhook url {url_origin(url)!r} points at a private/loopback/non-public address "
            f"({', '.join(blocked)}); set allow_private = true on this [[webhooks]] entry to allow it")


def _resolve(host: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError):
        return []
    return [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]


def sign(secret: str, body: bytes) -> str:
    """The signature header's value for `body`."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, header: str) -> bool:
    """Receivers' check (constant time)."""
    return hmac.compare_digest(sign(secret, body), header or "")


@dataclass(frozen=True)
class WebhookRequest:
    """What one outbox event is POSTed as: the event name, the JSON document (for the filters; {} when the body
    is not an object), the body bytes and the headers (Host and the connection come later)."""

    event: str
    document: dict[str, Any]
    body: bytes
    headers: dict[str, str]


def webhook_request(event: OutboxEvent, secret: str | None, now: datetime | None = None) -> WebhookRequest:
    """The webhook sink's formatter: the contract's message of `event` as the body, `X-Anomalyd-Id` (the message
    id), `X-Anomalyd-Event` (`anomaly` | `result` | `drift` | `threshold`), `X-Anomalyd-Timestamp` and, with a
    secret, `X-Anomalyd-Signature` over the exact body."""
    kind, document, text = contract_message(event)
    body = text.encode()
    headers = {"Content-Type": "application/json", "User-Agent": "anomalyd-webhook/1",
               "X-Anomalyd-Id": event.id, "X-Anomalyd-Event": kind,
               "X-Anomalyd-Timestamp": (now or datetime.now(timezone.utc)).isoformat(timespec="seconds")}
    if secret:
        headers[SIGNATURE_HEADER] = sign(secret, body)
    return WebhookRequest(kind, document or {}, body, headers)


@dataclass
class WebhookTarget:
    """One `[[webhooks]]` entry, as the relay needs it."""

    name: str
    url: str
    secret: str | None = None
    sources: Sequence[str] | None = None
    lines: Sequence[str] | None = None
    anomalous_only: bool = True
    timeout_s: float = 5.0
    allow_private: bool = False
    backoff_min_s: float = 0.5
    backoff_max_s: float = 60.0

    def wants(self, payload: dict[str, Any], event: str) -> bool:
        if self.sources is not None and payload.get("source") not in self.sources:
            return False
        if self.lines is not None and payload.get("line") not in self.lines:
            return False
        return not self.anomalous_only or is_alarm(payload, event)


def is_alarm(payload: dict[str, Any], event: str) -> bool:
    """An alert, a source's drift (its start and its end), a change of a source's threshold or geometry, or a
    trigger result that is not OK (NG, no decision or a fail-safe answer)."""
    if event in ("anomaly", "drift", "threshold", "geometry"):
        return True
    if "result" in payload:
        return payload["result"] != "OK"
    return bool(payload.get("is_anomalous"))


@dataclass
class WebhookState:
    """What /metrics and readiness show per webhook (relay thread writes, readers copy)."""

    delivered: int = 0  # this process
    failures: int = 0  # failed attempts, this process
    skipped: int = 0
    pending: int = 0  # rows waiting (counted at the last scan, capped by the batch size)
    consecutive_failures: int = 0
    last_error: str | None = None
    last_success: float | None = None  # wall clock
    next_attempt: float = 0.0  # monotonic
    extra: dict[str, Any] = field(default_factory=dict)


class WebhookRelay:
    """One thread delivering the outbox to every webhook target; `start()` never blocks on a receiver."""

    def __init__(
        self,
        targets: Sequence[WebhookTarget],
        sessions: sessionmaker[Session],
        *,
        poll_interval_s: float = 0.5,
        batch: int = 50,
        on_delivered: Callable[[str, int], None] | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.targets = list(targets)
        self.sessions = sessions
        self.poll_interval_s = poll_interval_s
        self.batch = batch
        self.on_delivered = on_delivered
        self.state: dict[str, WebhookState] = {target.name: WebhookState() for target in self.targets}
        self._clients = {target.name: httpx.Client(timeout=target.timeout_s, follow_redirects=False,
                                                   transport=transport) for target in self.targets}
        self._wake = threading.Event()
        self._stopping = threading.Event()
        # flush(): a request number, and the highest request a whole idle pass started after (no stale "idle")
        self._flush_requested = 0
        self._idle_for = 0
        self._thread: threading.Thread | None = None
        self.crashed: BaseException | None = None

    # --- lifecycle ----------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._register()
        self._thread = threading.Thread(target=self._run, name="webhook-relay", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        for client in self._clients.values():
            client.close()

    def notify(self) -> None:
        """Outbox rows were committed: deliver them now (a backing-off webhook still waits its turn)."""
        self._wake.set()

    def flush(self, timeout: float) -> bool:
        """Wait until no webhook has anything pending (True) or `timeout` passes (False)."""
        deadline = time.monotonic() + timeout
        self._flush_requested += 1
        wanted = self._flush_requested
        self._wake.set()
        while time.monotonic() < deadline:
            if self._idle_for >= wanted:
                return True
            if self.crashed is not None or self._thread is None or not self._thread.is_alive():
                return False
            time.sleep(0.02)
        return self._idle_for >= wanted

    def _register(self) -> None:
        """A row and a cursor per target; a new target (or one whose url changed) starts at the newest row."""
        now = utcnow()
        with self.sessions() as session, session.begin():
            newest = last_outbox_seq(session)
            for target in self.targets:
                sink = webhook_sink(target.name)
                row = session.get(WebhookEndpoint, target.name)
                if row is None:
                    session.add(WebhookEndpoint(name=target.name, url=target.url, registered_at=now, delivered=0,
                                                failures=0))
                    reset_sink_cursor(session, sink, newest)
                    log.info("webhook %s (%s) registered: alerts from now on are delivered to it",
                             target.name, url_origin(target.url))
                elif row.url != target.url:
                    log.warning("webhook %s: url changed from %s to %s; delivering from now on",
                                target.name, url_origin(row.url), url_origin(target.url))
                    row.url, row.registered_at = target.url, now
                    reset_sink_cursor(session, sink, newest)
                elif sink_cursor(session, sink) is None:
                    reset_sink_cursor(session, sink, newest)

    # --- relay --------------------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            failing_since: float | None = None
            while not self._stopping.is_set():
                requested = self._flush_requested
                try:
                    more_now, waiting = self._pass()
                except SQLAlchemyError as exc:
                    if failing_since is None:
                        failing_since = time.monotonic()
                        log.warning("webhook relay cannot read the outbox (%s); retrying",
                                    str(exc).splitlines()[0][:300])
                    self._stopping.wait(min(5.0, 0.5 + time.monotonic() - failing_since))
                    continue
                if failing_since is not None:
                    log.info("webhook relay reads the outbox again")
                    failing_since = None
                if more_now:
                    continue
                if not waiting:
                    self._idle_for = requested
                self._wake.wait(self._sleep_time())
                self._wake.clear()
        except BaseException as exc:
            self.crashed = exc
            log.exception("webhook relay crashed")
            raise

    def _sleep_time(self) -> float:
        now = time.monotonic()
        waits = [state.next_attempt - now for state in self.state.values() if state.next_attempt > now]
        return max(0.01, min([self.poll_interval_s, *waits]))

    def _pass(self) -> tuple[bool, bool]:
        """One round over the targets: (a target has more to send right now, a target waits for a retry)."""
        more_now = waiting = False
        for target in self.targets:
            if self._stopping.is_set():
                break
            state = self.state[target.name]
            if state.next_attempt <= time.monotonic():
                more_now |= self._deliver(target, state)
            waiting |= state.next_attempt > time.monotonic()
        return more_now, waiting

    def _deliver(self, target: WebhookTarget, state: WebhookState) -> bool:
        """POST the rows after the target's cursor in order until one fails; True when there may be more now."""
        with self.sessions() as session:
            cursor = sink_cursor(session, webhook_sink(target.name))
            if cursor is None or session.get(WebhookEndpoint, target.name) is None:  # deleted: registered again
                cursor = None
            else:
                events = outbox_after(session, cursor, limit=self.batch)
        if cursor is None:
            self._register()
            return True
        state.pending = len(events)
        for index, event in enumerate(events):
            if self._stopping.is_set():
                return False
            request = webhook_request(event, target.secret)
            if not target.wants(request.document, request.event):
                self._settle(target.name, event.seq, delivered=False)
                state.skipped += 1
                state.pending = len(events) - index - 1
                continue
            error = self._post(target, request)
            if error is not None:
                self._failed(target, state, error)
                return False
            self._settle(target.name, event.seq, delivered=True)
            state.delivered += 1
            state.consecutive_failures = 0
            state.last_error = None
            state.last_success = time.time()
            state.pending = len(events) - index - 1
            if self.on_delivered is not None:
                self.on_delivered(target.name, 1)
        return len(events) >= self.batch

    def _post(self, target: WebhookTarget, request: WebhookRequest) -> str | None:
        """None on a 2xx, else what went wrong."""
        try:
            destination = pinned_destination(target.url, allow_private=target.allow_private)
        except WebhookConfigError as exc:
            return f"refused: {exc}"
        headers = dict(request.headers)
        if destination.host_header is not None:
            headers["Host"] = destination.host_header
        extensions = {"sni_hostname": destination.sni_hostname} if destination.sni_hostname else None
        try:
            response = self._clients[target.name].post(destination.url, content=request.body, headers=headers,
                                                       extensions=extensions)
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"[:300]
        if 200 <= response.status_code < 300:
            return None
        return f"HTTP {response.status_code}"

    def _failed(self, target: WebhookTarget, state: WebhookState, error: str) -> None:
        state.failures += 1
        state.consecutive_failures += 1
        delay = min(target.backoff_max_s, target.backoff_min_s * 2 ** min(state.consecutive_failures - 1, 20))
        state.next_attempt = time.monotonic() + delay
        if state.last_error != error or state.consecutive_failures in (1, 10, 100):
            log.warning("webhook %s (%s): %s; retrying in %.1fs (attempt %d), alerts wait in the outbox",
                        target.name, url_origin(target.url), error, delay, state.consecutive_failures)
        state.last_error = error
        with self.sessions() as session, session.begin():
            endpoint = session.get(WebhookEndpoint, target.name)
            if endpoint is not None:
                endpoint.failures += 1
                endpoint.last_error = error
                endpoint.last_attempt_at = utcnow()

    def _settle(self, name: str, seq: int, *, delivered: bool) -> None:
        """The row `seq` is done for this webhook (delivered, or filtered out): its cursor moves past it."""
        with self.sessions() as session, session.begin():
            set_sink_cursor(session, webhook_sink(name), seq)
            if delivered:
                endpoint = session.get(WebhookEndpoint, name)
                if endpoint is not None:
                    now = utcnow()
                    endpoint.delivered += 1
                    endpoint.last_attempt_at = endpoint.last_success_at = now

    # --- state --------------------------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Per webhook: url (scheme, host and port only: a path or query may hold its secret), delivered/failed counts, pending, last error and success."""
        out: dict[str, dict[str, Any]] = {}
        for target in self.targets:
            state = self.state[target.name]
            out[target.name] = {
                "url": url_origin(target.url), "delivered": state.delivered, "failures": state.failures,
                "skipped": state.skipped, "pending": state.pending,
                "consecutive_failures": state.consecutive_failures, "last_error": state.last_error,
                "last_success": (datetime.fromtimestamp(state.last_success, timezone.utc).isoformat()
                                 if state.last_success else None),
            }
        return out

