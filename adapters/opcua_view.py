"""What the OPC UA sink shows per source (`LastResult`, `Counters`, `ProcessingTime`, `Drift`), as plain values:
restored from the database at start, then kept up to date from the committed inspections and the outbox.

Where each value comes from, so that a restart shows what was shown before and nothing counts twice:

- `Counters.Inspected` / `OK` / `NG` and `ProcessingTime.*` count the source's inspection rows since its last
  `ResetCounters` (`opcua_counter_resets.inspection_id`; since the first row without one). They are **rebuilt from
  the database** at start (one aggregate query) and counted on from each newly committed inspection whose id is
  above what the rebuild saw (normal frames are not outbox events: the database is their record). Retention
  (`[storage].retention_days`) deletes old rows, so a restart counts only the rows still kept.
- `Counters.DeadlineMissed` counts the fail-safe trigger answers for a missed deadline (`result` outbox events)
  after the reset's outbox row (`opcua_counter_resets.seq`): rebuilt at start from the events up to the sink's
  cursor, counted from each event after it as the follower applies it, so each counts exactly once.
- `LastResult.*` is the newest of the source's last inspection and its last trigger answer (a late answer never
  replaces the answer the PLC was given); `Drift` / `DriftStartedAt` the source's open drift. Both are restored
  from the database (the newest rows, the open `drift_events` row) and then follow the outbox events newer than
  that restore (`result`, `drift`), in `seq` order.
- `Counters.Rejected` / `Errors` are the daemon's own metrics since it started or the last reset
  (daemon/plant/counters.py), not kept across restarts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from adapters.db.outbox import last_outbox_seq
from adapters.db.tables import DriftEvent, Inspection, OpcUaCounterReset, OutboxMessage, utcnow
from adapters.events import DRIFT, RESULT, OutboxEvent
from adapters.timeutil import as_utc, parse_rfc3339

NO_DRIFT = datetime(1970, 1, 1, tzinfo=timezone.utc)  # DriftStartedAt while a source is not in drift
DEADLINE_MISSED = "deadline missed"  # the reason of a fail-safe answer that DeadlineMissed counts
ANSWER_SCAN = 5000  # at start, how many of the newest trigger answers are searched for each source's last one


def result_word(is_anomalous: bool | None) -> str:
    """OK | NG | no_decision (the trigger answers' words): a frame with no decision is never OK."""
    return "no_decision" if is_anomalous is None else "NG" if is_anomalous else "OK"


@dataclass
class SourceView:
    """One source's values and where they were counted from."""

    last: dict[str, Any] = field(default_factory=dict)  # LastResult.* (empty: the server's initial values)
    inspected: int = 0
    ok: int = 0
    ng: int = 0
    deadline_missed: int = 0
    times_ms: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])  # min, sum, max, count
    drift: tuple[bool, datetime] = (False, NO_DRIFT)
    restored_upto: int = 0  # inspections up to this id are in the rebuilt counts
    counted_max: int = 0  # the highest inspection id counted
    reset_seq: int = 0  # deadline misses after this outbox row count

    def add_time(self, ms: float) -> None:
        t = self.times_ms
        t[0] = ms if t[3] == 0 else min(t[0], ms)
        t[1] += ms
        t[2] = max(t[2], ms)
        t[3] += 1

    def values(self) -> dict[str, Any]:
        t = self.times_ms
        return {**self.last, "Counters.Inspected": self.inspected, "Counters.OK": self.ok, "Counters.NG": self.ng,
                "Counters.DeadlineMissed": self.deadline_missed, "ProcessingTime.MinMs": t[0],
                "ProcessingTime.MeanMs": t[1] / t[3] if t[3] else 0.0, "ProcessingTime.MaxMs": t[2],
                "Drift": self.drift[0], "DriftStartedAt": self.drift[1]}


def inspection_values(inspection_id: int, is_anomalous: bool | None, score: float | None, threshold: float | None,
                      regions: int, model_version: str | None, captured_at: datetime | None) -> dict[str, Any]:
    """`LastResult.*` of an inspection that is not a trigger's answer."""
    return {"LastResult.InspectionId": inspection_id, "LastResult.PartId": "",
            "LastResult.Result": result_word(is_anomalous), "LastResult.IsOk": is_anomalous is False,
            "LastResult.Score": score, "LastResult.Threshold": threshold, "LastResult.RegionCount": regions,
            "LastResult.ModelVersion": model_version, "LastResult.Timestamp": as_utc(captured_at),
            "LastResult.TriggerId": "", "LastResult.FailSafe": False, "LastResult.Late": False}


