"""Every change of a source's frame geometry is an event (issue 20): a retained MQTT message on
`<prefix>/<line>/<source>/geometry` and a webhook call (`X-Anomalyd-Event: geometry`), written to the outbox as
threshold changes are (daemon/references/thresholds.py `outbox_listener`), so it has the outbox's delivery guarantee and
comes in order with the alerts.

The change is announced by what makes it (the API's PUT/DELETE `.../geometry`, the UI through it, `anomalyd
geometry set|reset`, and the daemon's start for an edit of config.toml: `announce_config_changes`), right after the override file and its `history.jsonl` line are written
(daemon/references/geometry_overrides.py); the daemon then rebuilds the source's bank through the new geometry.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

log = logging.getLogger("anomalyd.geometry")

KIND = "geometry"


def geometry_payload(event: dict[str, Any], line: str) -> dict[str, Any]:
    """The message of one change: the history event (`source`, `action` set|reset, `set_by`, `set_at`, `before`,
    `after`), the geometry in effect from now on as `geometry`, `event` "geometry", the source's line and a fresh
    `id` consumers dedupe on, as on every outbox message."""
    return {**event, "geometry": event["after"], "id": str(uuid.uuid4()), "event": KIND, "line": line}


def source_line(settings: Any, source_id: str) -> str:
    """The `line` of a [[sources]] entry ("default" when it names none), as the other topics use it."""
    for cfg in settings.sources:
        if cfg.id == source_id:
            return cfg.line or "default"
    return "default"


def announce(sessions: Any, settings: Any, event: dict[str, Any]) -> dict[str, Any] | None:
    """Put the change in the outbox as a `geometry` event (MQTT publishes it retained); the payload, or None without
    a database or when the write failed (logged: the change itself is made and recorded in `history.jsonl` either
    way)."""
    if sessions is None:
        return None
    from adapters.db.outbox import add_event
    from adapters.events import GEOMETRY, without_id

    line = source_line(settings, event["source"])
    payload = geometry_payload(event, line)
    try:
        with sessions() as session, session.begin():
            add_event(session, GEOMETRY, without_id(payload), event_id=payload["id"])
    except Exception as exc:  # the database is away: the change stands, its message is lost (said in the log)
        log.error("source %s: geometry %s by %s is not announced (outbox write failed: %s)", event["source"],
                  event["action"], event["set_by"], str(exc).splitlines()[0][:200])
        return None
    return payload


def announce_config_changes(sessions: Any, settings: Any, source_ids: list[str]) -> list[dict[str, Any]]:
    """At the daemon's start: record and announce each source whose geometry config.toml changed since it last ran
    (daemon/references/geometry_overrides.py `config_changes`); the events."""
    from daemon.references.geometry_overrides import config_changes

    try:
        events = config_changes(settings, source_ids)
    except OSError as exc:  # the storage folder is not writable: the daemon runs, the change is not on record
        log.error("geometry changes in the configuration are not recorded: %s", exc)
        return []
    for event in events:
        announce(sessions, settings, event)
    return events
