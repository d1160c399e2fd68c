"""Frame geometry set at runtime (the API and the UI): a source's `resize`, `roi`, `ignore_polygons`,
`tile_overlap` and `tile_size` over what config.toml says, kept until reset.

Where it is kept: `<[storage].dir>/geometry/<source id>.json`, next to the managed references and the banks (the
API and the daemon share that folder already: the API writes references there, the daemon builds banks from it).
Each file holds only the keys an operator set, with who set them and when; a key not in it comes from the
configuration. Every change (set, reset, and an edit of config.toml seen at the next start: `config_changes`) is
appended to `<[storage].dir>/geometry/history.jsonl` with the values
before and after, who and when, and logged. A file is written atomically (temporary file and rename).

The daemon's reference manager counts the file in the source's reference signature (daemon/references/files.py,
`source_signature`): a new or removed file rebuilds the source's bank through the new geometry and recalibrates,
as a change of reference files does; the geometry is part of the model version, so thresholds are kept per
geometry.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from daemon.config.geometry import GEOMETRY_KEYS, configured_values, unsupported
from model.geometry import Geometry, GeometryError, make_geometry

log = logging.getLogger("anomalyd.geometry")

FORMAT = "anomalyd-geometry/1"
MIN_POLYGON_AREA = 4.0  # px²: a polygon smaller than this (three points on a line, a double click) masks nothing


def overrides_dir(settings: Any) -> Path:
    return settings.resolve(settings.storage.dir) / "geometry"


def override_path(settings: Any, source_id: str) -> Path:
    """The source's override file (source ids are names of [A-Za-z0-9_.-], so the path stays in the folder)."""
    return overrides_dir(settings) / f"{source_id}.json"


