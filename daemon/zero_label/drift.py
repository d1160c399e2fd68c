"""A source's drift as the daemon reports it: one event per drift, on MQTT, webhooks, metrics and the API.

Mutual scoring's drift watch (model/drift.py) tells a changed line (a new variant, a moved camera, new
light: almost every patch of every frame unmatched) from a defect flood (a region of each part) and notes, per
frame, what it saw (`Prediction.notes`); a source scored against references (PatchCore) gets the same notes from
the same test on its map (daemon/detectors/drift_watch.py). The result writer hands every scored frame to
`DriftTracker.observe` (before its row is written) and calls `publish` after each batch's commit:

- **Start.** The frame on which the watch signals opens a `drift_events` row: `started_at` is the capture time of
  the first frame of the excursion (the first frame whose unmatched share pushed the CUSUM above 0),
  `detected_at` the signalling frame's. One message goes to the outbox on `<prefix>/<line>/<source>/drift`,
  QoS 1 and **retained** (a state, like `/status` and `/threshold`), so MQTT (the outbox relay) and every
  webhook (`X-Anomalyd-Event: drift`) get it with the outbox's delivery guarantee. It offers the frames since the
  start as new references: `references_proposal` is `GET /api/sources/<id>/references/proposal?since=<start>`.
- **While it lasts**, on a source on mutual scoring, a frame that would have alerted is recorded with **no decision** (`is_anomalous` NULL,
  `meta.no_decision = "drift"`, its score kept) and raises no alert: the frames are judged against a line that is
  no longer there, so their alerts would be hundreds of copies of the one message that matters. The count
  (`suppressed`) is on the row and in the cleared message. A frame that still matches the window is recorded
  normal. A defect flood is not hidden: it does not make a drift (its good parts set the watch back), so its
  alerts go out. A source scored against references reports its drift but keeps alerting (`_holds_alerts`): its
  references are curated, so a frame far from them is alerted whatever the cause, and a run of large defects the
  watch takes for a change must never be hidden.
- **End.** When the watch sees normal-looking frames again (the frames match the window: one frame; or the
  references: 3 in a row, `END_AFTER` in daemon/detectors/drift_watch.py, so a mixed stream is one drift), when the
  source's frames are scored by another model version than the drift's (new references approved), or at the next
  start of the daemon (the window starts again), the row gets `cleared_at` and the reason, and a second retained
  message says so.

Metrics: `anomalyd_source_drift{source}` (1 while in drift), `anomalyd_drift_events_total{source}`.
The frames of the excursion before the signal (3-10 with the watches' defaults) were judged before anyone knew:
their alerts went out.
"""

from __future__ import annotations

import logging
import threading
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select, update

from adapters.db.outbox import add_event
from adapters.db.tables import DriftEvent, lock_outbox
from adapters.events import DRIFT, without_id
from adapters.timeutil import rfc3339, utc_now
from daemon.zero_label.start import version_prefix

log = logging.getLogger("anomalyd.drift")



@dataclass
class _Active:
    """The open drift of one source."""

    row_id: int | None  # None until written
    uuid: str
    source: str
    line: str
    model_version: str
    started_at: datetime
    detected_at: datetime
    frames: int
    share: float
    suppressed: int = 0
    written_suppressed: int = 0


@dataclass
class _Pending:
    started: list[_Active] = field(default_factory=list)
    cleared: list[tuple[_Active, str]] = field(default_factory=list)
    suppressed: set[str] = field(default_factory=set)  # sources whose count changed


def proposal_url(source: str, since: datetime) -> str:
    return f"/api/sources/{source}/references/proposal?since={rfc3339(since)}"


def drift_payload(event: _Active | Any, state: str, *, cleared_at: datetime | None = None,
                  reason: str | None = None) -> dict[str, Any]:
    """The message on `<prefix>/<line>/<source>/drift` (and to webhooks); `id` is what consumers dedupe on."""
    return {
        "id": str(uuid.uuid4()), "event": "drift", "state": state, "drift_id": event.uuid,
        "source": event.source, "line": event.line, "model_version": event.model_version,
        "started_at": rfc3339(event.started_at), "detected_at": rfc3339(event.detected_at),
        "frames": int(event.frames), "share": round(float(event.share), 4), "suppressed": int(event.suppressed),
        "cleared_at": rfc3339(cleared_at) if cleared_at is not None else None, "reason": reason,
        "ts": rfc3339(utc_now()), "references_proposal": proposal_url(event.source, event.started_at),
    }


