"""Slowly written files are never lost (issue 18, finding 1). A JPEG with an EXIF thumbnail written with a pause
right after the thumbnail (whose own end marker made the old check say "complete"), a BMP written over seconds,
and a truncated file that grows again after being rejected: each is inspected whole, in a real pipeline. The
format checks see every truncation of JPEG, PNG, BMP, TIFF and WebP files; `.done` markers and rename-into-place
are honoured."""

from __future__ import annotations

import struct
import threading
import time

import cv2
import numpy as np
import pytest

from adapters.sources import build_source
from adapters.sources.completeness import missing_part
from tests.daemon.test_pipeline import BrightnessDetector
from tests.hardening.helpers import make_pipeline, rows
from tests.waiting import wait_until


def picture(size: int = 96) -> np.ndarray:
    rng = np.random.default_rng(7)
    return cv2.GaussianBlur(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), (5, 5), 0)


def encoded(ext: str, image: np.ndarray | None = None) -> bytes:
    ok, buffer = cv2.imencode(ext, picture() if image is None else image)
    assert ok
    return buffer.tobytes()


def jpeg_with_exif_thumbnail() -> tuple[bytes, int]:
    """A JPEG whose APP1 (EXIF) segment ends with a whole thumbnail JPEG; returns it and the offset just after
    the thumbnail's end-of-image marker (where a camera may pause)."""
    thumbnail = encoded(".jpg", picture(16))
    tiff = bytearray(b"II*\0" + struct.pack("<I", 8))
    tiff += struct.pack("<H", 0) + struct.pack("<I", 14)  # IFD0: no entries, then IFD1 at 14
    thumb_at = 14 + 2 + 2 * 12 + 4
    tiff += struct.pack("<H", 2)
    tiff += struct.pack("<HHII", 0x0201, 4, 1, thumb_at)  # JPEGInterchangeFormat
    tiff += struct.pack("<HHII", 0x0202, 4, 1, len(thumbnail))  # JPEGInterchangeFormatLength
    tiff += struct.pack("<I", 0)
    payload = b"Exif\0\0" + bytes(tiff) + thumbnail
    app1 = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    main = encoded(".jpg")
    data = main[:2] + app1 + main[2:]
    return data, 2 + len(app1)


def folder_pipeline(sessions, tmp_path, **options):
    inbox = tmp_path / "inbox"
    inbox.mkdir(exist_ok=True)
    source = build_source({"id": "inbox", "kind": "folder", "uri": str(inbox), "settle_s": 0.1,
                           "poll_interval_s": 0.05, "retry_s": 0.1, **options}, queue_size=8)
    pipeline = make_pipeline(sessions, tmp_path, [source], BrightnessDetector())
    pipeline.start()
    source.start()
    return inbox, source, pipeline


def write_in_parts(path, data: bytes, cuts: list[int], pause_s: float) -> threading.Thread:
    def run() -> None:
        with open(path, "wb") as handle:
            start = 0
            for cut in [*cuts, len(data)]:
                handle.write(data[start:cut])
                handle.flush()
                start = cut
                if cut != len(data):
                    time.sleep(pause_s)  # the writer's own pace (longer than settle_s), not synchronisation

    thread = threading.Thread(target=run)
    thread.start()
    return thread


