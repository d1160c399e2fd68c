"""The OPC UA sink follows the outbox with its own cursor (`sink_cursors` row `opcua`), read by a real asyncua
client: trigger answers reach `LastResult` in `seq` order, the counters count each inspection and each missed
deadline once, and a sink restarted mid-stream (also one whose cursor was not saved before it died) shows what the
first one showed plus what was committed while it was down, nothing twice; `ResetCounters` survives the restart."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace
from typing import Any

import pytest

from adapters.db.outbox import OPCUA_SINK, add_event, last_outbox_seq, reset_sink_cursor, sink_cursor
from adapters.db.tables import Inspection, OpcUaCounterReset
from adapters.events import RESULT, inspection_body
from adapters.opcua_settings import OpcUaConfig
from adapters.sinks import CommittedInspection, SinkContext
from adapters.sinks.opcua import OpcUaSink
from tests.services import free_port
from tests.waiting import wait_until

pytestmark = [pytest.mark.services]

T0 = datetime(2026, 12, 7, 12, 0, tzinfo=timezone.utc)
COUNTERS = ("Inspected", "OK", "NG", "DeadlineMissed")


def sink_for(sessions, port: int) -> OpcUaSink:
    settings = SimpleNamespace(
        opcua=OpcUaConfig(enabled=True, endpoint=f"opc.tcp://127.0.0.1:{port}/anomalyd", allow_anonymous=True),
        sources=[SimpleNamespace(id="press", line="l1", trigger="opcua"), SimpleNamespace(id="belt", line="l1")])
    return OpcUaSink(settings, SinkContext(sessions=sessions), poll_interval_s=0.1)


class Line:
    """Commits what the daemon's writer and trigger controller commit, and tells the sink as they do."""

    def __init__(self, sessions) -> None:
        self.sessions = sessions
        self.sink: OpcUaSink | None = None  # None: the daemon is down, rows are committed by nobody's tell
        self.n = 0

    def inspect(self, source: str, anomalous: bool | None, *, processing_ms: float = 20.0,
                meta: dict | None = None) -> int:
        self.n += 1
        captured = T0 + timedelta(seconds=self.n)
        processed = captured + timedelta(milliseconds=processing_ms)
        with self.sessions() as session, session.begin():
            row = Inspection(frame_id=f"f{self.n}", source=source, line="l1", captured_at=captured,
                             processed_at=processed, model_version="v1", score=0.9 if anomalous else 0.1,
                             threshold=0.5, is_anomalous=anomalous, regions=[{"x": 1}] if anomalous else [],
                             meta=meta)
            session.add(row)
            session.flush()
            if anomalous:  # the alert, in the same transaction
                add_event(session, "inspection", inspection_body(
                    inspection_id=row.id, frame_id=row.frame_id, captured_at=captured, source=source, line="l1",
                    score=0.9, threshold=0.5, model_version="v1", regions=[{"x": 1}]), inspection_id=row.id)
            inspection_id = row.id
        if self.sink is not None:
            self.sink.inspection_committed(CommittedInspection(
                inspection_id=inspection_id, frame_id=f"f{self.n}", source=source, line="l1", captured_at=captured,
                score=0.9 if anomalous else 0.1, threshold=0.5, is_anomalous=anomalous, model_version="v1",
                regions=[{"x": 1}] if anomalous else [], processed_at=processed))
            self.sink.alerts_committed()
        return inspection_id

    def answer(self, part: str, result: str, *, inspection_id: int | None = None, fail_safe: bool = False,
               late: bool = False) -> str:
        trigger_id = f"t-{part}"
        body: dict[str, Any] = {
            "trigger_id": trigger_id, "part_id": part, "source": "press", "line": "l1", "result": result,
            "fail_safe": fail_safe, "late": late, "latency_ms": 5.0, "ts": "2026-12-07T13:00:00.000Z",
            "inspection_id": inspection_id, "score": 0.9 if result == "NG" else 0.1 if inspection_id else None,
            "threshold": 0.5 if inspection_id else None, "regions": 1 if result == "NG" else 0,
            "model_version": "v1" if inspection_id else None}
        if fail_safe:
            body["reason"] = "deadline missed"
        with self.sessions() as session, session.begin():
            add_event(session, RESULT, body, event_id=str(uuid.uuid4()), inspection_id=inspection_id)
        if self.sink is not None:
            self.sink.alerts_committed()
        return trigger_id

    def triggered(self, part: str, anomalous: bool) -> int:
        inspection_id = self.inspect("press", anomalous, meta={"trigger_id": f"t-{part}", "part_id": part})
        self.answer(part, "NG" if anomalous else "OK", inspection_id=inspection_id)
        return inspection_id