def answer_values(body: dict[str, Any], captured_at: datetime | None) -> dict[str, Any]:
    """`LastResult.*` of a trigger answer (a `result` event's body); `captured_at`: its inspection's capture time
    (None for a fail-safe answer without one: the answer's time)."""
    when = captured_at
    if when is None:
        try:
            when = parse_rfc3339(str(body.get("ts")))
        except ValueError:
            when = utcnow()
    result = str(body.get("result"))
    return {"LastResult.InspectionId": body.get("inspection_id") or 0, "LastResult.PartId": body.get("part_id"),
            "LastResult.Result": result, "LastResult.IsOk": result == "OK", "LastResult.Score": body.get("score"),
            "LastResult.Threshold": body.get("threshold"), "LastResult.RegionCount": body.get("regions") or 0,
            "LastResult.ModelVersion": body.get("model_version"), "LastResult.Timestamp": as_utc(when),
            "LastResult.TriggerId": body.get("trigger_id"), "LastResult.FailSafe": bool(body.get("fail_safe")),
            "LastResult.Late": bool(body.get("late"))}


def _processing_ms(session: Session) -> Any:
    """capture → result in milliseconds, as SQL of the session's database."""
    if session.get_bind().dialect.name == "sqlite":
        return (func.julianday(Inspection.processed_at) - func.julianday(Inspection.captured_at)) * 86_400_000.0
    return func.extract("epoch", Inspection.processed_at - Inspection.captured_at) * 1000.0