@pytest.mark.parametrize("kind", ["jpeg paused after its EXIF thumbnail", "bmp written over seconds"])
def test_a_slowly_written_file_is_inspected_whole(sqlite_sessions, tmp_path, kind):
    if kind.startswith("jpeg"):
        data, after_thumbnail = jpeg_with_exif_thumbnail()
        name, cuts, pause = "cam.jpg", [after_thumbnail], 1.0
        assert data[:after_thumbnail].endswith(b"\xff\xd9")  # the trap: this prefix ends in an end marker
    else:
        data = encoded(".bmp")
        name, cuts, pause = "cam.bmp", [len(data) * k // 5 for k in range(1, 5)], 0.4
    inbox, source, pipeline = folder_pipeline(sqlite_sessions, tmp_path)
    try:
        write_in_parts(inbox / name, data, cuts, pause).join()
        assert wait_until(lambda: pipeline.processed + pipeline.rejected >= 1, 30)
    finally:
        source.stop()
        pipeline.stop(10)
    inspections, rejected = rows(sqlite_sessions)
    assert [row.reason for row in rejected.values()] == []
    assert len(inspections) == 1
    assert (inbox / "processed" / name).read_bytes() == data


def test_a_file_rejected_as_incomplete_is_inspected_once_it_grows(sqlite_sessions, tmp_path):
    data = encoded(".jpg")
    inbox, source, pipeline = folder_pipeline(sqlite_sessions, tmp_path, complete_wait_s=0.3)
    try:
        (inbox / "late.jpg").write_bytes(data[: len(data) // 2])
        assert wait_until(lambda: pipeline.rejected == 1, 30)
        (_, rejected), = [rows(sqlite_sessions)]
        (reason,) = [row.reason for row in rejected.values()]
        assert "looks incomplete" in reason and "left in place" in reason
        assert (inbox / "late.jpg").exists()  # not moved away for good
        with open(inbox / "late.jpg", "ab") as handle:  # its writer resumes
            handle.write(data[len(data) // 2:])
        assert wait_until(lambda: pipeline.processed == 1, 30)
    finally:
        source.stop()
        pipeline.stop(10)
    assert (inbox / "processed" / "late.jpg").read_bytes() == data
    assert pipeline.rejected == 1


def test_done_markers_and_rename_into_place(sqlite_sessions, tmp_path):
    inbox, source, pipeline = folder_pipeline(sqlite_sessions, tmp_path, done_marker=True, settle_s=0.0)
    data = encoded(".png")
    try:
        (inbox / "waiting.png").write_bytes(data)  # no marker yet
        (inbox / ".renamed.png.tmp").write_bytes(data[:100])  # a hidden temporary name
        (inbox / "renamed.png.part").write_bytes(data[:100])
        (inbox / "first.png").write_bytes(data)
        (inbox / "first.png.done").write_bytes(b"")
        assert wait_until(lambda: pipeline.processed == 1, 30)
        assert not (inbox / "first.png.done").exists()  # the marker goes with its file
        assert (inbox / "waiting.png").exists() and pipeline.processed + pipeline.rejected == 1

        (inbox / ".renamed.png.tmp").write_bytes(data)
        (inbox / ".renamed.png.tmp").rename(inbox / "renamed.png")
        (inbox / "renamed.done").write_bytes(b"")  # the `<stem>.done` spelling
        (inbox / "waiting.png.done").write_bytes(b"")
        assert wait_until(lambda: pipeline.processed == 3, 30)
    finally:
        source.stop()
        pipeline.stop(10)
    assert sorted(p.name for p in (inbox / "processed").iterdir()) == ["first.png", "renamed.png", "waiting.png"]
    assert sorted(p.name for p in inbox.iterdir()) == ["processed", "renamed.png.part"]
    assert pipeline.rejected == 0


@pytest.mark.parametrize("ext", [".jpg", ".png", ".bmp", ".tiff", ".webp"])
def test_every_truncation_is_seen_as_incomplete(ext):
    data = encoded(ext) if ext != ".jpg" else jpeg_with_exif_thumbnail()[0]
    assert missing_part(data) is None
    step = max(1, len(data) // 97)
    cuts = sorted({*range(1, len(data), step), len(data) - 1, len(data) - 2})
    if ext == ".tiff":  # the header and first IFD may precede the strips: a cut just before the end still shows
        cuts = [cut for cut in cuts if cut >= 8]
    seen = [cut for cut in cuts if missing_part(data[:cut]) is None]
    assert seen == [], f"{ext}: cut at {seen[:5]} of {len(data)} bytes looks whole"
