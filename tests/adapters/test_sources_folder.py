"""Folder source: inbox files become frames once stable, are moved/deleted/marked after commit, keep their
frame_id across restarts, and bad files are emitted rather than skipped."""

from __future__ import annotations

import os
import pathlib

import cv2
import numpy as np
import pytest

from adapters.sources import build_source
from adapters.sources.folder import FolderSource
from tests.waiting import take


def png_bytes(value: int) -> bytes:
    ok, buf = cv2.imencode(".png", np.full((8, 8, 3), value, np.uint8))
    assert ok
    return buf.tobytes()


def write(path: pathlib.Path, data: bytes, mtime: int | None = None) -> None:
    path.write_bytes(data)
    if mtime is not None:
        os.utime(path, ns=(mtime * 10**9, mtime * 10**9))


def folder_source(inbox: pathlib.Path, **options) -> FolderSource:
    spec = {"id": "inbox", "kind": "folder", "uri": str(inbox), "line": "L1", "settle_s": 0.1,
            "poll_interval_s": 0.05, **options}
    return build_source(spec, queue_size=16)




def test_files_become_frames_in_mtime_order_and_are_moved(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    write(inbox / "b.png", png_bytes(1), mtime=1_700_000_000)  # older, though sorted later by name
    write(inbox / "a.png", png_bytes(2), mtime=1_700_000_100)
    write(inbox / ".hidden.png", png_bytes(3))
    write(inbox / "c.png.part", png_bytes(4))
    write(inbox / "d.tmp", png_bytes(5))
    source = folder_source(inbox)
    statuses = []
    source.on_status = lambda src, status: statuses.append(status.value)
    source.start()
    try:
        frames = take(source, 2)
        assert [f.name for f in frames] == [str(inbox / "b.png"), str(inbox / "a.png")]
        assert frames[0].data == png_bytes(1) and frames[1].data == png_bytes(2)
        assert frames[0].meta["line"] == "L1" and frames[0].source_id == "inbox"
        assert frames[0].captured_at.timestamp() == 1_700_000_000
        write(inbox / "e.png", png_bytes(6))  # appears while running
        (late,) = take(source, 1)
        assert late.data == png_bytes(6)
        for frame in [*frames, late]:
            frame.done(True)
        assert source.queue.get(timeout=0.5) is None  # ignored names never show up
        assert sorted(p.name for p in (inbox / "processed").iterdir()) == ["a.png", "b.png", "e.png"]
        assert sorted(p.name for p in inbox.iterdir()) == [".hidden.png", "c.png.part", "d.tmp", "processed"]
        assert source.counters.frames_in == 3
        assert statuses == ["online"]
    finally:
        source.stop()
    assert source.status.value == "offline" and statuses[-1] == "offline"


def test_partial_file_is_not_read_until_size_and_mtime_are_stable(tmp_path, monkeypatch):
    import adapters.sources.folder as folder_module

    now = [1000.0]
    monkeypatch.setattr(folder_module.time, "monotonic", lambda: now[0])
    source = folder_source(tmp_path, settle_s=1.0)
    path = tmp_path / "big.png"
    write(path, b"\x89PNG partial", mtime=1_700_000_000)
    assert source._ready_files() == []  # first sighting
    now[0] += 5
    write(path, b"\x89PNG partial, more bytes", mtime=1_700_000_001)
    assert source._ready_files() == []  # changed since: the clock starts again
    now[0] += 0.5
    assert source._ready_files() == []  # stable, but not for settle_s yet
    now[0] += 0.6
    ready = source._ready_files()
    assert [rel for rel, _ in ready] == ["big.png"]
    frame = source._make_frame(*ready[0])
    assert frame.data == b"\x89PNG partial, more bytes"


def test_same_frame_id_after_restart_when_not_moved(tmp_path):
    write(tmp_path / "x.png", png_bytes(9))
    first = folder_source(tmp_path)
    first.start()
    (frame,) = take(first, 1)
    first.stop()  # "crash" after commit, before the move: done() never called

    second = folder_source(tmp_path)
    second.start()
    try:
        (again,) = take(second, 1)
        assert again.frame_id == frame.frame_id and again.data == frame.data
        again.done(True)
    finally:
        second.stop()
    # a new file with the same name is a new frame
    write(tmp_path / "x.png", png_bytes(10), mtime=1_800_000_000)
    third = folder_source(tmp_path)
    third.start()
    try:
        (new,) = take(third, 1)
        assert new.frame_id != frame.frame_id
    finally:
        third.stop()


def test_not_processed_is_retried_with_the_same_frame_id(tmp_path):
    write(tmp_path / "x.png", png_bytes(1))
    source = folder_source(tmp_path, retry_s=0.2)
    source.start()
    try:
        (frame,) = take(source, 1)
        assert source.queue.get(timeout=0.5) is None  # in flight: not emitted twice
        frame.done(False)
        (retry,) = take(source, 1)
        assert retry.frame_id == frame.frame_id
        assert (tmp_path / "x.png").exists()
    finally:
        source.stop()


def test_bad_and_empty_and_unreadable_files_are_emitted(tmp_path, monkeypatch):
    write(tmp_path / "garbage.jpg", b"this is not a jpeg", mtime=1_700_000_000)
    write(tmp_path / "empty.png", b"", mtime=1_700_000_001)
    write(tmp_path / "locked.png", png_bytes(1), mtime=1_700_000_002)
    real_read_bytes = pathlib.Path.read_bytes

    def read_bytes(self):
        if self.name == "locked.png":  # root can read anything, so simulate the permission error
            raise PermissionError(13, "Permission denied")
        return real_read_bytes(self)

    monkeypatch.setattr(pathlib.Path, "read_bytes", read_bytes)
    source = folder_source(tmp_path)
    source.start()
    try:
        garbage, empty, locked = take(source, 3)
    finally:
        source.stop()
    assert garbage.data == b"this is not a jpeg" and "error" not in garbage.meta
    assert empty.data == b""
    assert locked.data is None and locked.image is None
    assert "locked.png" in locked.meta["error"] and "Permission denied" in locked.meta["error"]
    assert source.counters.errors == 1


@pytest.mark.parametrize("after", ["delete", "mark"])
def test_after_delete_or_mark(tmp_path, after):
    write(tmp_path / "x.png", png_bytes(1))
    source = folder_source(tmp_path, after=after)
    source.start()
    try:
        (frame,) = take(source, 1)
        frame.done(True)
        assert source.queue.get(timeout=0.5) is None  # a marked file is not picked up again
    finally:
        source.stop()
    expected = [] if after == "delete" else ["x.png.done"]
    assert sorted(p.name for p in tmp_path.iterdir()) == expected


def test_recursive_keeps_relative_paths_and_skips_processed(tmp_path):
    (tmp_path / "cam1").mkdir()
    write(tmp_path / "cam1" / "x.png", png_bytes(1))
    source = folder_source(tmp_path, recursive=True)
    source.start()
    try:
        (frame,) = take(source, 1)
        assert frame.meta["relative_path"] == os.path.join("cam1", "x.png")
        frame.done(True)
        assert source.queue.get(timeout=0.5) is None  # processed/cam1/x.png is not an input
    finally:
        source.stop()
    assert (tmp_path / "processed" / "cam1" / "x.png").read_bytes() == png_bytes(1)
