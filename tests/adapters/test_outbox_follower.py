"""The outbox follower (adapters/outbox_follower.py): a new sink starts at the newest row, applies the rows after
its cursor in seq order and moves the cursor only past rows it applied; a restart restores as of the saved cursor
and goes on from there; an apply that raises leaves the cursor where it was and is reported as a crash."""

from __future__ import annotations

from adapters.db.outbox import add_event, sink_cursor
from adapters.events import GEOMETRY, OutboxEvent
from adapters.outbox_follower import OutboxFollower
from tests.waiting import wait_until


def add(sessions, *names: str) -> None:
    for name in names:  # one transaction each: each its own seq, in this order
        with sessions() as session, session.begin():
            add_event(session, GEOMETRY, {"source": name})


def cursor(sessions, sink: str = "test") -> int | None:
    with sessions() as session:
        return sink_cursor(session, sink)


def test_follows_from_the_newest_row_in_seq_order_and_goes_on_after_a_restart(sqlite_sessions):
    add(sqlite_sessions, "before")
    applied: list[tuple[int, str]] = []
    restored: list[int] = []

    def follower() -> OutboxFollower:
        return OutboxFollower(sqlite_sessions, "test", apply=lambda e: applied.append((e.seq, e.body["source"])),
                              restore=lambda session, at: restored.append(at), poll_interval_s=0.05, batch=2)

    first = follower()
    first.start()
    try:
        assert wait_until(lambda: first.cursor is not None, 10)
        assert restored == [1] and cursor(sqlite_sessions) == 1  # created at the newest row: "before" is not applied
        add(sqlite_sessions, "a", "b", "c")
        first.notify()
        assert wait_until(lambda: cursor(sqlite_sessions) == 4, 10)
    finally:
        first.stop()
    assert applied == [(2, "a"), (3, "b"), (4, "c")]
    add(sqlite_sessions, "d", "e")  # while nobody follows
    second = follower()
    second.start()
    try:
        assert wait_until(lambda: cursor(sqlite_sessions) == 6, 10)
    finally:
        second.stop()
    assert restored == [1, 4] and applied[3:] == [(5, "d"), (6, "e")]


def test_a_failing_apply_keeps_the_cursor_and_is_a_crash(sqlite_sessions):
    seen: list[str] = []

    def apply(event: OutboxEvent) -> None:
        seen.append(event.body["source"])
        if event.body["source"] == "bad":
            raise RuntimeError("cannot show it")

    follower = OutboxFollower(sqlite_sessions, "test", apply=apply, poll_interval_s=0.05)
    follower.start()
    try:
        assert wait_until(lambda: follower.cursor is not None, 10)
        with sqlite_sessions() as session, session.begin():  # one commit: one batch
            for name in ("good", "bad", "after"):
                add_event(session, GEOMETRY, {"source": name})
        follower.notify()
        assert wait_until(lambda: follower.crashed is not None, 10)
    finally:
        follower.stop()
    assert seen == ["good", "bad"] and isinstance(follower.crashed, RuntimeError)
    assert cursor(sqlite_sessions) == 0 and not follower.alive  # the batch is applied again after a restart
