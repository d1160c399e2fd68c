"""Queries and writes over the inspection history, shared by the HTTP API and the operator CLI (no FastAPI here).

They are SQLAlchemy Core over `adapters.db.schema` and return `Row`s (attribute access, like the ORM objects):
the API passes its ORM `Session`s, the operator commands a Core `Connection`, and then import no `sqlalchemy.orm`.

Pagination is keyset ("seek") pagination: the opaque cursor encodes the sort key and the id of the last row
returned, and the next page is the rows strictly after that (key, id) pair in the chosen order. Rows inserted
while a client pages (new frames arrive at the head) therefore never shift or repeat a page.

Label masks uploaded by operators (PNG, BMP or TIFF, the frame's size) are validated and stored as PNG under the artifact store with a
server-chosen name (`labels/YYYY/MM/DD/<uuid>_label.png`); the client's file name never reaches the filesystem.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from sqlalchemy import BigInteger, Integer, Row, and_, case, cast, func, insert, or_, select

from adapters.db.queries import InspectionFilter, inspection_filter_clauses
from adapters.db.schema import inspections, labels, model_versions, rejected_frames

if TYPE_CHECKING:
    from sqlalchemy import Connection
    from sqlalchemy.orm import Session

    from adapters.storage import ArtifactStore

# HistoryError and parse_when are used from here by the API and the CLI (defined apart: no SQLAlchemy there)
from adapters.history_args import HistoryError, parse_when  # noqa: F401
from adapters.timeutil import rfc3339

SORTS = ("time_desc", "time_asc", "score_desc", "score_asc")
LABELS = ("normal", "anomalous")
# The artifact names the API serves, and the row attribute holding each one's stored path.
ARTIFACTS = {"mask.png": "mask_path", "heatmap.jpg": "heatmap_path", "frame.jpg": "frame_path"}
LABEL_MASK_ARTIFACT = "label_mask.png"
MAX_MASK_BYTES = 20 * 1024 * 1024
MAX_ID = 2**31 - 1  # the id columns are 32-bit integers on PostgreSQL
MAX_MASK_PIXELS = 100_000_000  # with no frame size to compare with, still no absurd allocation
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Score sort puts rows without a score (model errors) last in descending order: they sort as -1.
_NO_SCORE = -1.0


class NotFound(LookupError):
    """No such inspection (404)."""


def _dialect_name(session: Connection | Session) -> str:
    bind = session.get_bind() if hasattr(session, "get_bind") else session  # an ORM session, or a Core connection
    return bind.dialect.name


# --- cursor ------------------------------------------------------------------------------------------------------


def encode_cursor(sort: str, row: Row) -> str:
    key: Any = row.captured_at.isoformat() if sort.startswith("time") else (
        _NO_SCORE if row.score is None else float(row.score))
    raw = json.dumps({"s": sort, "k": key, "i": row.id}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, sort: str) -> tuple[Any, int]:
    """(sort key, id) of the last row of the previous page; HistoryError when malformed or from another sort."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
        if not isinstance(data, dict) or data.get("s") != sort:
            raise ValueError("cursor was issued for another sort order" if isinstance(data, dict) else "not an object")
        last_id = data.get("i")
        if not isinstance(last_id, int) or isinstance(last_id, bool) or not -MAX_ID <= last_id <= MAX_ID:
            raise ValueError("its id is not an inspection id")
        key = data["k"]
        if sort.startswith("time"):
            if not isinstance(key, str):
                raise ValueError("its time is not a string")
            parsed = datetime.fromisoformat(key)
            key = (parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)).astimezone(timezone.utc)
        else:
            if not isinstance(key, (int, float)) or isinstance(key, bool) or not math.isfinite(float(key)):
                raise ValueError("its score is not a number")
            key = float(key)
    except (ValueError, TypeError, KeyError, UnicodeError, OverflowError, binascii.Error) as exc:
        raise HistoryError(f"invalid cursor {cursor[:40]!r}: {exc}") from None
    return key, data["i"]


