"""A source's drift on OPC UA, read by a real asyncua client: the daemon's drift record (daemon/zero_label/drift.py, from the
drift watch's per-frame notes, no model) commits a drift, the OPC UA sink is told as the writer tells it
(`alerts_committed`), and the source's `Drift` / `DriftStartedAt` show it until it ends; the other source stays
out of drift; a drift left open in the database shows as soon as the server starts."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest

from adapters.opcua_settings import OpcUaConfig
from adapters.sinks import SinkContext
from adapters.sinks.opcua import NO_DRIFT, OpcUaSink
from daemon.zero_label.drift import DriftTracker
from tests.services import free_port
from tests.waiting import wait_until

pytestmark = [pytest.mark.services]

T0 = datetime(2026, 12, 7, 12, 0, tzinfo=timezone.utc)
VERSION = "patchcore-efficientnet-lite0-t4-10-s256+ref-abc-k8"


def note(index: int, start: int | None, **more) -> dict:
    return {"decided": True, "drift_index": index, "drifting": False, "excursion_start": start, **more}


def sink_for(sessions, port: int) -> OpcUaSink:
    settings = SimpleNamespace(
        opcua=OpcUaConfig(enabled=True, endpoint=f"opc.tcp://127.0.0.1:{port}/anomalyd", allow_anonymous=True),
        sources=[SimpleNamespace(id="press", line="l1", trigger=None), SimpleNamespace(id="belt", line="l1")])
    return OpcUaSink(settings, SinkContext(sessions=sessions))


async def read_drift(port: int) -> dict[str, tuple[bool, datetime]]:
    from asyncua import Client

    async with Client(f"opc.tcp://127.0.0.1:{port}/anomalyd", timeout=10) as client:
        idx = await client.get_namespace_index("urn:anomalyd:machine-vision")
        sources = await client.nodes.objects.get_child([f"{idx}:anomalyd", f"{idx}:Sources"])
        out = {}
        for source in ("press", "belt"):
            node = await sources.get_child([f"{idx}:{source}"])
            drift = await (await node.get_child([f"{idx}:Drift"])).read_value()
            started = await (await node.get_child([f"{idx}:DriftStartedAt"])).read_value()
            out[source] = (drift, started.replace(tzinfo=timezone.utc))
        return out


def read_until(port: int, expected: dict, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        seen = asyncio.run(read_drift(port))
        if seen == expected or time.monotonic() > deadline:
            return seen
        time.sleep(0.1)


def test_drift_and_its_start_are_source_variables_from_the_event_to_its_end(sqlite_sessions):
    port = free_port()
    tracker = DriftTracker(sqlite_sessions)
    sink = sink_for(sqlite_sessions, port)
    sink.start()
    try:
        assert wait_until(lambda: sink.server.started, 120), sink.server.start_error
        assert read_until(port, {"press": (False, NO_DRIFT), "belt": (False, NO_DRIFT)}) == \
            {"press": (False, NO_DRIFT), "belt": (False, NO_DRIFT)}
        # the drift watch signals on the third frame of an excursion that began at T0 + 2 s
        signal = {"frame": 2, "detected_at": 4, "share": 0.6}
        for index, frame_note in enumerate([note(2, 2), note(3, 2), note(4, 2, drifting=True, drift_event=signal)]):
            tracker.observe("press", "l1", VERSION, frame_note, T0 + timedelta(seconds=2 + index))
        assert tracker.publish()
        sink.alerts_committed()  # what the writer calls after the commit
        started = T0 + timedelta(seconds=2)
        assert read_until(port, {"press": (True, started), "belt": (False, NO_DRIFT)}) == \
            {"press": (True, started), "belt": (False, NO_DRIFT)}
        # the frames match the references again: the drift ends, and so does the variable
        tracker.observe("press", "l1", VERSION, {**note(5, None), "drift_cleared": True}, T0 + timedelta(seconds=5))
        assert tracker.publish()
        sink.alerts_committed()
        assert read_until(port, {"press": (False, NO_DRIFT), "belt": (False, NO_DRIFT)}) == \
            {"press": (False, NO_DRIFT), "belt": (False, NO_DRIFT)}
        # a new drift on the other source, open when the server goes down ...
        tracker.observe("belt", "l1", VERSION, note(7, 7, drifting=True, drift_event={
            "frame": 7, "detected_at": 7, "share": 0.9}), T0 + timedelta(seconds=7))
        assert tracker.publish()
    finally:
        sink.stop()
    # ... shows on the next server at once, with no commit to tell it
    port = free_port()
    again = sink_for(sqlite_sessions, port)
    again.start()
    try:
        assert wait_until(lambda: again.server.started, 120), again.server.start_error
        belt = (True, T0 + timedelta(seconds=7))
        assert read_until(port, {"press": (False, NO_DRIFT), "belt": belt}) == \
            {"press": (False, NO_DRIFT), "belt": belt}
    finally:
        again.stop()
