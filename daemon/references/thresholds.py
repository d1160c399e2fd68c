"""Thresholds operators can see and steer: the history of every change, pins, and the labelled-defect guard.

Every change of a source's thresholds is a `threshold_history` row (migration 0005): value, rule, counts of the
known-good and labelled-anomalous frames behind it, who or what set it (`daemon`, `anomalyd calibrate`, `cli`,
`api:<token>`), when, and its action:

- `applied`: the value in effect for that source and model version from now on;
- `proposed`: an automatic recalibration that would miss more labelled defects than the value in effect, so it was
  not applied (the value in effect is applied to the new version instead, with its own `applied` row; the
  operator can still pin the proposal);
- `pinned` / `unpinned`: an operator fixed a value for the source, whatever the model version, until unpinned.
  Pins survive restarts and recalibrations; the newest pin/unpin row of a source says whether it is pinned.

Each row is also logged (`anomalyd.thresholds`) and handed to the listeners (the daemon puts it in the outbox, retained on
MQTT `<prefix>/<line>/<source>/threshold`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

log = logging.getLogger("anomalyd.thresholds")

ACTIONS = ("applied", "proposed", "pinned", "unpinned")
LABELLED_ANOMALIES_FOR_GUARD = 64

Listener = Callable[[dict[str, Any]], None]


class ThresholdTable(dict):
    """(source, model version) → (image, pixel) thresholds as the result writer reads them (`.get`); a pinned
    source answers its pin for every version."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pins: dict[str, tuple[float, float]] = {}

    def get(self, key: Any, default: Any = None) -> Any:
        if isinstance(key, tuple) and key and key[0] in self.pins:
            return self.pins[key[0]]
        return super().get(key, default)


def _row_dict(row: Any) -> dict[str, Any]:
    out = dict(row._mapping)
    if isinstance(out.get("created_at"), datetime):
        out["created_at"] = out["created_at"].isoformat()
    return out


def record(sessions: Any, *, source: str, model_version: str, action: str, threshold: float,
           pixel_threshold: float | None, rule: str, set_by: str, false_reject_rate: float | None = None,
           n_good: int | None = None, n_anomalous: int | None = None, missed_anomalous: int | None = None,
           listeners: Sequence[Listener] = ()) -> dict[str, Any]:
    """Insert one history row, log it and tell the listeners; returns the row as a dict."""
    from sqlalchemy import insert

    from adapters.db.schema import threshold_history
    from adapters.timeutil import utc_now

    if action not in ACTIONS:
        raise ValueError(f"action must be one of {', '.join(ACTIONS)}, not {action!r}")
    values = dict(source=source, model_version=model_version, action=action, threshold=float(threshold),
                  pixel_threshold=None if pixel_threshold is None else float(pixel_threshold), rule=rule,
                  false_reject_rate=false_reject_rate, n_good=n_good, n_anomalous=n_anomalous,
                  missed_anomalous=missed_anomalous, set_by=set_by[:128], created_at=utc_now())
    with sessions() as session, session.begin():
        values["id"] = session.execute(insert(threshold_history).values(**values)).inserted_primary_key[0]
    event = {**values, "created_at": values["created_at"].isoformat()}
    level = logging.WARNING if action == "proposed" else logging.INFO
    pixel = "" if pixel_threshold is None else f", pixel {pixel_threshold:.4f}"
    log.log(level, "source %s (version %s): threshold %s %.4f%s by %s: %s", source, model_version, action,
            threshold, pixel, set_by, rule)
    for listener in listeners:
        try:
            listener(event)
        except Exception:
            log.exception("threshold listener failed")
    return event