def _holds_alerts(active: _Active) -> bool:
    """Whether a drift holds its source's alerts back: on mutual scoring, whose window judges each frame against the
    line as it was, every frame of a changed line would alert. A source scored against references keeps alerting:
    its references are curated, so a frame far from them is alerted whatever the cause, and a run of defects that
    the watch takes for a change (a flood of large defects) must never be hidden."""
    return active.model_version.startswith(version_prefix())


class DriftTracker:
    """Per-source drift state between the detector's notes and the database (see the module docstring)."""

    def __init__(self, sessions: Any, *, metrics: Any = None) -> None:
        self.sessions = sessions
        self.metrics = metrics
        self.active: dict[str, _Active] = {}
        self._starts: dict[str, tuple[int, datetime]] = {}  # source → (watch index, capture time) of the excursion
        self._pending = _Pending()
        self._lock = threading.Lock()

    # -- before the commit (writer thread, per frame) -------------------------------------------------------------
    def observe(self, source: str, line: str, model_version: str, notes: dict[str, Any] | None,
                captured_at: datetime) -> bool:
        """Account one scored frame; True when its source is in drift for this frame and its alerts are held back
        (a would-be alert is then recorded with no decision: call `suppressed`). Only a source on mutual scoring
        holds alerts back: one scored against references keeps alerting through its drift (`_holds_alerts`)."""
        notes = notes or {}
        with self._lock:
            active = self.active.get(source)
            if active is not None and model_version != active.model_version:
                self._clear(source, f"the source is scored by {model_version} now (new references)")
                return False
            index, start = notes.get("drift_index"), notes.get("excursion_start")
            if index is not None and start is not None and start == index:
                self._starts[source] = (int(index), captured_at)
            event = notes.get("drift_event")
            if event is not None and active is None:
                known = self._starts.get(source)
                started_at = known[1] if known is not None and known[0] == event["frame"] else captured_at
                opened = _Active(row_id=None, uuid=str(uuid.uuid4()), source=source, line=line,
                                 model_version=model_version, started_at=started_at, detected_at=captured_at,
                                 frames=int(event["detected_at"]) - int(event["frame"]) + 1,
                                 share=float(event["share"]))
                self.active[source] = opened
                self._pending.started.append(opened)
                log.warning("source %s: drift since %s (%d frames, %.0f %% of their patches unmatched): %s; new "
                            "references offered at %s", source, rfc3339(started_at), opened.frames, 100 * opened.share,
                            "alerts held back until it ends" if _holds_alerts(opened) else "its alerts still go out",
                            proposal_url(source, started_at))
                return _holds_alerts(opened)
            if notes.get("drift_cleared") and active is not None:
                what = "window" if active.model_version.startswith(version_prefix()) else "references"
                self._clear(source, f"the frames match the {what} again")
                return False
            return active is not None and _holds_alerts(active) and bool(notes.get("drifting", True))

    def suppressed(self, source: str) -> None:
        """A would-be alert of `source` was recorded with no decision (the source is in drift)."""
        with self._lock:
            active = self.active.get(source)
            if active is not None:
                active.suppressed += 1
                self._pending.suppressed.add(source)

    def _clear(self, source: str, reason: str) -> None:
        active = self.active.pop(source)
        self._starts.pop(source, None)
        self._pending.cleared.append((active, reason))
        log.warning("source %s: drift since %s ended: %s (%d alerts held back)", source, rfc3339(active.started_at),
                    reason, active.suppressed)

    # -- after the commit ---------------------------------------------------------------------------------------------
    def publish(self) -> bool:
        """Write what the last frames started, counted and cleared (rows + retained outbox messages); True when
        outbox messages were added (wake the sinks)."""
        with self._lock:
            pending, self._pending = self._pending, _Pending()
        if not (pending.started or pending.cleared or pending.suppressed):
            return False
        now = utc_now()
        messages = 0
        with self.sessions() as session, session.begin():
            lock_outbox(session.connection())  # before the drift rows: one lock order with the other writers
            for active in pending.started:
                row = DriftEvent(uuid=active.uuid, source=active.source, line=active.line,
                                 model_version=active.model_version[:255], started_at=active.started_at,
                                 detected_at=active.detected_at, frames=active.frames, share=active.share,
                                 suppressed=active.suppressed)
                session.add(row)
                session.flush()
                active.row_id, active.written_suppressed = row.id, active.suppressed
                self._outbox(session, active, drift_payload(active, "drifting"))
                messages += 1
                self._count(active.source, started=True)
            for active, reason in pending.cleared:
                if active.row_id is None:  # started and ended before a commit: write it whole
                    row = DriftEvent(uuid=active.uuid, source=active.source, line=active.line,
                                     model_version=active.model_version[:255], started_at=active.started_at,
                                     detected_at=active.detected_at, frames=active.frames, share=active.share,
                                     suppressed=active.suppressed, cleared_at=now, cleared_reason=reason)
                    session.add(row)
                else:
                    session.execute(update(DriftEvent).where(DriftEvent.id == active.row_id).values(
                        cleared_at=now, cleared_reason=reason, suppressed=active.suppressed))
                self._outbox(session, active, drift_payload(active, "cleared", cleared_at=now, reason=reason))
                messages += 1
                self._count(active.source, started=False)
            for source in pending.suppressed:
                active = self.active.get(source)
                if active is not None and active.row_id is not None and active.suppressed != active.written_suppressed:
                    session.execute(update(DriftEvent).where(DriftEvent.id == active.row_id)
                                    .values(suppressed=active.suppressed))
                    active.written_suppressed = active.suppressed
        return messages > 0

    def recover(self) -> bool:
        """At start: drifts a previous run left open are cleared (the windows start again); True when messages
        were added to the outbox."""
        now = utc_now()
        with self.sessions() as session, session.begin():
            lock_outbox(session.connection())
            rows = session.scalars(select(DriftEvent).where(DriftEvent.cleared_at.is_(None))).all()
            reason = "the daemon restarted: the source's window starts again"
            for row in rows:
                row.cleared_at, row.cleared_reason = now, reason
                self._outbox(session, row, drift_payload(row, "cleared", cleared_at=now, reason=reason))
        for row in rows:
            self._count(row.source, started=False)
        return bool(rows)

    def _outbox(self, session: Any, event: Any, payload: dict[str, Any]) -> None:
        """A `drift` event: the message's fields (MQTT publishes it retained on `<prefix>/<line>/<source>/drift`)."""
        add_event(session, DRIFT, without_id(payload), event_id=payload["id"])

    def _count(self, source: str, *, started: bool) -> None:
        if self.metrics is None:
            return
        self.metrics.source_drift.labels(source).set(1.0 if started else 0.0)
        if started:
            self.metrics.drift_events.labels(source).inc()


def drift_status(sessions: Any, source: str, limit: int = 20) -> dict[str, Any]:
    """`GET /api/sources/{id}/drift`: whether the source is in drift now, and its drifts, newest first."""
    with sessions() as session:
        rows = session.scalars(select(DriftEvent).where(DriftEvent.source == source)
                               .order_by(DriftEvent.id.desc()).limit(limit)).all()
        items = [_row_dict(row) for row in rows]
    current = next((item for item in items if item["cleared_at"] is None), None)
    return {"source": source, "drifting": current is not None, "current": current, "items": items}


def _row_dict(row: DriftEvent) -> dict[str, Any]:
    return {"id": row.id, "drift_id": row.uuid, "source": row.source, "line": row.line,
            "model_version": row.model_version, "started_at": rfc3339(row.started_at),
            "detected_at": rfc3339(row.detected_at), "frames": row.frames, "share": round(row.share, 4),
            "suppressed": row.suppressed, "cleared_at": rfc3339(row.cleared_at) if row.cleared_at else None,
            "cleared_reason": row.cleared_reason, "references_proposal": proposal_url(row.source, row.started_at)}
