"""Is an image file whole, or still being written? A format-aware check of the bytes, used by the folder source on
top of size stability (a file whose size and mtime held still for `settle_s`).

`missing_part(data)` returns None when the bytes look whole, else what is missing. It reads structure, not just
the last bytes, so a file that stops at a plausible point is not mistaken for a whole one:

- JPEG: the segments are walked by their lengths from the start (an EXIF thumbnail inside APP1, with its own
  end-of-image marker, is skipped as part of its segment) and the entropy-coded data after each start-of-scan is
  scanned to the next marker, until the image's own end-of-image marker. A multi-picture file (MPF: a second JPEG
  appended) must be whole too; other bytes after the end marker are a vendor trailer and do not matter.
- PNG: the chunks are walked by their lengths up to IEND.
- BMP: the file is as long as its header's file size (or, when that is 0, the pixel data offset plus the image
  size the info header gives).
- TIFF (classic, either byte order): every IFD, every entry's out-of-line value and every strip/tile (offset +
  byte count) lies within the file.
- WebP: the file is as long as the RIFF header's size.

Any other format (or a header too odd to judge) counts as whole: size stability and the decoder decide.
"""

from __future__ import annotations

import struct

_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"II*\0", b"MM\0*", b"RIFF")


def missing_part(data: bytes) -> str | None:
    """None when `data` looks like a whole image; else a short description of what is missing."""
    if 0 < len(data) < 16 and any(signature.startswith(data[:len(signature)]) for signature in _SIGNATURES):
        return f"{len(data)} bytes: too short for the image its first bytes begin"
    if data[:3] == b"\xff\xd8\xff":
        return _jpeg(data)
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return _png(data)
    if data[:2] == b"BM" and len(data) >= 14:
        return _bmp(data)
    if data[:4] in (b"II*\0", b"MM\0*"):
        return _tiff(data)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        size = struct.unpack_from("<I", data, 4)[0] + 8
        return None if len(data) >= size else f"WebP: {len(data)} of the {size} bytes its RIFF header declares"
    return None


def looks_complete(data: bytes) -> bool:
    return missing_part(data) is None


def _jpeg(data: bytes) -> str | None:
    end = _jpeg_end(data, 0)
    while isinstance(end, int):
        rest = data[end:].lstrip(b"\0")
        if not rest.startswith(b"\xff\xd8\xff"):  # nothing more, padding, or a vendor trailer
            return None
        end = _jpeg_end(data, len(data) - len(rest))  # a further picture (MPF): must be whole too
    return end


def _jpeg_end(data: bytes, start: int) -> int | str:
    """The offset just after the end-of-image marker of the JPEG starting at `start`, or what is missing."""
    n = len(data)
    i = start + 2
    while True:
        if i >= n:
            return "JPEG: the file ends before its end-of-image marker"
        if data[i] != 0xFF:
            return i  # not a marker where one belongs: malformed, the decoder decides
        while i < n and data[i] == 0xFF:  # fill bytes
            i += 1
        if i >= n:
            return "JPEG: the file ends inside a marker"
        marker = data[i]
        i += 1
        if marker == 0xD9:
            return i
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # no length
            continue
        if i + 2 > n:
            return "JPEG: the file ends inside a segment header"
        length = int.from_bytes(data[i:i + 2], "big")
        if length < 2:
            return i  # malformed: the decoder decides
        if i + length > n:
            return f"JPEG: segment 0xFF{marker:02X} needs {i + length - n} more bytes"
        i += length
        if marker == 0xDA:  # start of scan: entropy-coded data up to the next real marker
            while True:
                j = data.find(b"\xff", i)
                if j < 0 or j + 1 >= n:
                    return "JPEG: the file ends inside the image data, before its end-of-image marker"
                following = data[j + 1]
                if following == 0x00 or 0xD0 <= following <= 0xD7:  # stuffed byte, restart marker
                    i = j + 2
                elif following == 0xFF:  # fill: the marker starts later
                    i = j + 1
                else:
                    i = j
                    break


def _png(data: bytes) -> str | None:
    n = len(data)
    i = 8
    while True:
        if i + 8 > n:
            return "PNG: the file ends before its IEND chunk"
        length = struct.unpack_from(">I", data, i)[0]
        kind = data[i + 4:i + 8]
        i += 12 + length
        if i > n:
            return f"PNG: chunk {kind.decode('latin-1')!r} needs {i - n} more bytes"
        if kind == b"IEND":
            return None


def _bmp(data: bytes) -> str | None:
    size = struct.unpack_from("<I", data, 2)[0]
    if size == 0 and len(data) >= 38:
        offset = struct.unpack_from("<I", data, 10)[0]
        image_size = struct.unpack_from("<I", data, 34)[0]
        if image_size == 0:  # BI_RGB may leave it 0: rows of width * bits, padded to 4 bytes
            width, height = struct.unpack_from("<ii", data, 18)
            bits = struct.unpack_from("<H", data, 28)[0]
            image_size = ((width * bits + 31) // 32) * 4 * abs(height)
        size = offset + image_size
    return None if len(data) >= size else f"BMP: {len(data)} of the {size} bytes its header declares"


_TIFF_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4}
_OFFSET_TAGS = {273: 279, 324: 325}  # StripOffsets -> StripByteCounts, TileOffsets -> TileByteCounts


def _tiff(data: bytes) -> str | None:
    order = "<" if data[:2] == b"II" else ">"
    n = len(data)
    if n < 8:
        return "TIFF: the file ends inside its header"
    ifd = struct.unpack_from(order + "I", data, 4)[0]
    seen: set[int] = set()
    while ifd and ifd not in seen and len(seen) < 10_000:
        seen.add(ifd)
        if ifd + 2 > n:
            return f"TIFF: an IFD at {ifd} lies beyond the file's {n} bytes"
        count = struct.unpack_from(order + "H", data, ifd)[0]
        end = ifd + 2 + 12 * count + 4
        if end > n:
            return f"TIFF: an IFD at {ifd} needs {end - n} more bytes"
        values: dict[int, list[int]] = {}
        for k in range(count):
            entry = ifd + 2 + 12 * k
            tag, kind, number = struct.unpack_from(order + "HHI", data, entry)
            size = _TIFF_TYPE_SIZES.get(kind, 1) * number
            where = entry + 8 if size <= 4 else struct.unpack_from(order + "I", data, entry + 8)[0]
            if where + size > n:
                return f"TIFF: tag {tag}'s value needs {where + size - n} more bytes"
            if (tag in _OFFSET_TAGS or tag in _OFFSET_TAGS.values()) and kind in (3, 4):
                fmt = order + ("H" if kind == 3 else "I") * number
                values[tag] = list(struct.unpack_from(fmt, data, where))
        for offsets_tag, counts_tag in _OFFSET_TAGS.items():
            for offset, length in zip(values.get(offsets_tag, []), values.get(counts_tag, []), strict=False):
                if offset + length > n:
                    return f"TIFF: image data at {offset} needs {offset + length - n} more bytes"
        ifd = struct.unpack_from(order + "I", data, end - 4)[0]
    return None