def load_override(settings: Any, source_id: str) -> dict[str, Any] | None:
    """The stored override of a source ({"values": {...}, "set_by": .., "set_at": ..}), None when there is none;
    GeometryError naming the file when it cannot be read."""
    path = override_path(settings, source_id)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise GeometryError(f"geometry override {path}: cannot read it ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("values"), dict):
        raise GeometryError(f"geometry override {path}: not a {FORMAT} file")
    unknown = set(data["values"]) - set(GEOMETRY_KEYS)
    if unknown:
        raise GeometryError(f"geometry override {path}: unknown keys {sorted(unknown)}")
    return data


def effective_values(settings: Any, source_id: str) -> dict[str, tuple[Any, str]]:
    """Each geometry key of a source with its origin: "override" (set at runtime), else the configuration's."""
    values = configured_values(settings, source_id)
    override = load_override(settings, source_id)
    if override is not None:
        for key, value in override["values"].items():
            values[key] = (value, "override")
    return values


def _geometry(values: dict[str, Any]) -> Geometry:
    return make_geometry(values["resize"], values["roi"], values["ignore_polygons"], values["tile_overlap"],
                         values.get("tile_size"))


def as_values(geometry: Geometry) -> dict[str, Any]:
    """A geometry under the configuration's keys (what the API shows and takes)."""
    return {"resize": geometry.resize, "roi": list(geometry.roi) if geometry.roi else None,
            "ignore_polygons": [[list(p) for p in polygon] for polygon in geometry.ignore],
            "tile_overlap": geometry.tile_overlap, "tile_size": geometry.tile_size}


def effective_geometry(settings: Any, source_id: str) -> Geometry:
    """The geometry a source runs with: its override over its configuration (what the bank is built with)."""
    values = {key: value for key, (value, _) in effective_values(settings, source_id).items()}
    geometry = _geometry(values)
    why = unsupported(settings, geometry)
    if why is not None:
        raise GeometryError(f"source {source_id}: geometry override {override_path(settings, source_id)}: {why}")
    return geometry


def polygon_area(points: list[list[float]]) -> float:
    """The shoelace area of a polygon, in px²."""
    total = 0.0
    for index, (x0, y0) in enumerate(points):
        x1, y1 = points[(index + 1) % len(points)]
        total += x0 * y1 - x1 * y0
    return abs(total) / 2.0


def check_override(settings: Any, source_id: str, changes: dict[str, Any],
                   frame_hw: tuple[int, int] | None) -> Geometry:
    """The geometry the source would run with after `changes` (keys of GEOMETRY_KEYS; roi None = the whole
    frame, ignore_polygons None = none); GeometryError with the reason when it cannot be applied: a degenerate ROI
    or polygon, one outside the frame of (height, width) `frame_hw` when known, or a model that runs whole frames
    squashed only."""
    values = {key: value for key, (value, _) in effective_values(settings, source_id).items()}
    values.update(changes)
    if values.get("ignore_polygons") is None:
        values["ignore_polygons"] = []
    roi = values.get("roi")
    if roi is not None:
        x, y, w, h = roi
        if w < 8 or h < 8 or x < 0 or y < 0:
            raise GeometryError(f"roi {list(roi)}: degenerate: expected [x, y, width, height] with x, y >= 0 and a "
                                "width and height of at least 8 pixels")
        if frame_hw is not None and (x + w > frame_hw[1] or y + h > frame_hw[0]):
            raise GeometryError(f"roi {list(roi)} reaches outside the {frame_hw[1]}x{frame_hw[0]} frame "
                                f"(x + width must be <= {frame_hw[1]}, y + height <= {frame_hw[0]})")
    for number, polygon in enumerate(values["ignore_polygons"], start=1):
        if len(polygon) < 3:
            raise GeometryError(f"ignore polygon {number}: {len(polygon)} point(s); a polygon needs at least 3")
        if polygon_area(polygon) < MIN_POLYGON_AREA:
            raise GeometryError(f"ignore polygon {number} {polygon}: degenerate (area below "
                                f"{MIN_POLYGON_AREA:g} px²: its points are on a line or on top of each other)")
        if frame_hw is not None:
            outside = [p for p in polygon if not (0 <= p[0] <= frame_hw[1] and 0 <= p[1] <= frame_hw[0])]
            if outside:
                raise GeometryError(f"ignore polygon {number}: point {list(outside[0])} is outside the "
                                    f"{frame_hw[1]}x{frame_hw[0]} frame")
    geometry = _geometry(values)
    why = unsupported(settings, geometry)
    if why is not None:
        raise GeometryError(why)
    return geometry


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def _seen_path(settings: Any) -> Path:
    """The geometry each source ran with when last started or changed (to tell an edit of config.toml)."""
    return overrides_dir(settings) / "in_effect.json"


def _load_seen(settings: Any) -> dict[str, Any]:
    try:
        data = json.loads(_seen_path(settings).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _remember(settings: Any, source_id: str, values: dict[str, Any]) -> None:
    seen = _load_seen(settings)
    seen[source_id] = values
    _write_json(_seen_path(settings), seen)


def config_changes(settings: Any, source_ids: list[str], set_by: str = "config.toml") -> list[dict[str, Any]]:
    """The geometry changes made by editing the configuration since the last start: for each source whose geometry
    in effect differs from the one it last ran with, a history event (action "config"), recorded as the API's are.
    A source seen for the first time is remembered, not announced; one whose geometry cannot be built is skipped
    (its bank build reports why)."""
    seen = _load_seen(settings)
    events = []
    for source_id in source_ids:
        try:
            after = as_values(effective_geometry(settings, source_id))
        except GeometryError:
            continue
        before = seen.get(source_id)
        if isinstance(before, dict):  # remembered before tile_size existed: it ran native, as tile_size null does
            before = {"tile_size": None, **before}
        if before is not None and before != after:
            event = {"source": source_id, "action": "config", "set_by": set_by, "set_at": _now(), "before": before,
                     "after": after}
            _record(settings, event)  # remembers it too
            events.append(event)
        elif before is None:
            _remember(settings, source_id, after)
    return events


def _record(settings: Any, event: dict[str, Any]) -> None:
    path = overrides_dir(settings) / "history.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as history_file:
        history_file.write(json.dumps(event) + "\n")
    if isinstance(event.get("after"), dict) and "error" not in event["after"]:
        _remember(settings, event["source"], event["after"])
    log.warning("source %s: geometry %s by %s: %s (was %s); its bank is rebuilt and recalibrated", event["source"],
                event["action"], event["set_by"], event["after"], event["before"])


def save_override(settings: Any, source_id: str, changes: dict[str, Any], set_by: str) -> dict[str, Any]:
    """Store `changes` (checked by `check_override`) as the source's override, on top of the keys it already
    overrides; the change's history event."""
    before = as_values(_geometry({k: v for k, (v, _) in effective_values(settings, source_id).items()}))
    current = load_override(settings, source_id)
    values = dict(current["values"]) if current is not None else {}
    values.update(changes)
    if "ignore_polygons" in values and values["ignore_polygons"] is None:
        values["ignore_polygons"] = []
    event = {"source": source_id, "action": "set", "set_by": set_by, "set_at": _now(), "before": before}
    _write_json(override_path(settings, source_id),
                {"format": FORMAT, "source": source_id, "values": values, "set_by": set_by, "set_at": event["set_at"]})
    event["after"] = as_values(effective_geometry(settings, source_id))
    _record(settings, event)
    return event


def clear_override(settings: Any, source_id: str, set_by: str) -> dict[str, Any]:
    """Remove a source's override (back to the configuration); LookupError when it has none."""
    path = override_path(settings, source_id)
    if not path.exists():
        raise LookupError(f"source {source_id} has no geometry override: it runs the configured geometry")
    try:
        before: dict[str, Any] = as_values(effective_geometry(settings, source_id))
    except GeometryError as exc:  # an unreadable file, or one the model cannot run: removing it is the way out
        before = {"error": str(exc)}
    path.unlink()
    event = {"source": source_id, "action": "reset", "set_by": set_by, "set_at": _now(), "before": before,
             "after": as_values(effective_geometry(settings, source_id))}
    _record(settings, event)
    return event


def history(settings: Any, source_id: str, limit: int = 50) -> list[dict[str, Any]]:
    """The source's geometry changes, newest first."""
    path = overrides_dir(settings) / "history.jsonl"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    events = []
    for line in reversed(lines):
        try:
            event = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash mid-write: the others still count
        if isinstance(event, dict) and event.get("source") == source_id:
            events.append(event)
            if len(events) >= limit:
                break
    return events


def summary(settings: Any, source_id: str) -> dict[str, Any]:
    """What GET /api/sources/{id}/geometry answers: the values in effect, each with its origin, the override
    (who set it, when) and the last change."""
    values = effective_values(settings, source_id)
    override = load_override(settings, source_id)
    effective = _geometry({k: v for k, (v, _) in values.items()})
    changes = history(settings, source_id, limit=1)
    return {"source": source_id, "geometry": as_values(effective),
            "origins": {key: origin for key, (_, origin) in values.items()},
            "override": override, "override_file": str(override_path(settings, source_id)),
            "supported": unsupported(settings, Geometry(resize="fit")) is None,
            "last_change": changes[0] if changes else None}