def history(sessions: Any, source: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """History rows, newest first."""
    from sqlalchemy import select

    from adapters.db.schema import threshold_history as t

    query = select(t).order_by(t.c.id.desc()).limit(limit)
    if source is not None:
        query = query.where(t.c.source == source)
    with sessions() as session:
        return [_row_dict(row) for row in session.execute(query)]


def changes_after(sessions: Any, after_id: int) -> list[dict[str, Any]]:
    """History rows with an id above `after_id`, oldest first (changes made by another process: CLI, API)."""
    from sqlalchemy import select

    from adapters.db.schema import threshold_history as t

    with sessions() as session:
        return [_row_dict(row) for row in session.execute(select(t).where(t.c.id > after_id).order_by(t.c.id))]


def latest_change_id(sessions: Any) -> int:
    from sqlalchemy import func, select

    from adapters.db.schema import threshold_history as t

    with sessions() as session:
        return int(session.execute(select(func.max(t.c.id))).scalar() or 0)


def load_pins(sessions: Any) -> dict[str, tuple[float, float]]:
    """source → (image, pixel) pinned thresholds: the sources whose newest pin/unpin row is a pin."""
    from sqlalchemy import func, select

    from adapters.db.schema import threshold_history as t

    newest = (select(t.c.source, func.max(t.c.id).label("id")).where(t.c.action.in_(("pinned", "unpinned")))
              .group_by(t.c.source).subquery())
    query = select(t.c.source, t.c.action, t.c.threshold, t.c.pixel_threshold).join(newest, newest.c.id == t.c.id)
    with sessions() as session:
        return {source: (threshold, pixel if pixel is not None else threshold)
                for source, action, threshold, pixel in session.execute(query) if action == "pinned"}


def labelled_frames(sessions: Any, store: Any, source_id: str, label: str, limit: int) -> list[Path]:
    """Stored frames of `source_id` whose newest label is `label` ("normal" | "anomalous"), newest first (at most
    `limit`): labelled normals become references and calibration frames, labelled anomalies hold thresholds."""
    if sessions is None or store is None or limit <= 0:
        return []
    from sqlalchemy import select

    from adapters.db import Inspection
    from adapters.db.repository import latest_label_subquery

    newest = latest_label_subquery()
    query = (select(Inspection.frame_path).where(Inspection.source == source_id, Inspection.frame_path.is_not(None),
                                                 newest == label)
             .order_by(Inspection.id.desc()).limit(limit))
    with sessions() as session:
        relatives = session.scalars(query).all()
    files = []
    for relative in relatives:
        try:
            path = store.path(relative)
        except ValueError:
            continue
        if path.is_file():
            files.append(path)
    return files


def missed(scores: Sequence[float], threshold: float) -> int:
    """Labelled defects a threshold would not alert (alert = score >= threshold)."""
    return sum(1 for score in scores if score < threshold)


def outbox_listener(sessions: Any, line_of: Callable[[str], str], wake: Callable[[], None]) -> Listener:
    """Each change as a `threshold` event in the outbox, so MQTT (retained, on `<prefix>/<line>/<source>/threshold`)
    and every webhook (event `threshold`) get it with the outbox's delivery guarantee and in order with the alerts;
    each sink formats its own message (adapters.mqtt.mqtt_message, adapters.webhooks.webhook_request)."""
    from adapters.db.outbox import add_event
    from adapters.events import THRESHOLD, threshold_body

    def publish(event: dict[str, Any]) -> None:
        with sessions() as session, session.begin():
            add_event(session, THRESHOLD, threshold_body(event, line_of(event["source"])))
        wake()

    return publish


@dataclass(frozen=True)
class Calibration:
    """A computed threshold pair for one source and model version, and where it came from."""

    source: str
    model_version: str
    threshold: float
    pixel_threshold: float
    rule: str
    set_by: str
    false_reject_rate: float | None = None
    n_good: int | None = None
    method: str = ""  # a short name of the known-good frames (the `source_thresholds.method` column, 64 chars)


def in_effect(sessions: Any, source: str) -> tuple[float, float] | None:
    """The newest applied (image, pixel) thresholds of a source, any model version; None when never set."""
    from sqlalchemy import select

    from adapters.db.schema import threshold_history as t

    query = (select(t.c.threshold, t.c.pixel_threshold).where(t.c.source == source, t.c.action == "applied")
             .order_by(t.c.id.desc()).limit(1))
    with sessions() as session:
        row = session.execute(query).first()
    if row is None:
        return None
    return float(row[0]), float(row[1] if row[1] is not None else row[0])


def apply_calibration(sessions: Any, calibration: Calibration, *, anomaly_scores: Sequence[float] = (),
                      configured: tuple[float, float] | None = None, listeners: Sequence[Listener] = ()
                      ) -> tuple[float, float]:
    """Store `calibration` for its version and record it, unless it would miss more of the labelled defects
    (`anomaly_scores`, scored by the new detector) than the value in effect (the newest applied one, else
    `configured`): then it is only proposed, and the value in effect is stored for the new version instead.
    Returns the (image, pixel) thresholds now in effect for that version."""
    from daemon.references.calibration import store_thresholds

    c = calibration
    previous = in_effect(sessions, c.source) or configured
    n_anomalous = len(anomaly_scores)
    new_missed = missed(anomaly_scores, c.threshold)
    common = dict(source=c.source, model_version=c.model_version, false_reject_rate=c.false_reject_rate,
                  n_good=c.n_good, n_anomalous=n_anomalous, listeners=listeners)
    if n_anomalous and previous is not None and new_missed > missed(anomaly_scores, previous[0]):
        old_missed = missed(anomaly_scores, previous[0])
        record(sessions, action="proposed", threshold=c.threshold, pixel_threshold=c.pixel_threshold,
               rule=f"{c.rule}; not applied: it misses {new_missed} of {n_anomalous} labelled defects, the value "
               f"in effect {old_missed}", set_by=c.set_by, missed_anomalous=new_missed, **common)
        threshold, pixel = previous
        rule = f"kept the value in effect: the calibrated {c.threshold:.4f} would miss more labelled defects"
        missed_now = old_missed
    else:
        threshold, pixel, rule, missed_now = c.threshold, c.pixel_threshold, c.rule, new_missed
    store_thresholds(sessions, source=c.source, model_version=c.model_version, threshold=threshold,
                     pixel_threshold=pixel, false_reject_rate=c.false_reject_rate or 0.0, n_frames=c.n_good or 0,
                     method=(c.method or c.set_by) if threshold == c.threshold else f"kept ({c.set_by})")
    record(sessions, action="applied", threshold=threshold, pixel_threshold=pixel, rule=rule, set_by=c.set_by,
           missed_anomalous=missed_now if n_anomalous else None, **common)
    return threshold, pixel


def pin(sessions: Any, source: str, model_version: str, threshold: float, pixel_threshold: float | None,
        set_by: str, listeners: Sequence[Listener] = ()) -> dict[str, Any]:
    """Fix a source's thresholds for every model version until `unpin`."""
    for name, value in (("threshold", threshold), ("pixel threshold", pixel_threshold)):
        if value is not None and not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be between 0 and 1 (the daemon's score scale), not {value}")
    return record(sessions, source=source, model_version=model_version, action="pinned", threshold=threshold,
                  pixel_threshold=pixel_threshold if pixel_threshold is not None else threshold,
                  rule="pinned by an operator", set_by=set_by, listeners=listeners)


def unpin(sessions: Any, source: str, model_version: str, set_by: str,
          listeners: Sequence[Listener] = ()) -> dict[str, Any]:
    """Back to the calibrated (or configured) thresholds; LookupError when the source is not pinned."""
    pinned = load_pins(sessions).get(source)
    if pinned is None:
        raise LookupError(f"source {source} has no pinned threshold")
    return record(sessions, source=source, model_version=model_version, action="unpinned", threshold=pinned[0],
                  pixel_threshold=pinned[1], rule="unpinned by an operator", set_by=set_by, listeners=listeners)


def recorded_version(settings: Any, sessions: Any, source_id: str) -> str:
    """The model version the source's frames were last scored with (else the active/ configured model's name)."""
    from sqlalchemy import select

    from adapters.db import Inspection
    from adapters.db.schema import threshold_history as t

    with sessions() as session:
        version = session.scalars(select(Inspection.model_version).where(Inspection.source == source_id)
                                  .order_by(Inspection.id.desc()).limit(1)).first()
        version = version or session.scalars(select(t.c.model_version).where(t.c.source == source_id)
                                             .order_by(t.c.id.desc()).limit(1)).first()
    return version or str(settings.model.name)


def summary(settings: Any, sessions: Any, source: Any, version: str | None = None) -> dict[str, Any]:
    """The thresholds a source runs with and their origin: pinned, calibrated for its version, or configured."""
    from daemon.references import calibration

    version = version or recorded_version(settings, sessions, source.id)
    pins = load_pins(sessions)
    last = history(sessions, source.id, limit=1)
    out: dict[str, Any] = {"source": source.id, "model_version": version, "last_change": last[0] if last else None}
    if source.id in pins:
        image, pixel = pins[source.id]
        return {**out, "threshold": image, "pixel_threshold": pixel, "origin": "pinned"}
    row = calibration.stored_threshold(sessions, source.id, version)
    if row is not None:
        return {**out, "threshold": row.threshold, "pixel_threshold": row.pixel_threshold, "origin": "calibrated",
                "rule": row.method, "n_good": row.n_frames}
    return {**out, "threshold": float(source.threshold), "pixel_threshold": float(source.map_threshold),
            "origin": "configured"}
