"""The daemon's OPC UA variables across a daemon restart, read by a real asyncua client: the second daemon shows
the counters and last results the first one showed (rebuilt from the database, nothing counted twice), counts on
from there, and its outbox cursor (`sink_cursors` row `opcua`) stands at the newest row."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import pytest

from adapters.db.outbox import OPCUA_SINK, last_outbox_seq, sink_cursor
from tests.daemon.test_factory_integration import (
    OPCUA,
    LiveSource,
    rows,
    sources_config,
    start_service,
    write_config,
)
from tests.daemon.test_pipeline import BrightnessDetector, MemorySource
from tests.services import free_port
from tests.waiting import wait_until

pytestmark = [pytest.mark.services]

NAMES = {"Counters": ("Inspected", "OK", "NG", "DeadlineMissed"),
         "LastResult": ("InspectionId", "PartId", "Result", "TriggerId")}


async def read(port: int) -> dict[str, dict[str, Any]]:
    from asyncua import Client

    client = Client(f"opc.tcp://127.0.0.1:{port}/anomalyd", timeout=10)
    client.set_user("scada")
    client.set_password("scada-pass")
    async with client:
        idx = await client.get_namespace_index("urn:anomalyd:machine-vision")
        sources = await client.nodes.objects.get_child([f"{idx}:anomalyd", f"{idx}:Sources"])
        out: dict[str, dict[str, Any]] = {}
        for source in ("press", "belt"):
            node = await sources.get_child([f"{idx}:{source}"])
            out[source] = {f"{group}.{name}": await (await node.get_child([f"{idx}:{group}", f"{idx}:{name}"]))
                           .read_value() for group, names in NAMES.items() for name in names}
        return out


def cursor_at_newest(service) -> bool:
    with service.sessions() as session:
        return sink_cursor(session, OPCUA_SINK) == last_outbox_seq(session) > 0


def read_until(port: int, check, timeout: float = 60) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        seen = asyncio.run(read(port))
        if check(seen) or time.monotonic() > deadline:
            return seen
        time.sleep(0.1)


def test_a_restarted_daemon_shows_the_same_counters_and_results_and_counts_on(tmp_path):
    port = free_port()
    config = write_config(tmp_path, sources_config("opcua", deadline=60_000) + OPCUA.format(port=port))

    def run():
        belt = MemorySource("belt", "l1")
        service = start_service(config, BrightnessDetector(image_size=32), [LiveSource("press", value=230), belt])
        assert wait_until(lambda: service.sinks.get("opcua").server.started, 120)
        return service, belt

    service, belt = run()
    try:
        for index, value in enumerate((220, 20, 20)):  # NG, OK, OK
            belt.push(f"f{index}", image=np.full((24, 32, 3), value, np.uint8))
        belt.wait_acks(3)
        trigger_id = service.integrations.trigger("press", "P-7", "opcua")
        # the variables are read one by one: wait until the answer and its inspection's count are both in view
        before = read_until(port, lambda seen: seen["belt"]["Counters.Inspected"] == 3
                            and seen["press"]["LastResult.TriggerId"] == trigger_id
                            and seen["press"]["Counters.Inspected"] == 1)
        assert wait_until(lambda: cursor_at_newest(service), 30)
    finally:
        service.stop()
    [pressed] = rows(service, "press")
    assert before["press"] == {"Counters.Inspected": 1, "Counters.OK": 0, "Counters.NG": 1,
                               "Counters.DeadlineMissed": 0, "LastResult.InspectionId": pressed.id,
                               "LastResult.PartId": "P-7", "LastResult.Result": "NG", "LastResult.TriggerId": trigger_id}
    assert {key: before["belt"][f"Counters.{key}"] for key in ("Inspected", "OK", "NG")} == \
        {"Inspected": 3, "OK": 2, "NG": 1}
    assert before["belt"]["LastResult.InspectionId"] == rows(service, "belt")[-1].id

    service, belt = run()
    try:
        assert read_until(port, lambda seen: seen == before) == before  # rebuilt, nothing counted twice
        belt.push("f3", image=np.full((24, 32, 3), 220, np.uint8))
        belt.wait_acks(1)
        after = read_until(port, lambda seen: seen["belt"]["Counters.Inspected"] != 3)
        assert {key: after["belt"][f"Counters.{key}"] for key in ("Inspected", "OK", "NG")} == \
            {"Inspected": 4, "OK": 2, "NG": 2}
        assert after["belt"]["LastResult.InspectionId"] == rows(service, "belt")[-1].id
        assert after["press"] == before["press"]
        assert wait_until(lambda: cursor_at_newest(service), 30)
    finally:
        service.stop()
