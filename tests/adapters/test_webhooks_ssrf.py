"""Webhook destinations: only public internet addresses (not carrier-grade NAT, where a cloud metadata service
answers on 100.100.100.200), and the POST goes to the address that was checked (no DNS rebinding in between)."""

from __future__ import annotations

import socket
import threading

import pytest

import adapters.webhooks as webhooks
from adapters.webhooks import WebhookConfigError, WebhookTarget, check_destination, pinned_destination
from tests.adapters.test_webhooks import add_alerts, relay_for
from tests.waiting import wait_until
from tests.webhook_receiver import Receiver

PUBLIC = "93.184.216.34"


@pytest.mark.parametrize("address", ["100.64.0.1", "100.100.100.200", "100.127.255.254", "192.0.2.10",
                                     "198.18.0.1", "[::ffff:100.100.100.200]", "[fd00::1]", "[fe80::1]", "0.0.0.0"])
def test_non_public_addresses_are_refused(address):
    with pytest.raises(WebhookConfigError, match="non-public"):
        check_destination(f"http://{address}/hook", allow_private=False)
    with pytest.raises(WebhookConfigError, match="non-public"):
        pinned_destination(f"http://{address}/hook", allow_private=False)


class FakeDns:
    """getaddrinfo for one test name: its answers in turn (the last one repeats); other names resolve as usual."""

    def __init__(self, monkeypatch, name: str, answers: list[str]) -> None:
        self.name, self.answers, self.calls = name, answers, 0
        self._real = socket.getaddrinfo
        self._lock = threading.Lock()
        monkeypatch.setattr(socket, "getaddrinfo", self.getaddrinfo)

    def getaddrinfo(self, host, port, *args, **kwargs):
        if host != self.name:
            return self._real(host, port, *args, **kwargs)
        with self._lock:
            address = self.answers[min(self.calls, len(self.answers) - 1)]
            self.calls += 1
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, port or 0))]


def test_a_name_resolving_to_the_metadata_address_is_never_posted_to(sqlite_sessions, monkeypatch):
    receiver = Receiver()
    FakeDns(monkeypatch, "metadata.test", ["100.100.100.200"])
    relay = relay_for(sqlite_sessions, WebhookTarget(name="cgnat", url=f"http://metadata.test:{receiver.port}/hook",
                                                     backoff_min_s=0.05, backoff_max_s=0.2, timeout_s=1))
    try:
        add_alerts(sqlite_sessions, 1)
        relay.notify()
        assert wait_until(lambda: relay.state["cgnat"].failures >= 1, 30)
        assert "100.100.100.200" in relay.state["cgnat"].last_error and "refused" in relay.state["cgnat"].last_error
        assert receiver.ids() == []
    finally:
        relay.stop()
        receiver.stop()


def test_dns_rebinding_after_the_check_does_not_reach_a_local_receiver(sqlite_sessions, monkeypatch):
    """The name answers a public address to the check, then 127.0.0.1: the POST must go to the checked address
    (unreachable here), never to the receiver on loopback."""
    receiver = Receiver()
    dns = FakeDns(monkeypatch, "rebind.test", [PUBLIC, "127.0.0.1"])
    relay = relay_for(sqlite_sessions, WebhookTarget(name="rebind", url=f"http://rebind.test:{receiver.port}/hook",
                                                     backoff_min_s=0.05, backoff_max_s=0.2, timeout_s=1))
    try:
        add_alerts(sqlite_sessions, 1)
        relay.notify()
        assert wait_until(lambda: relay.state["rebind"].failures >= 2, 30)
        assert receiver.ids() == []
        assert dns.calls == relay.state["rebind"].failures + relay.state["rebind"].delivered  # one lookup a POST
    finally:
        relay.stop()
        receiver.stop()


def test_the_post_goes_to_the_checked_address_with_the_original_host_header(sqlite_sessions, monkeypatch):
    """The pinned connection itself, end to end: the first answer (loopback, let through here by widening the
    filter) gets the POST with `Host: hooks.test:<port>`; a later, different answer is never used."""
    receiver = Receiver()
    dns = FakeDns(monkeypatch, "hooks.test", ["127.0.0.1", "10.255.255.1"])
    monkeypatch.setattr(webhooks, "_is_blocked", lambda address: not address.is_loopback)
    relay = relay_for(sqlite_sessions, WebhookTarget(name="pinned", url=f"http://hooks.test:{receiver.port}/hook",
                                                     backoff_min_s=0.05, backoff_max_s=0.2, timeout_s=2))
    try:
        ids = add_alerts(sqlite_sessions, 1)
        relay.notify()
        assert wait_until(lambda: receiver.ids() == ids, 30)
        headers, _ = receiver.bodies()[0]
        assert headers["host"] == f"hooks.test:{receiver.port}"
        assert dns.calls == 1
    finally:
        relay.stop()
        receiver.stop()


def test_https_keeps_the_name_for_sni_and_the_certificate_check(monkeypatch):
    FakeDns(monkeypatch, "hooks.example", [PUBLIC])
    destination = pinned_destination("https://hooks.example/services/T/B/secret", allow_private=False)
    assert destination.url == f"https://{PUBLIC}/services/T/B/secret"
    assert destination.host_header == "hooks.example" and destination.sni_hostname == "hooks.example"
