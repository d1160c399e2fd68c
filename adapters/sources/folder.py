"""Folder source: image files dropped into a directory (an "inbox").

Polling (no inotify/watchdog dependency, works on network shares): every `poll_interval_s` the directory is
listed; a file is emitted once its size and mtime have not changed for `settle_s` (so partially written files are
not read early); dotfiles, `*.part`, `*.tmp`, `*.crdownload`, `*.done` and the `processed/` folder are ignored.
Files already present at start are processed; oldest mtime first. Unreadable files are still emitted (with
`meta["error"]`) so the pipeline records a rejected row; nothing is skipped silently.

After the frame's result is committed (`on_done(True)`) the file is moved to `<dir>/processed/<relative path>`
(`after = "move"`, default), deleted (`"delete"`) or renamed to `<name>.done` in place (`"mark"`); with
`on_done(False)` it stays and is retried after `retry_s`. The frame_id hashes (source id, relative path, size,
mtime_ns), so a file re-read after a crash between commit and move gets the same frame_id and the DB dedupes it.

Options: `recursive` (false), `after` (move|delete|mark), `processed_dir` ("processed", relative to the inbox or
absolute), `settle_s` (1.0), `poll_interval_s` (0.5), `retry_s` (10), `create` (true: create a missing inbox),
`ignore` (extra glob patterns to ignore), `max_bytes` (256 MiB: a bigger file is a rejected frame, never read),
`complete_wait_s` (10), `done_marker` (false).

When is a file complete? (1) Its size and mtime held still for `settle_s`; (2) its bytes look whole for its format
(adapters/sources/completeness.py: JPEG segments walked to the image's own end marker, so an EXIF thumbnail's
does not count; PNG chunks to IEND; BMP and WebP as long as their headers say; TIFF IFDs and strips within the
file); (3) with `done_marker = true`, `<name>.done` or `<stem>.done` exists (removed with the file). A file that
still looks incomplete is looked at again until its mtime is `complete_wait_s` old (at once when its marker
exists); then it gets a rejected row and stays in place: should it change (its writer resumed), it is read again.
Writers that rename into place (`.name.tmp`, `name.part`, `name.tmp` → `name`) need nothing: those names are
ignored until the rename.

Nothing is skipped without a record: a subfolder (when not recursive) or a special file (FIFO, socket) gets one
rejected row and is left in place; a file name that is not valid UTF-8 is read and recorded with \\xNN escapes.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from adapters.sources.base import (
    DEFAULT_MAX_BYTES,
    Frame,
    SourceSettings,
    SourceStatus,
    resolve_path_uri,
)
from adapters.sources.completeness import looks_complete, missing_part
from adapters.sources.registry import register_source_kind
from adapters.sources.source import FrameSource
from adapters.timeutil import utc_now

__all__ = ["FolderSettings", "FolderSource", "folder_frame_id", "looks_complete", "printable_name"]

IGNORED_PATTERNS: tuple[str, ...] = (".*", "*.part", "*.tmp", "*.crdownload", "*.done", "*~")
AFTER_ACTIONS = ("move", "delete", "mark")


class FolderSettings(SourceSettings):
    """`kind = "folder"`: uri is the directory to watch (relative: to the config file's directory)."""

    kind: Literal["folder"]
    recursive: bool = Field(False, description="also watch sub-folders")
    after: str = Field("move", description="after the result is committed: move | delete | mark (rename .done)")
    processed_dir: str = Field("processed", description="where `move` puts files; relative to the inbox")
    settle_s: float = Field(1.0, ge=0, description="size and mtime unchanged this long before a file is read")
    poll_interval_s: float = Field(0.5, gt=0, description="seconds between two listings")
    retry_s: float = Field(10.0, ge=0, description="a file not processed (done(False)) is retried after this")
    create: bool = Field(True, description="create a missing inbox")
    ignore: list[str] = Field(default_factory=list, description="extra glob patterns to ignore")
    max_bytes: int = Field(DEFAULT_MAX_BYTES, ge=1, description="a bigger file is a rejected frame, never read")
    complete_wait_s: float = Field(10.0, ge=0, description="a file that looks incomplete (JPEG, PNG, BMP, TIFF, "
                                   "WebP structure) is retried until its mtime is this old (a slow writer)")
    done_marker: bool = Field(False, description="read `<name>` only once `<name>.done` (or `<stem>.done`) "
                                                 "exists; the marker goes with the file")

    @field_validator("done_marker")
    @classmethod
    def _marker_and_mark(cls, value: bool, info) -> bool:
        if value and info.data.get("after") == "mark":
            raise ValueError('done_marker = true needs after = "move" or "delete": "mark" renames files to '
                             "<name>.done, the marker's own name")
        return value

    @field_validator("after")
    @classmethod
    def _known_action(cls, value: str) -> str:
        if value not in AFTER_ACTIONS:
            raise ValueError(f"after must be one of {AFTER_ACTIONS}, got {value!r}")
        return value

    def resolved(self, base_dir: Path) -> FolderSettings:
        return resolve_path_uri(self, base_dir)  # type: ignore[return-value]


def folder_frame_id(source_id: str, relative_path: str, size: int, mtime_ns: int) -> str:
    """Stable across restarts: the same unmoved, unchanged file always gets the same id.

    A file name that is not valid UTF-8 reaches Python with lone surrogates (os.fsdecode): `surrogatepass` hashes
    it as is (valid names hash to the same bytes as before)."""
    key = f"{source_id}\0{relative_path}\0{size}\0{mtime_ns}".encode("utf-8", "surrogatepass")
    return f"{source_id}:{hashlib.sha1(key).hexdigest()[:20]}"


def printable_name(name: str) -> str:
    """A file name that may hold undecodable bytes (lone surrogates), as text any database and log can take."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace") if _has_surrogates(name) \
        else name


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


@dataclass
class _Seen:
    size: int
    mtime_ns: int
    stable_since: float


@register_source_kind("folder", settings=FolderSettings)
class FolderSource(FrameSource):
    spec: FolderSettings

    def __init__(self, spec: FolderSettings, **kwargs) -> None:
        super().__init__(spec, **kwargs)
        spec = self.spec
        if not spec.uri:
            raise ValueError(f"folder source {spec.id!r} needs uri = the directory to watch")
        self.directory = Path(spec.uri).expanduser()
        self.recursive = spec.recursive
        self.after = spec.after
        processed = Path(spec.processed_dir)
        self.processed_dir = processed if processed.is_absolute() else self.directory / processed
        self.settle_s = spec.settle_s
        self.poll_interval_s = spec.poll_interval_s
        self.retry_s = spec.retry_s
        self.create = spec.create
        self.ignore = IGNORED_PATTERNS + tuple(spec.ignore)
        # Inputs bigger than this are refused unread (a rejected row), so a huge file cannot exhaust memory.
        self.max_bytes = spec.max_bytes
        # A JPEG/PNG without its end marker whose mtime is younger than this is a writer still at work: it is
        # retried, not rejected. Older ones are emitted (and rejected as truncated).
        self.complete_wait_s = spec.complete_wait_s
        # Directories (when not recursive) and special files (FIFOs, sockets) already recorded, by path.
        self._noted: set[str] = set()
        self._seen: dict[str, _Seen] = {}
        self._in_flight: set[str] = set()
        # path -> frame_id of files already finished: a listing taken just before the file was moved must not
        # emit it again (the entry goes once the path is no longer listed).
        self._completed: dict[str, str] = {}
        self._retry_at: dict[str, float] = {}
        self._pending_notes: list[Frame] = []
        self._listed_other: set[str] = set()
        self._lock = threading.Lock()

    # -- scanning --------------------------------------------------------------------------------------------
    def _ignored(self, name: str) -> bool:
        return any(fnmatch.fnmatch(name, pattern) for pattern in self.ignore)

    def _list_files(self) -> list[tuple[str, os.stat_result]]:
        found: list[tuple[str, os.stat_result]] = []
        self._listed_other = set()
        processed = self.processed_dir.resolve() if self.after == "move" else None
        stack = [self.directory]
        while stack:
            folder = stack.pop()
            try:
                entries = list(os.scandir(folder))
            except FileNotFoundError:
                if folder == self.directory:
                    raise
                continue
            for entry in entries:
                if self._ignored(entry.name):
                    continue
                try:
                    if entry.is_dir(follow_symlinks=False):
                        is_processed = processed is not None and Path(entry.path).resolve() == processed
                        if self.recursive and not is_processed:
                            stack.append(Path(entry.path))
                        elif not is_processed:
                            self._note(entry.path, "is a folder and this source is not recursive "
                                                   "(set recursive = true to read subfolders)")
                        continue
                    if not entry.is_file():
                        self._note(entry.path, "is not a regular file (a FIFO, socket, device or broken link)")
                        continue
                    st = entry.stat()
                except FileNotFoundError:  # vanished between listing and stat
                    continue
                found.append((os.path.relpath(entry.path, self.directory), st))
        return found

    def _ready_files(self) -> list[tuple[str, os.stat_result]]:
        """Files whose size+mtime were stable for settle_s, not in flight, not waiting for a retry; oldest first."""
        now = time.monotonic()
        listed = self._list_files()
        ready = []
        current = set()
        with self._lock:
            for rel, st in listed:
                current.add(rel)
                seen = self._seen.get(rel)
                if seen is None or seen.size != st.st_size or seen.mtime_ns != st.st_mtime_ns:
                    self._seen[rel] = _Seen(st.st_size, st.st_mtime_ns, now)
                    if self.settle_s > 0:
                        continue
                elif now - seen.stable_since < self.settle_s:
                    continue
                if rel in self._in_flight or self._retry_at.get(rel, 0.0) > now:
                    continue
                if self.spec.done_marker and self._marker(rel) is None:
                    continue  # its writer has not said it is finished
                if self._completed.get(rel) == folder_frame_id(self.id, rel, st.st_size, st.st_mtime_ns):
                    continue
                ready.append((rel, st))
            for rel in set(self._seen) - current:
                del self._seen[rel]
                self._retry_at.pop(rel, None)
            for rel in set(self._completed) - current:
                del self._completed[rel]
            self._noted.intersection_update(self._listed_other)
        ready.sort(key=lambda item: (item[1].st_mtime_ns, item[0]))
        return ready

    def _note(self, path: str, reason: str) -> None:
        """Record (once per path while it exists) an inbox entry that is not read: a rejected row, not silence."""
        self._listed_other.add(path)
        if path in self._noted:
            return
        self._noted.add(path)
        name = printable_name(path)
        meta = self._base_meta()
        meta.update(path=name, error=f"{name} {reason}; left in place")
        self._error(meta["error"])
        key = f"{self.id}\0note\0{path}".encode("utf-8", "surrogatepass")
        self._pending_notes.append(Frame(frame_id=f"{self.id}:{hashlib.sha1(key).hexdigest()[:20]}",
                                         source_id=self.id, captured_at=utc_now(), name=name, meta=meta))

    # -- frames ----------------------------------------------------------------------------------------------
    def _make_frame(self, rel: str, st: os.stat_result) -> Frame | None:
        """The file's frame; None when it looks half-written and young enough that its writer may still be
        at work (it is looked at again shortly)."""
        path = self.directory / rel
        meta = self._base_meta()
        meta.update(path=printable_name(str(path)), relative_path=printable_name(rel), size=st.st_size)
        data: bytes | None = None
        keep = False  # True: the file stays where it is after its (rejected) row is written
        if st.st_size > self.max_bytes:
            meta["error"] = f"file is {st.st_size} bytes, more than max_bytes = {self.max_bytes}; not read"
            self._error(meta["error"])
        else:
            try:
                data = path.read_bytes()
            except OSError as exc:
                meta["error"] = f"cannot read {printable_name(str(path))}: {exc.strerror or exc}"
                self._error(meta["error"])
            else:
                if len(data) > self.max_bytes:
                    meta["error"] = f"file grew past max_bytes = {self.max_bytes} while being read"
                    data = None
                elif (missing := missing_part(data)) is not None:
                    age = time.time() - st.st_mtime
                    if age < self.complete_wait_s and self._marker(rel) is None:
                        return None  # a slow writer: look again once it has written more (or stopped for good)
                    # Rejected but left in place: should its writer resume, the changed file is read again.
                    meta["error"] = (f"{printable_name(rel)} looks incomplete ({missing}) {age:.0f}s after its last "
                                     f"change; left in place, read again if it changes")
                    self._error(meta["error"])
                    data, keep = None, True
        frame_id = folder_frame_id(self.id, rel, st.st_size, st.st_mtime_ns)
        # The row keeps the name the file will have once processed (the result commits before the move).
        final = path if keep else self._final_path(path, rel, frame_id)
        meta["stored_name"] = printable_name(str(final))
        frame = Frame(
            frame_id=frame_id,
            source_id=self.id,
            captured_at=self._checked_capture_time(datetime.fromtimestamp(st.st_mtime_ns / 1e9, tz=timezone.utc),
                                                   meta),
            data=data,
            name=printable_name(str(path)),
            meta=meta,
        )
        frame.on_done = lambda ok, rel=rel, frame_id=frame_id, final=final, keep=keep: self._finish(
            rel, frame_id, ok, final, keep=keep)
        return frame

    def _marker(self, rel: str) -> Path | None:
        """The `.done` marker a writer leaves beside a finished file: `<name>.done` or `<stem>.done`."""
        path = self.directory / rel
        for marker in (path.with_name(path.name + ".done"), path.with_name(path.stem + ".done")):
            if marker != path and marker.is_file():
                return marker
        return None

    def _final_path(self, path: Path, rel: str, frame_id: str) -> Path:
        """Where the file ends up after processing: processed_dir/rel for `move` (a same-named earlier file kept,
        this one renamed), path + ".done" for `mark`, the inbox path (gone) for `delete`."""
        if self.after == "delete":
            return path
        if self.after == "mark":
            return path.with_name(path.name + ".done")
        target = self.processed_dir / rel
        if target.exists():  # a same-named earlier file: keep both
            target = target.with_name(f"{target.stem}.{frame_id.rsplit(':', 1)[-1][:8]}{target.suffix}")
        return target

    def _frame_or_error(self, rel: str, st: os.stat_result) -> Frame | None:
        """`_make_frame`, contained: whatever it raises becomes a rejected (and moved) input, never a crash."""
        frame_id = folder_frame_id(self.id, rel, st.st_size, st.st_mtime_ns)
        return self._contained_frame(
            lambda: self._make_frame(rel, st), frame_id=frame_id, name=printable_name(str(self.directory / rel)),
            on_done=lambda ok: self._finish(rel, frame_id, ok))

    def _finish(self, rel: str, frame_id: str, ok: bool, final: Path | None = None, *, keep: bool = False) -> None:
        """Runs on the pipeline's thread once the frame's result is committed (ok) or given up (not ok). `keep`:
        the file stays (an incomplete one: read again once it changes, its size and mtime in a new frame_id)."""
        path = self.directory / rel
        try:
            if ok and not keep:
                self._dispose(path, rel, frame_id, final)
        except OSError as exc:
            self._error(f"cannot {self.after} {path} after processing: {exc}")
            ok = False
        finally:
            with self._lock:
                self._in_flight.discard(rel)
                if ok:
                    self._completed[rel] = frame_id
                else:
                    self._retry_at[rel] = time.monotonic() + self.retry_s

    def _dispose(self, path: Path, rel: str, frame_id: str, final: Path | None = None) -> None:
        if not path.exists():
            return
        marker = self._marker(rel) if self.spec.done_marker else None
        if self.after == "delete":
            path.unlink()
        elif self.after == "mark":
            path.rename(path.with_name(path.name + ".done"))
        else:
            target = final if final is not None and not final.exists() else self._final_path(path, rel, frame_id)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
        if marker is not None:
            marker.unlink(missing_ok=True)

    # -- thread ----------------------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop_event.is_set():
            try:
                if self.create:
                    self.directory.mkdir(parents=True, exist_ok=True)
                ready = self._ready_files()
            except OSError as exc:
                self._error(f"cannot list {self.directory}: {exc}")
                self._set_status(SourceStatus.OFFLINE)
                self._stop_event.wait(max(self.poll_interval_s, 1.0))
                continue
            self._set_status(SourceStatus.ONLINE)
            notes, self._pending_notes = self._pending_notes, []
            for note in notes:
                if not self._emit(note, throttle=False):
                    return
            for rel, st in ready:
                with self._lock:
                    self._in_flight.add(rel)
                frame = self._frame_or_error(rel, st)
                if frame is None:
                    with self._lock:
                        self._in_flight.discard(rel)
                        self._retry_at[rel] = time.monotonic() + min(self.retry_s, max(self.settle_s, 0.2))
                    continue
                if not self._emit(frame):
                    return
            self._stop_event.wait(self.poll_interval_s)
