"""Run as `python -m tests.hardening.memory_burst LIMIT_PIXELS BUDGET_MB COUNT`: a pipeline (SQLite, constant
detector) takes a burst of COUNT tiny PNGs declaring 10000x9999 pixels and COUNT near-limit PNGs; prints one JSON
line with the peak RSS growth (MiB) over the warmed-up baseline and the row counts. In a subprocess so that the
peak (ru_maxrss, a high-water mark) is this burst's alone."""

from __future__ import annotations

import json
import resource
import struct
import sys
import tempfile
import time
import zlib
from pathlib import Path


def png_declaring(width: int, height: int, pixels: bool = True) -> bytes:
    """A black RGB PNG of width x height, built row by row (never holding the pixels): a few KB for any size.
    pixels=False: the header only, with an empty image stream (instant; for checks that must not decode)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    compressor = zlib.compressobj(1)
    row = b"\0" * (1 + 3 * width)
    parts = [compressor.compress(row) for _ in range(height if pixels else 0)]
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(limit_pixels: int, budget_mb: int, count: int) -> dict:
    from adapters.db import make_engine, make_session_factory, upgrade
    from tests.daemon.test_pipeline import ConstantDetector, png
    from tests.hardening.helpers import RedeliveringSource, make_pipeline, rows

    side = int(limit_pixels ** 0.5) - 8
    near_limit = png_declaring(side, side)
    huge = png_declaring(10000, 9999)
    tmp = Path(tempfile.mkdtemp(prefix="anomalyd-memory-"))
    engine = make_engine(f"sqlite:///{tmp}/m.db")
    upgrade(engine)
    sessions = make_session_factory(engine)
    source = RedeliveringSource(limit=1)
    pipeline = make_pipeline(sessions, tmp, [source], ConstantDetector(0.9), max_pixels=limit_pixels,
                             decode_budget_bytes=budget_mb << 20)
    pipeline.start()
    source.push("warm-up", png(100))
    while pipeline.processed < 1:
        time.sleep(0.01)
    baseline = peak_mib()
    for index in range(count):
        source.push(f"huge-{index}", huge)
        source.push(f"near-{index}", near_limit)
    deadline = time.monotonic() + 120
    while pipeline.processed + pipeline.rejected < 1 + 2 * count and time.monotonic() < deadline:
        time.sleep(0.05)
    pipeline.stop(30)
    inspections, rejected = rows(sessions)
    return {"growth_mib": peak_mib() - baseline, "inspected": len(inspections) - 1, "rejected": len(rejected),
            "side": side, "budget_peak_mib": pipeline.decode_budget.peak / 2**20,
            "reasons": sorted({r.reason.split(": ", 1)[-1][:60] for r in rejected.values()})}


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))))
