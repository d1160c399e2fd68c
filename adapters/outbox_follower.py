"""Following the outbox with a cursor of one's own: the loop of a sink that applies events locally.

A sink that shows the outbox's events itself (OPC UA: variables of its own server) rather than sending them to a
receiver that acknowledges has nothing to wait for, so its loop is always the same; `OutboxFollower` is that loop,
on the outbox functions every sink uses (adapters/db/outbox.py: `sink_cursor`, `outbox_after`, `set_sink_cursor`):

- at start, in one session, it reads its cursor (`sink_cursors` row `sink`; created at the newest row the first
  time) and hands it to `restore(session, cursor)`: the sink rebuilds what it shows from the database as of the
  cursor;
- then it reads the rows after the cursor in `seq` order (commit order), calls `apply(event)` for each and moves
  the cursor past them once they are applied (one transaction per batch). A crash in between applies those rows
  again after the restart, to a state restored as of the old cursor: each row counts once.
- `notify()` (new rows committed) wakes it; it also polls every `poll_interval_s` (rows committed by other
  processes: `anomalyd geometry set`). A database outage is waited out (logged once), never fatal; an exception
  from `restore` or `apply` is a crash (`crashed`), which the sink reports as its `problem()`.

MQTT and webhooks deliver to a receiver that must acknowledge (PUBACKs in flight, per-URL backoff) and keep their
own loops (adapters/mqtt.py, adapters/webhooks.py) on the same outbox functions.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from adapters.db.outbox import last_outbox_seq, outbox_after, reset_sink_cursor, set_sink_cursor, sink_cursor
from adapters.events import OutboxEvent

log = logging.getLogger(__name__)


class OutboxFollower:
    """One thread applying the outbox rows after `sink`'s cursor, in `seq` order; `start()` never blocks."""

    def __init__(self, sessions: sessionmaker[Session], sink: str, *, apply: Callable[[OutboxEvent], None],
                 restore: Callable[[Session, int], None] | None = None,
                 after_pass: Callable[[], None] | None = None, batch: int = 200,
                 poll_interval_s: float = 1.0) -> None:
        self.sessions = sessions
        self.sink = sink
        self.apply = apply
        self.restore = restore
        self.after_pass = after_pass  # after each pass over the outbox, also an empty one (the sink's own queue)
        self.batch = batch
        self.poll_interval_s = poll_interval_s
        self.cursor: int | None = None  # every row up to it is applied (None until restored)
        self.crashed: BaseException | None = None
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"outbox-{self.sink}", daemon=True)
        self._thread.start()

    def notify(self) -> None:
        """Rows were committed: apply them now."""
        self._wake.set()

    def stop(self, timeout: float = 2.0) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        failing_since: float | None = None
        try:
            while not self._stopping.is_set():
                try:
                    if self.cursor is None:
                        self._open()
                    more = self.step()
                except SQLAlchemyError as exc:
                    if failing_since is None:
                        failing_since = time.monotonic()
                        log.warning("%s: cannot read the outbox (%s); retrying", self.sink,
                                    str(exc).splitlines()[0][:300])
                    self._stopping.wait(min(5.0, 0.5 + time.monotonic() - failing_since))
                    continue
                if failing_since is not None:
                    log.info("%s: reads the outbox again", self.sink)
                    failing_since = None
                if more:
                    continue
                self._wake.wait(self.poll_interval_s)
                self._wake.clear()
        except BaseException as exc:
            self.crashed = exc
            log.exception("%s: outbox follower crashed", self.sink)  # the thread ends; problem() says why

    def _open(self) -> None:
        """The cursor (at the newest row the first time) and the sink's state as of it, in one session."""
        with self.sessions() as session, session.begin():
            cursor = sink_cursor(session, self.sink)
            if cursor is None:
                cursor = last_outbox_seq(session)
                reset_sink_cursor(session, self.sink, cursor)
                log.info("%s: follows the outbox from row %d on", self.sink, cursor)
            if self.restore is not None:
                self.restore(session, cursor)
        self.cursor = cursor

    def step(self) -> bool:
        """Apply one batch of rows after the cursor and move it past them; True when there may be more now."""
        assert self.cursor is not None
        with self.sessions() as session:
            events = outbox_after(session, self.cursor, limit=self.batch)
        for event in events:
            self.apply(event)
        if events:
            with self.sessions() as session, session.begin():
                set_sink_cursor(session, self.sink, events[-1].seq)
            self.cursor = events[-1].seq
        if self.after_pass is not None:
            self.after_pass()
        return len(events) >= self.batch