# --- listing -----------------------------------------------------------------------------------------------------


def filter_clauses(filters: InspectionFilter) -> list[Any]:
    """WHERE clauses for `filters` (the repository's definition; bad values become HistoryError)."""
    try:
        return inspection_filter_clauses(filters)
    except ValueError as exc:
        raise HistoryError(str(exc)) from None


@dataclass
class Page:
    rows: list[Row]  # of `inspections`
    labels: dict[int, Row]  # latest label per inspection id on this page
    next_cursor: str | None


def list_page(
    session: Connection | Session, filters: InspectionFilter, *, sort: str = "time_desc", limit: int = 50,
    cursor: str | None = None,
) -> Page:
    """One page of inspections in `sort` order, starting after `cursor`."""
    if sort not in SORTS:
        raise HistoryError(f"sort must be one of {', '.join(SORTS)}, not {sort!r}")
    if not 1 <= limit <= 1000:
        raise HistoryError(f"limit must be between 1 and 1000, not {limit}")
    key_column = inspections.c.captured_at if sort.startswith("time") else func.coalesce(inspections.c.score, _NO_SCORE)
    descending = sort.endswith("desc")
    query = select(inspections).where(*filter_clauses(filters))
    if cursor:
        key, last_id = decode_cursor(cursor, sort)
        if descending:
            query = query.where(or_(key_column < key, and_(key_column == key, inspections.c.id < last_id)))
        else:
            query = query.where(or_(key_column > key, and_(key_column == key, inspections.c.id > last_id)))
    order = (key_column.desc(), inspections.c.id.desc()) if descending else (key_column.asc(), inspections.c.id.asc())
    rows = list(session.execute(query.order_by(*order).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    return Page(rows=rows, labels=latest_labels(session, [row.id for row in rows]),
                next_cursor=encode_cursor(sort, rows[-1]) if more and rows else None)


def latest_labels(session: Connection | Session, inspection_ids: Sequence[int]) -> dict[int, Row]:
    if not inspection_ids:
        return {}
    found: dict[int, Row] = {}
    rows = session.execute(select(labels).where(labels.c.inspection_id.in_(list(inspection_ids)))
                           .order_by(labels.c.created_at, labels.c.id))
    for label in rows:
        found[label.inspection_id] = label  # later rows overwrite: the newest wins
    return found


def get_inspection(session: Connection | Session, inspection_id: int) -> Row:
    if not -MAX_ID <= inspection_id <= MAX_ID:  # beyond the id column's range: no such row (not a driver error)
        raise NotFound(f"no inspection {inspection_id}")
    row = session.execute(select(inspections).where(inspections.c.id == inspection_id)).first()
    if row is None:
        raise NotFound(f"no inspection {inspection_id}")
    return row


# --- serialisation -----------------------------------------------------------------------------------------------


def _iso(when: datetime | None) -> str | None:
    return rfc3339(when, "auto") if when is not None else None


def label_dict(label: Any | None) -> dict[str, Any] | None:
    if label is None:
        return None
    return {"id": label.id, "label": label.label, "author": label.author, "created_at": _iso(label.created_at),
            "mask_url": f"/api/inspections/{label.inspection_id}/{LABEL_MASK_ARTIFACT}" if label.mask_path else None}


def inspection_dict(row: Any, label: Any | None = None) -> dict[str, Any]:
    """The API/CLI JSON form of an inspection (artifact URLs, never filesystem paths)."""
    base = f"/api/inspections/{row.id}"
    return {
        "id": row.id, "uuid": row.uuid, "frame_id": row.frame_id, "source": row.source, "line": row.line,
        "frame_name": row.frame_name, "captured_at": _iso(row.captured_at), "processed_at": _iso(row.processed_at),
        "model_version": row.model_version, "score": row.score, "threshold": row.threshold,
        "is_anomalous": None if row.is_anomalous is None else bool(row.is_anomalous),
        "verdict": "no_decision" if row.is_anomalous is None else "anomalous" if row.is_anomalous else "normal",
        "regions": row.regions or [], "width": row.width,
        "height": row.height, "error": row.error, "label": label_dict(label),
        "mask_url": f"{base}/mask.png" if row.mask_path else None,
        "heatmap_url": f"{base}/heatmap.jpg" if row.heatmap_path else None,
        "frame_url": f"{base}/frame.jpg" if row.frame_path else None,
    }


def inspection_detail(session: Connection | Session, row: Any) -> dict[str, Any]:
    found = session.execute(
        select(labels).where(labels.c.inspection_id == row.id).order_by(labels.c.created_at, labels.c.id)).all()
    item = inspection_dict(row, found[-1] if found else None)
    item["labels"] = [label_dict(label) for label in found]
    item["meta"] = row.meta
    return item


def model_dict(row: Any) -> dict[str, Any]:
    return {"version": row.version, "kind": row.kind, "status": row.status, "metrics": row.metrics,
            "prompts_path": row.prompts_path, "created_at": _iso(row.created_at),
            "activated_at": _iso(row.activated_at), "notes": row.notes}


def list_versions(session: Connection | Session) -> list[Row]:
    """Every model version, newest first."""
    return list(session.execute(select(model_versions)
                                .order_by(model_versions.c.created_at.desc(), model_versions.c.id.desc())))


# --- labelling ---------------------------------------------------------------------------------------------------


# Mask formats accepted for labels (what datasets ship: MVTec PNG, KolektorSDD BMP, TIFF); stored as PNG.
_MASK_SIGNATURES = ((_PNG_SIGNATURE, "PNG"), (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))


def read_label_mask(data: bytes, name: str = "mask",
                    expected: tuple[int | None, int | None] | None = None) -> bytes:
    """A PNG, BMP or TIFF mask → PNG bytes (a PNG is kept byte for byte, the others re-encoded); HistoryError
    naming `name` for anything else, or when its size differs from `expected` (the frame's width, height).
    The size is read from the file's header and checked BEFORE decoding: a tiny file declaring 30000x30000
    pixels is refused without allocating them."""
    import io
    import struct

    import cv2
    import numpy as np
    from PIL import Image

    if not data:
        raise HistoryError(f"{name}: empty file")
    if len(data) > MAX_MASK_BYTES:
        raise HistoryError(f"{name}: {len(data)} bytes, more than the {MAX_MASK_BYTES} allowed")
    kind = next((kind for signature, kind in _MASK_SIGNATURES if data.startswith(signature)), None)
    if kind is None:
        raise HistoryError(f"{name}: not a PNG, BMP or TIFF image")
    if kind == "PNG":
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise HistoryError(f"{name}: not a decodable PNG image (no IHDR header)")
        width, height = struct.unpack(">II", data[16:24])
    else:
        try:
            with Image.open(io.BytesIO(data)) as header:  # lazy: reads the header only
                width, height = header.size
        except Image.DecompressionBombError:
            raise HistoryError(f"{name}: the mask declares more than {MAX_MASK_PIXELS} pixels") from None
        except Exception as exc:
            raise HistoryError(f"{name}: not a decodable {kind} image ({exc})") from None
    if expected is not None and None not in expected and (width, height) != tuple(expected):
        raise HistoryError(f"{name}: the mask is {width}x{height} pixels, the frame {expected[0]}x{expected[1]}; "
                           f"a mask must have the frame's size")
    if width * height > MAX_MASK_PIXELS:
        raise HistoryError(f"{name}: the mask is {width}x{height} pixels, more than {MAX_MASK_PIXELS}")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None or image.size == 0:
        raise HistoryError(f"{name}: not a decodable {kind} image (truncated or corrupt); expected PNG, BMP or TIFF")
    if kind != "PNG":
        ok, encoded = cv2.imencode(".png", image)
        if not ok:
            raise HistoryError(f"{name}: this {kind} image cannot be stored as a PNG mask")
        data = encoded.tobytes()
    return data


def store_label_mask(store: ArtifactStore, data: bytes, when: datetime | None = None) -> str:
    """Write an already validated mask PNG under a server-chosen name; returns its store-relative path."""
    from model.atomic import atomic_write_bytes  # on use: `model` loads torch, the history commands must not
    when = when or datetime.now(timezone.utc)
    relative = f"labels/{when.astimezone(timezone.utc):%Y/%m/%d}/{uuid.uuid4().hex}_label.png"
    atomic_write_bytes(store.path(relative), data)
    return relative


def apply_label(
    sessions: Any, store: Any, inspection_id: int, label: str, *, author: str | None = None,
    mask: bytes | None = None, mask_name: str = "mask",
) -> Row:
    """Record operator feedback (optionally with a mask PNG) for an inspection; returns the stored label row.

    The mask file is written before the row commits (a row never points at a missing file); if the commit
    fails the file is removed (the retention sweep removes any left by a crash).
    """
    if label not in LABELS:
        raise HistoryError(f"label must be 'normal' or 'anomalous', not {label!r}")
    if mask is not None and store is None:
        raise HistoryError("no artifact store configured to keep the mask")
    mask_path = None
    with sessions() as session:
        try:
            with session.begin():
                inspection = get_inspection(session, inspection_id)
                if mask is not None:
                    mask = read_label_mask(mask, mask_name, expected=(inspection.width, inspection.height))
                    mask_path = store_label_mask(store, mask)
                new_id = session.execute(insert(labels).values(
                    inspection_id=inspection_id, label=label, author=author, mask_path=mask_path)).inserted_primary_key[0]
                row = session.execute(select(labels).where(labels.c.id == new_id)).one()
        except BaseException:
            if mask_path is not None:
                store.path(mask_path).unlink(missing_ok=True)
            raise
    return row


# --- statistics --------------------------------------------------------------------------------------------------


def stats(session: Connection | Session, *, after: datetime | None = None, before: datetime | None = None) -> dict[str, Any]:
    """Counts over [after, before) (default: the last 24 hours): per source, labels, rejected frames."""
    before = before or datetime.now(timezone.utc)
    after = after or before - timedelta(hours=24)
    window = (inspections.c.captured_at >= after, inspections.c.captured_at < before)
    per_source = session.execute(
        select(inspections.c.source, inspections.c.line, func.count(inspections.c.id),
               func.sum(cast(inspections.c.is_anomalous, Integer)), func.max(inspections.c.captured_at),
               func.avg(inspections.c.score))
        .where(*window).group_by(inspections.c.source, inspections.c.line).order_by(inspections.c.source, inspections.c.line)
    ).all()
    rejected = dict(session.execute(
        select(rejected_frames.c.source, func.count(rejected_frames.c.id))
        .where(rejected_frames.c.created_at >= after, rejected_frames.c.created_at < before).group_by(rejected_frames.c.source)
    ).all())
    label_counts = dict(session.execute(
        select(labels.c.label, func.count(labels.c.id))
        .where(labels.c.created_at >= after, labels.c.created_at < before).group_by(labels.c.label)
    ).all())
    sources = []
    for source, line, count, anomalous, last, mean_score in per_source:
        anomalous = int(anomalous or 0)
        sources.append({"source": source, "line": line, "inspections": int(count), "anomalous": anomalous,
                        "anomalous_rate": anomalous / count if count else 0.0,
                        "mean_score": float(mean_score) if mean_score is not None else None,
                        "last_captured_at": _iso(last), "rejected": int(rejected.get(source, 0))})
    for source, count in rejected.items():
        if not any(item["source"] == source for item in sources):
            sources.append({"source": source, "line": None, "inspections": 0, "anomalous": 0,
                            "anomalous_rate": 0.0, "mean_score": None, "last_captured_at": None,
                            "rejected": int(count)})
    total = sum(item["inspections"] for item in sources)
    total_anomalous = sum(item["anomalous"] for item in sources)
    return {
        "after": _iso(after), "before": _iso(before), "sources": sources,
        "total": {"inspections": total, "anomalous": total_anomalous,
                  "anomalous_rate": total_anomalous / total if total else 0.0,
                  "rejected": int(sum(rejected.values()))},
        "labels": {name: int(label_counts.get(name, 0)) for name in LABELS},
    }


# --- time series (the UI's dashboard) -----------------------------------------------------------------------------

SERIES_BY = ("source", "line")
MIN_BUCKET_S, MAX_BUCKET_S = 60, 7 * 86400
MAX_SERIES_BUCKETS = 2000  # per group: a week in 5-minute buckets
MAX_SERIES_ROWS = 50_000  # (group, bucket) rows in one answer; more is cut (`truncated`)
DEFAULT_LINE = "default"  # a source configured without `line` records this one


def _epoch_bucket(column: Any, dialect: str, bucket_s: int) -> Any:
    """The index of the `bucket_s`-long UTC bucket (counted from the Unix epoch) `column` falls in, in SQL."""
    if dialect == "sqlite":  # stored as "YYYY-MM-DD HH:MM:SS.ffffff" (UTC)
        epoch = cast(func.strftime("%s", column), Integer)
    else:  # PostgreSQL: floor first, a cast of a numeric rounds
        epoch = cast(func.floor(func.extract("epoch", column)), BigInteger)
    return epoch // bucket_s


def series_group(by: str) -> Any:
    """The SQL grouping key: the source, or its line (the source itself when it has none configured)."""
    if by == "source":
        return inspections.c.source
    return case((inspections.c.line == DEFAULT_LINE, inspections.c.source), else_=inspections.c.line)


def series(session: Connection | Session, *, after: datetime | None = None, before: datetime | None = None,
           bucket_s: int = 3600, by: str = "line") -> dict[str, Any]:
    """Counts and scores over [after, before) (default: the last 24 hours) in `bucket_s`-long UTC buckets per source
    or per line: inspections, anomalous (defect rate), mean and max score, the thresholds applied, rejected frames.

    Aggregated in SQL; only non-empty buckets are returned, at most MAX_SERIES_BUCKETS per group and
    MAX_SERIES_ROWS in all (`truncated` says when rows were cut)."""
    if by not in SERIES_BY:
        raise HistoryError(f"by must be one of {', '.join(SERIES_BY)}, not {by!r}")
    if not MIN_BUCKET_S <= bucket_s <= MAX_BUCKET_S:
        raise HistoryError(f"bucket must be between {MIN_BUCKET_S} and {MAX_BUCKET_S} seconds, not {bucket_s}")
    before = before or datetime.now(timezone.utc)
    after = after or before - timedelta(hours=24)
    if after >= before:
        raise HistoryError("after must be earlier than before")
    if math.ceil((before - after).total_seconds() / bucket_s) > MAX_SERIES_BUCKETS:
        raise HistoryError(f"{(before - after)} in {bucket_s} s buckets is more than {MAX_SERIES_BUCKETS} buckets; "
                           "choose a larger bucket or a shorter window")
    dialect = _dialect_name(session)
    group = series_group(by).label("grp")
    bucket = _epoch_bucket(inspections.c.captured_at, dialect, bucket_s).label("bucket")
    window = (inspections.c.captured_at >= after, inspections.c.captured_at < before)
    # one row per (group, source, bucket): the sources of each group come with the counts, no second scan
    rows = session.execute(
        select(group, inspections.c.source, bucket, func.count(inspections.c.id),
               func.sum(cast(inspections.c.is_anomalous, Integer)), func.sum(inspections.c.score), func.count(inspections.c.score),
               func.max(inspections.c.score), func.min(inspections.c.threshold), func.max(inspections.c.threshold))
        .where(*window).group_by(group, inspections.c.source, bucket).order_by(group, bucket)
        .limit(MAX_SERIES_ROWS + 1)).all()
    truncated = len(rows) > MAX_SERIES_ROWS
    rejected_bucket = _epoch_bucket(rejected_frames.c.created_at, dialect, bucket_s).label("bucket")
    rejected_rows = session.execute(
        select(rejected_frames.c.source, rejected_bucket, func.count(rejected_frames.c.id))
        .where(rejected_frames.c.created_at >= after, rejected_frames.c.created_at < before)
        .group_by(rejected_frames.c.source, rejected_bucket).limit(MAX_SERIES_ROWS + 1)).all()
    truncated = truncated or len(rejected_rows) > MAX_SERIES_ROWS

    groups: dict[str, dict[str, Any]] = {}
    group_of_source: dict[str, str] = {}
    score_sums: dict[tuple[str, int], list[float]] = {}  # (group, bucket) → [sum of scores, scored rows]

    def group_of(key: str) -> dict[str, Any]:
        return groups.setdefault(key, {"key": key, "sources": [], "model_versions": {}, "inspections": 0,
                                       "anomalous": 0, "rejected": 0, "points": {}})

    def point(entry: dict[str, Any], index: int) -> dict[str, Any]:
        return entry["points"].setdefault(int(index), {
            "t": _iso(datetime.fromtimestamp(int(index) * bucket_s, timezone.utc)), "inspections": 0,
            "anomalous": 0, "defect_rate": 0.0, "mean_score": None, "max_score": None, "min_threshold": None,
            "max_threshold": None, "rejected": 0})

    for key, source, index, count, anomalous, score_sum, scored, max_score, min_threshold, max_threshold in (
            rows[:MAX_SERIES_ROWS]):
        entry = group_of(key)
        group_of_source.setdefault(source, key)  # where its rejected frames go (a source may feed two lines)
        if source not in entry["sources"]:
            entry["sources"].append(source)
        anomalous, count = int(anomalous or 0), int(count)
        item = point(entry, index)
        item["inspections"] += count
        item["anomalous"] += anomalous
        item["defect_rate"] = item["anomalous"] / item["inspections"]
        sums = score_sums.setdefault((key, int(index)), [0.0, 0])
        sums[0] += float(score_sum or 0.0)
        sums[1] += int(scored or 0)
        item["mean_score"] = sums[0] / sums[1] if sums[1] else None
        for name, value, pick in (("max_score", max_score, max), ("min_threshold", min_threshold, min),
                                  ("max_threshold", max_threshold, max)):
            if value is not None:
                item[name] = float(value) if item[name] is None else pick(item[name], float(value))
        entry["inspections"] += count
        entry["anomalous"] += anomalous
    # each source's newest model version in the window (its thresholds): one index lookup per source
    newest_version = {source: session.scalar(
        select(inspections.c.model_version).where(inspections.c.source == source, *window)
        .order_by(inspections.c.captured_at.desc()).limit(1)) for source in group_of_source}
    for entry in groups.values():
        entry["model_versions"] = {source: newest_version[source] for source in entry["sources"]}
    for source, index, count in rejected_rows[:MAX_SERIES_ROWS]:
        entry = group_of(group_of_source.get(source, source))  # no inspection in the window: its own group
        if source not in entry["sources"]:
            entry["sources"].append(source)
        point(entry, index)["rejected"] += int(count)
        entry["rejected"] += int(count)

    out = []
    for key in sorted(groups):
        entry = groups[key]
        entry["sources"].sort()
        entry["anomalous_rate"] = entry["anomalous"] / entry["inspections"] if entry["inspections"] else 0.0
        entry["points"] = [entry["points"][index] for index in sorted(entry["points"])]
        out.append(entry)
    total = sum(entry["inspections"] for entry in out)
    total_anomalous = sum(entry["anomalous"] for entry in out)
    return {"after": _iso(after), "before": _iso(before), "bucket_s": bucket_s, "by": by, "groups": out,
            "total": {"inspections": total, "anomalous": total_anomalous,
                      "anomalous_rate": total_anomalous / total if total else 0.0,
                      "rejected": sum(entry["rejected"] for entry in out)},
            "truncated": truncated}


def _float(value: Any) -> float | None:
    return float(value) if value is not None else None