class OpcUaView:
    """The values of every configured source. Not thread-safe: the sink calls it under its own lock."""

    def __init__(self, source_ids: Iterable[str]) -> None:
        self.sources: dict[str, SourceView] = {source_id: SourceView() for source_id in source_ids}
        self.snapshot_seq = 0  # LastResult and Drift show the database as of this outbox row (and newer events)

    def values(self, source_id: str) -> dict[str, Any]:
        return self.sources[source_id].values()

    # --- restore ------------------------------------------------------------------------------------------------

    def restore(self, session: Session, cursor: int) -> None:
        """Rebuild every source from the database; `cursor`: the outbox row the sink has applied up to."""
        self.snapshot_seq = last_outbox_seq(session)  # first: what commits later is in the events after it
        resets = {row.source: row for row in session.scalars(select(OpcUaCounterReset))}
        for source_id in self.sources:
            mark = resets.get(source_id)
            view = SourceView(reset_seq=mark.seq if mark else 0)
            self._count_inspections(session, source_id, view, mark.inspection_id if mark else 0)
            self.sources[source_id] = view
        self._count_deadline_misses(session, cursor)
        self._restore_last(session)
        for row in session.scalars(select(DriftEvent).where(DriftEvent.cleared_at.is_(None))):
            if row.source in self.sources:
                self.sources[row.source].drift = (True, as_utc(row.started_at))

    def _count_inspections(self, session: Session, source_id: str, view: SourceView, after_id: int) -> None:
        ms = _processing_ms(session)
        row = session.execute(
            select(func.count(Inspection.id), func.sum(case((Inspection.is_anomalous.is_(True), 1), else_=0)),
                   func.sum(case((Inspection.is_anomalous.is_(False), 1), else_=0)), func.max(Inspection.id),
                   func.min(ms), func.sum(ms), func.max(ms), func.count(ms))
            .where(Inspection.source == source_id, Inspection.id > after_id)).one()
        count, ng, ok, max_id, low, total, high, timed = row
        view.inspected, view.ng, view.ok = int(count or 0), int(ng or 0), int(ok or 0)
        if timed:
            view.times_ms = [max(0.0, float(low)), float(total), max(0.0, float(high)), float(timed)]
        view.restored_upto = view.counted_max = max(int(max_id or 0), after_id)

    def _count_deadline_misses(self, session: Session, cursor: int) -> None:
        """Fail-safe answers for a missed deadline after each source's reset, up to `cursor`."""
        oldest_reset = min((view.reset_seq for view in self.sources.values()), default=0)
        # a fail-safe answer has no inspection: its row's inspection_id is NULL (as is one whose row retention deleted)
        rows = session.execute(select(OutboxMessage.seq, OutboxMessage.body).where(
            OutboxMessage.event_type == RESULT, OutboxMessage.inspection_id.is_(None),
            OutboxMessage.seq > oldest_reset, OutboxMessage.seq <= cursor))
        for seq, body in rows:
            view = self.sources.get((body or {}).get("source"))
            if view is not None and seq > view.reset_seq and _deadline_missed(body):
                view.deadline_missed += 1

    def _restore_last(self, session: Session) -> None:
        answers: dict[str, dict[str, Any]] = {}
        for body in session.scalars(select(OutboxMessage.body).where(OutboxMessage.event_type == RESULT)
                                    .order_by(OutboxMessage.seq.desc()).limit(ANSWER_SCAN)):
            source_id = (body or {}).get("source")
            if source_id in self.sources and source_id not in answers and not body.get("late"):
                answers[source_id] = body
                if len(answers) == len(self.sources):
                    break
        for source_id, view in self.sources.items():
            row = session.scalars(select(Inspection).where(Inspection.source == source_id)
                                  .order_by(Inspection.id.desc()).limit(1)).first()
            answer = answers.get(source_id)
            answered = answer.get("inspection_id") if answer is not None else None
            if answer is not None and (row is None or answered == row.id or (answered or 0) > row.id or (
                    answered is None and _answer_time(answer) >= as_utc(row.processed_at))):
                view.last = answer_values(answer, as_utc(row.captured_at) if row is not None and answered == row.id
                                          else None)
            elif row is not None:
                view.last = inspection_values(row.id, row.is_anomalous, row.score, row.threshold,
                                              len(row.regions or []), row.model_version, row.captured_at)

    # --- updates ------------------------------------------------------------------------------------------------

    def inspection(self, inspection_id: int, source_id: str, is_anomalous: bool | None, score: float | None,
                   threshold: float, regions: int, model_version: str, captured_at: datetime,
                   processed_at: datetime | None) -> bool:
        """A newly committed inspection; True when the source's values changed."""
        view = self.sources.get(source_id)
        if view is None or inspection_id <= view.restored_upto:  # unknown, or already in the rebuilt counts
            return False
        view.inspected += 1
        if is_anomalous:
            view.ng += 1
        elif is_anomalous is False:  # a frame with no decision is neither
            view.ok += 1
        done = as_utc(processed_at) if processed_at is not None else utcnow()
        view.add_time(max(0.0, (done - as_utc(captured_at)).total_seconds() * 1000))
        view.counted_max = max(view.counted_max, inspection_id)
        if inspection_id >= int(view.last.get("LastResult.InspectionId") or 0):
            view.last = inspection_values(inspection_id, is_anomalous, score, threshold, regions, model_version,
                                          captured_at)
        return True

    def event(self, event: OutboxEvent, captured_at_of: Callable[[int], datetime | None]) -> str | None:
        """Apply an outbox event (in `seq` order, after the cursor); the source whose values changed, or None."""
        body = event.body
        view = self.sources.get(body.get("source")) if event.event_type in (RESULT, DRIFT) else None
        if view is None:
            return None  # thresholds, geometry, alerts (counted as inspections), legacy rows: nothing to show
        changed = False
        if event.event_type == RESULT:
            if event.seq > view.reset_seq and _deadline_missed(body):
                view.deadline_missed += 1
                changed = True
            answered = body.get("inspection_id")
            shown = int(view.last.get("LastResult.InspectionId") or 0)
            # every answer the PLC was given shows, in seq order (a late one never replaces it)
            if event.seq > self.snapshot_seq and not body.get("late"):
                captured = None
                if answered is not None:
                    captured = view.last.get("LastResult.Timestamp") if answered == shown else captured_at_of(answered)
                view.last = answer_values(body, captured)
                changed = True
        elif event.seq > self.snapshot_seq:  # a drift started or ended
            if body.get("state") == "cleared":
                view.drift = (False, NO_DRIFT)
            else:
                view.drift = (True, _time(body.get("started_at")) or NO_DRIFT)
            changed = True
        return body.get("source") if changed else None

    def store_reset(self, session: Session, source_id: str, seq: int) -> None:
        """`ResetCounters` of a known source, in the caller's transaction: from now on count the inspections after
        the last one counted and the answers after outbox row `seq` (the cursor); `reset` once it is committed."""
        mark = session.get(OpcUaCounterReset, source_id)
        if mark is None:
            mark = OpcUaCounterReset(source=source_id)
            session.add(mark)
        mark.inspection_id, mark.seq, mark.reset_at = self.sources[source_id].counted_max, seq, utcnow()

    def reset(self, source_id: str, seq: int) -> None:
        """Start a known source's counters again (its last result and drift stay)."""
        view = self.sources[source_id]
        self.sources[source_id] = SourceView(last=view.last, drift=view.drift, restored_upto=view.restored_upto,
                                             counted_max=view.counted_max, reset_seq=seq)


def _deadline_missed(body: dict[str, Any]) -> bool:
    return bool(body.get("fail_safe")) and body.get("reason") == DEADLINE_MISSED


def _time(text: Any) -> datetime | None:
    try:
        return parse_rfc3339(str(text)) if text else None
    except ValueError:
        return None


def _answer_time(body: dict[str, Any]) -> datetime:
    return _time(body.get("ts")) or NO_DRIFT
