"""A budget of bytes for decoded frames in flight: decode waits while frames already decoded (in the batcher,
the model, the writers) hold it, so memory is bounded in bytes, not only in frames: eight tiny PNGs declaring
10000x9999 pixels each cannot all be decoded at once. Priority frames (live cameras, triggers) go first: while
one waits, the bytes freed are not taken by a backlog frame.

A frame is charged its whole life's peak, estimated from its header before anything is decoded
(`frame_peak_bytes`), not only the RGB array it ends as: PIL holds an RGB image in 4 bytes a pixel, hands it to
numpy through a copy and the result is made contiguous (a PNG decode peaks near 10 bytes a pixel), and the result
writer later renders the map at frame size (float32), the mask and the heatmap overlay (about 16 bytes a pixel,
measured with tracemalloc on a 9 MP frame). Once decoded, the hold shrinks to what the frame keeps (its RGB and
model-sized pixels) plus the rendering still ahead, until the frame is done: the budget bounds the peak, not just
the frames at rest."""

from __future__ import annotations

import threading
from typing import Any


class ByteBudget:
    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"budget must be >= 1 byte, got {capacity}")
        self.capacity = capacity
        self.used = 0
        self.peak = 0
        self._cond = threading.Condition()
        self._priority_waiting = 0

    def acquire(self, nbytes: int, abort: threading.Event | None = None, *, priority: bool = False) -> int:
        """Wait until `nbytes` fit (a frame larger than the whole budget waits until nothing else is held);
        returns the amount to `release` later. With `abort` set it stops waiting (shutdown) and takes it anyway.
        priority=True: served before the waiters without it."""
        nbytes = max(0, min(int(nbytes), self.capacity))
        with self._cond:
            if priority:
                self._priority_waiting += 1
            try:
                while (self.used + nbytes > self.capacity or (not priority and self._priority_waiting)) \
                        and not (abort is not None and abort.is_set()):
                    self._cond.wait(0.1)
            finally:
                if priority:
                    self._priority_waiting -= 1
                    self._cond.notify_all()
            self.used += nbytes
            self.peak = max(self.peak, self.used)
        return nbytes

    def release(self, nbytes: int) -> None:
        with self._cond:
            self.used = max(0, self.used - nbytes)
            self._cond.notify_all()

    def hold_until_done(self, frame: Any, nbytes: int) -> Hold:
        """Release `nbytes` when the frame is finished (`frame.done(...)`, called exactly once per frame); the
        returned hold can give part of it back earlier (`shrink_to`)."""
        callback = frame.on_done
        hold = Hold(self, nbytes)

        def release_then(ok: bool) -> None:
            hold.shrink_to(0)
            if callback is not None:
                callback(ok)

        frame.on_done = release_then
        return hold


class Hold:
    """Bytes of a budget held for one frame; `shrink_to(n)` gives back all but n of them now."""

    def __init__(self, budget: ByteBudget, nbytes: int) -> None:
        self.budget = budget
        self.nbytes = nbytes
        self._lock = threading.Lock()

    def shrink_to(self, nbytes: int) -> None:
        with self._lock:
            extra = self.nbytes - max(0, int(nbytes))
            if extra <= 0:
                return
            self.nbytes -= extra
        self.budget.release(extra)


# Peak bytes a pixel while decoding: libjpeg(-turbo) writes RGB directly (OpenCV without IMREAD_COLOR_RGB converts
# into a second array); PIL's decoders: a 4-byte-a-pixel image, a bytes copy for numpy, the contiguous RGB result.
JPEG_PEAK_PER_PIXEL = 6
PIL_PEAK_PER_PIXEL = 10
RGB_PER_PIXEL = 3
# The result writer's rendering at frame size (daemon/frames/writer.py: map, mask, regions, heatmap overlay, encodes).
RENDER_PEAK_PER_PIXEL = 16


def decode_peak_bytes(data: bytes, width: int, height: int) -> int:
    """What decoding `data` (declaring width x height) takes at its peak, estimated before decoding."""
    per_pixel = JPEG_PEAK_PER_PIXEL if data[:3] == b"\xff\xd8\xff" else PIL_PEAK_PER_PIXEL
    return per_pixel * width * height


def render_bytes(width: int, height: int) -> int:
    """What rendering the frame's artifacts takes on top of its RGB array."""
    return RENDER_PEAK_PER_PIXEL * width * height


def frame_peak_bytes(data: bytes, width: int, height: int) -> int:
    """The most a frame of width x height holds at once from decode to done: its decode, or its RGB array plus
    its rendering, whichever is more."""
    return max(decode_peak_bytes(data, width, height), RGB_PER_PIXEL * width * height + render_bytes(width, height))