async def read_source(port: int, source: str) -> dict[str, Any]:
    from asyncua import Client

    async with Client(f"opc.tcp://127.0.0.1:{port}/anomalyd", timeout=10) as client:
        idx = await client.get_namespace_index("urn:anomalyd:machine-vision")
        node = await client.nodes.objects.get_child([f"{idx}:anomalyd", f"{idx}:Sources", f"{idx}:{source}"])
        out = {}
        for group, names in (("Counters", COUNTERS), ("LastResult", ("InspectionId", "PartId", "Result",
                                                                     "TriggerId", "FailSafe", "Late")),
                             ("ProcessingTime", ("MinMs", "MaxMs"))):
            for name in names:
                out[f"{group}.{name}"] = await (await node.get_child([f"{idx}:{group}", f"{idx}:{name}"])).read_value()
        return out


def read_until(port: int, source: str, expected: dict[str, Any], timeout: float = 30) -> dict[str, Any]:
    """The source's variables once they include `expected` (or what they are at the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        seen = asyncio.run(read_source(port, source))
        if all(seen.get(key) == value for key, value in expected.items()) or time.monotonic() > deadline:
            return seen
        time.sleep(0.1)


def exact(values: dict[str, Any]) -> dict[str, Any]:
    """The values but the processing times (rebuilt in SQL: SQLite's julianday is exact to a millisecond)."""
    return {key: value for key, value in values.items() if not key.startswith("ProcessingTime.")}


def assert_same(seen: dict[str, Any], expected: dict[str, Any]) -> None:
    assert exact(seen) == exact(expected)
    assert {key: value for key, value in seen.items() if key not in exact(seen)} == \
        pytest.approx({key: value for key, value in expected.items() if key not in exact(expected)}, abs=0.05)


def started(sink: OpcUaSink) -> OpcUaSink:
    sink.start()
    assert wait_until(lambda: sink.server.started, 120), sink.server.start_error
    assert wait_until(lambda: sink.follower.cursor is not None, 30)
    return sink


def cursor_of(sessions) -> int | None:
    with sessions() as session:
        return sink_cursor(session, OPCUA_SINK)


def newest(sessions) -> int:
    with sessions() as session:
        return last_outbox_seq(session)


def test_answers_reach_last_result_in_seq_order_and_the_cursor_follows(sqlite_sessions):
    line = Line(sqlite_sessions)
    port = free_port()
    sink = sink_for(sqlite_sessions, port)
    shown: list[tuple[str, Any]] = []
    update = sink.server.update

    def recording(source_id: str, values: dict[str, Any]) -> None:
        if "LastResult.TriggerId" in values:
            shown.append((source_id, values["LastResult.TriggerId"]))
        update(source_id, values)

    sink.server.update = recording  # type: ignore[method-assign]
    line.sink = started(sink)
    try:
        assert cursor_of(sqlite_sessions) == 0  # created at the newest row (an empty outbox) on the first start
        for part in ("P1", "P2", "P3", "P4", "P5"):
            line.triggered(part, anomalous=part == "P3")
        # variables are read one by one while they change: wait until the last answer and its inspection's count are
        # both in view (a count that never reaches 5 still fails below)
        seen = read_until(port, "press", {"LastResult.TriggerId": "t-P5", "Counters.Inspected": 5,
                                                 "Counters.NG": 1, "Counters.OK": 4})
        assert seen["LastResult.PartId"] == "P5" and seen["LastResult.Result"] == "OK"
        assert seen["Counters.Inspected"] == 5 and seen["Counters.NG"] == 1 and seen["Counters.OK"] == 4
        # every answer was applied once, in seq order, each after its inspection (shown with an empty part id)
        assert [value for source, value in shown if source == "press" and value] == \
            ["t-P1", "t-P2", "t-P3", "t-P4", "t-P5"]
        assert wait_until(lambda: cursor_of(sqlite_sessions) == newest(sqlite_sessions) > 0, 10)
    finally:
        sink.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def any_sessions(request, tmp_path):
    """A migrated database of the test's own: SQLite, or one on the test PostgreSQL server."""
    from adapters.db import make_engine, make_session_factory, upgrade
    from tests.adapters.test_db import create_pg_database

    url = (f"sqlite:///{tmp_path}/test.db" if request.param == "sqlite"
           else create_pg_database(request.getfixturevalue("postgres").url))
    engine = make_engine(url)
    upgrade(engine)
    yield make_session_factory(engine)
    engine.dispose()


def test_a_restart_mid_stream_shows_the_same_values_and_counts_nothing_twice(any_sessions):
    line = Line(any_sessions)
    port = free_port()
    line.sink = started(sink_for(any_sessions, port))
    try:
        line.inspect("belt", False, processing_ms=10)
        line.inspect("belt", True, processing_ms=40)
        line.inspect("belt", None)  # no decision: neither OK nor NG
        line.triggered("P1", anomalous=False)
        line.answer("P2", "NG", fail_safe=True)  # the deadline passed ...
        late = line.inspect("press", False, meta={"trigger_id": "t-P2", "part_id": "P2"})
        line.answer("P2", "OK", inspection_id=late, late=True)  # ... and the late result: it counts, is not shown
        line.triggered("P3", anomalous=True)
        belt_before = read_until(port, "belt", {"Counters.Inspected": 3})
        press_before = read_until(port, "press", {"LastResult.TriggerId": "t-P3", "Counters.DeadlineMissed": 1})
        assert wait_until(lambda: cursor_of(any_sessions) == newest(any_sessions), 10)
    finally:
        line.sink.stop()
    assert {key: belt_before[f"Counters.{key}"] for key in COUNTERS} == \
        {"Inspected": 3, "OK": 1, "NG": 1, "DeadlineMissed": 0}
    assert belt_before["ProcessingTime.MinMs"] == pytest.approx(10, abs=0.5)
    assert belt_before["ProcessingTime.MaxMs"] == pytest.approx(40, abs=0.5)
    assert {key: press_before[f"Counters.{key}"] for key in COUNTERS} == \
        {"Inspected": 3, "OK": 2, "NG": 1, "DeadlineMissed": 1}
    assert press_before["LastResult.PartId"] == "P3" and press_before["LastResult.Result"] == "NG"

    # the same database, a new server: what the first one showed, nothing counted twice
    port = free_port()
    line.sink = started(sink_for(any_sessions, port))
    try:
        assert_same(read_until(port, "belt", exact(belt_before)), belt_before)
        assert_same(read_until(port, "press", exact(press_before)), press_before)
    finally:
        line.sink.stop()

    # committed while the daemon is down; and the daemon died before saving its cursor past the last rows
    line.sink = None
    line.answer("P4", "NG", fail_safe=True)
    line.inspect("belt", True)
    line.triggered("P5", anomalous=False)
    with any_sessions() as session, session.begin():
        old_cursor = newest(any_sessions) - 4  # the last result before the stop, and the three rows after it
        reset_sink_cursor(session, OPCUA_SINK, old_cursor)
    assert old_cursor > 0
    port = free_port()
    line.sink = started(sink_for(any_sessions, port))
    try:
        press = read_until(port, "press", {"LastResult.TriggerId": "t-P5", "Counters.DeadlineMissed": 2})
        belt = read_until(port, "belt", {"Counters.Inspected": 4})
        assert {key: press[f"Counters.{key}"] for key in COUNTERS} == \
            {"Inspected": 4, "OK": 3, "NG": 1, "DeadlineMissed": 2}
        assert press["LastResult.PartId"] == "P5" and press["LastResult.Result"] == "OK"
        assert press["LastResult.FailSafe"] is False and press["LastResult.Late"] is False
        assert {key: belt[f"Counters.{key}"] for key in COUNTERS} == \
            {"Inspected": 4, "OK": 1, "NG": 2, "DeadlineMissed": 0}
        assert wait_until(lambda: cursor_of(any_sessions) == newest(any_sessions), 10)
        # a few more live rows after the restore count once
        line.inspect("belt", False)
        line.answer("P6", "NG", fail_safe=True)
        press = read_until(port, "press", {"LastResult.TriggerId": "t-P6", "Counters.DeadlineMissed": 3})
        assert press["LastResult.FailSafe"] is True and press["LastResult.InspectionId"] == 0
        assert read_until(port, "belt", {"Counters.Inspected": 5})["Counters.OK"] == 2
    finally:
        line.sink.stop()


def test_reset_counters_is_stored_and_survives_a_restart(sqlite_sessions):
    line = Line(sqlite_sessions)
    port = free_port()
    line.sink = started(sink_for(sqlite_sessions, port))
    try:
        line.inspect("belt", False)
        line.inspect("belt", True)
        line.answer("P1", "NG", fail_safe=True)
        read_until(port, "press", {"Counters.DeadlineMissed": 1})
        read_until(port, "belt", {"Counters.Inspected": 2})
        assert line.sink.reset_counters("belt") and line.sink.reset_counters("press")
        assert not line.sink.reset_counters("nosuch")
        line.inspect("belt", False)
        belt = read_until(port, "belt", {"Counters.Inspected": 1})
        assert (belt["Counters.OK"], belt["Counters.NG"]) == (1, 0)
        assert read_until(port, "press", {"Counters.DeadlineMissed": 0})["Counters.DeadlineMissed"] == 0
    finally:
        line.sink.stop()
    with sqlite_sessions() as session:
        marks = {row.source: row for row in session.query(OpcUaCounterReset)}
    assert set(marks) == {"belt", "press"} and marks["belt"].inspection_id == 2
    line.sink = None
    line.answer("P2", "NG", fail_safe=True)
    port = free_port()
    line.sink = started(sink_for(sqlite_sessions, port))
    try:
        belt = read_until(port, "belt", {"Counters.Inspected": 1})
        assert (belt["Counters.Inspected"], belt["Counters.OK"], belt["Counters.NG"]) == (1, 1, 0)
        assert read_until(port, "press", {"Counters.DeadlineMissed": 1})["Counters.DeadlineMissed"] == 1
    finally:
        line.sink.stop()
