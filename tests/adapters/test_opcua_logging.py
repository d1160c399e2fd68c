"""Turning OPC UA on does not flood the log: asyncua's loggers are at WARNING unless `[opcua].log_level` says
otherwise (at INFO, its server start alone wrote about a thousand lines)."""

from __future__ import annotations

import logging

import pytest

from adapters.opcua import OpcUaHandlers, OpcUaServer, OpcUaSettings, OpcUaSource
from tests.services import free_port


def _refuse(*args):
    raise RuntimeError("not in this test")


def asyncua_lines_at_start(caplog, **settings) -> int:
    """asyncua's lines below WARNING while its server starts (its warnings, e.g. about plaintext passwords, stay)."""
    caplog.clear()
    server = OpcUaServer(OpcUaSettings(endpoint=f"opc.tcp://127.0.0.1:{free_port()}/anomalyd", allow_anonymous=True,
                                       **settings),
                         [OpcUaSource("press", "l1")], OpcUaHandlers(_refuse, _refuse, _refuse))
    server.start(timeout=120)
    try:
        return sum(1 for record in caplog.records
                   if record.name.startswith("asyncua") and record.levelno < logging.WARNING)
    finally:
        server.stop()


@pytest.fixture
def asyncua_level():
    level = logging.getLogger("asyncua").level
    yield
    logging.getLogger("asyncua").setLevel(level)


def test_asyncua_is_quiet_by_default_and_configurable(caplog, asyncua_level):
    caplog.set_level(logging.INFO)  # the daemon's own level
    assert asyncua_lines_at_start(caplog) == 0
    assert asyncua_lines_at_start(caplog, log_level="INFO") > 100  # what the default used to write
