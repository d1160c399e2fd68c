"""Image decoding and the model's input transform.

Two transforms produce the model input (B,3,S,S), normalised with OpenAI CLIP's mean/std:
- `reference_transform`: the official PIL path (bicubic resize of the decoded image in its own mode, then RGB).
  This is the parity path.
- `fast_transform`: OpenCV's bicubic resize on an RGB uint8 array. Faster and usable off the main thread; it
  differs slightly from PIL (PIL antialiases when downscaling): see tests/model/test_preprocess.py for the size
  of that difference.

`decode_image` turns bytes or a file into an RGB uint8 array and raises `ImageDecodeError` naming the input for
anything unusable (empty, truncated, not an image, absurd size); 16-bit, grayscale and RGBA inputs are converted.
"""

from __future__ import annotations

import io
import struct
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_PIXELS = 100_000_000  # larger than any industrial camera; beyond it decoding is refused, not attempted
MIN_SIDE = 8
# The image files anomalyd reads from folders (datasets, few-shot references, calibration); the one list.
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class ImageDecodeError(ValueError):
    """An input that cannot be turned into an image; the message names the input and the reason."""


def _check_size(width: int, height: int, name: str, max_pixels: int | None = None) -> None:
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    if width < MIN_SIDE or height < MIN_SIDE:
        raise ImageDecodeError(f"{name}: image is {width}x{height}, smaller than {MIN_SIDE}x{MIN_SIDE}")
    if width * height > limit:
        raise ImageDecodeError(f"{name}: image is {width}x{height}, more than {limit} pixels")


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) as the encoded image's header declares it, read without decoding any pixel (JPEG's frame
    header, else PIL's lazy open, which reads only the header of PNG, TIFF, WebP, BMP, ...); None if unknown."""
    header = _jpeg_frame_header(data)
    if header is not None:
        return header[0], header[1]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # only the header is read here
            with Image.open(io.BytesIO(data)) as image:
                return image.size
    except Exception:  # not an image PIL knows: the decoder gives the clear error later
        return None


def _to_rgb8(array: np.ndarray, name: str) -> np.ndarray:
    """Any decoded array (gray, gray+alpha, RGB, RGBA; 8/16-bit or float) → contiguous RGB uint8 (H,W,3)."""
    if array.dtype == np.uint16:
        array = (array >> 8).astype(np.uint8)  # keep the top byte: the same as PIL's 16→8-bit reduction
    elif array.dtype in (np.float32, np.float64):
        finite = np.nan_to_num(array, nan=0.0, posinf=0.0, neginf=0.0)
        array = (np.clip(finite, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    elif array.dtype == np.int32:
        array = np.clip(array, 0, 255).astype(np.uint8)
    elif array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype != np.uint8:
        raise ImageDecodeError(f"{name}: unsupported pixel type {array.dtype}")
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    elif array.ndim == 3 and array.shape[2] in (1, 2):  # gray, gray + alpha
        array = np.repeat(array[:, :, :1], 3, axis=2)
    elif array.ndim == 3 and array.shape[2] == 4:  # RGBA: alpha dropped, as PIL's convert("RGB") does
        array = array[:, :, :3]
    elif not (array.ndim == 3 and array.shape[2] == 3):
        raise ImageDecodeError(f"{name}: unsupported channel layout {array.shape}")
    return np.ascontiguousarray(array)


def open_pil(source: str | Path | bytes, name: str | None = None, max_pixels: int | None = None) -> Image.Image:
    """Open and fully decode an image with PIL, raising ImageDecodeError on any problem. The pixel limit is
    checked on the header, before any pixel is decoded."""
    name = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    try:
        if isinstance(source, bytes):
            if not source:
                raise ImageDecodeError(f"{name}: empty input (0 bytes)")
            image = Image.open(io.BytesIO(source))
        else:
            path = Path(source)
            if not path.is_file():
                raise ImageDecodeError(f"{name}: no such file")
            if path.stat().st_size == 0:
                raise ImageDecodeError(f"{name}: empty file (0 bytes)")
            image = Image.open(path)
        _check_size(image.width, image.height, name, max_pixels)
        image.load()  # decode now: truncated files fail here rather than later
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"{name}: image too large ({exc})") from exc
    except Image.UnidentifiedImageError as exc:  # PIL's own message names a BytesIO object, not the input
        raise ImageDecodeError(f"{name}: not a readable image (no known image format, or a damaged header)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"{name}: not a readable image ({exc})") from exc
    return image


def pil_to_rgb8(image: Image.Image, name: str = "<image>") -> np.ndarray:
    """PIL image of any mode → RGB uint8 array."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        return _to_rgb8(np.asarray(image).astype(np.uint16) if image.mode != "I" else np.asarray(image), name)
    if image.mode == "F":
        return _to_rgb8(np.asarray(image) / 255.0, name)
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    return _to_rgb8(np.asarray(image), name)


def decode_image(source: str | Path | bytes, name: str | None = None, max_pixels: int | None = None) -> np.ndarray:
    """Decode a file or encoded bytes into an RGB uint8 array (H,W,3).

    Complete 8-bit gray/RGB JPEGs go through OpenCV's libjpeg-turbo, which gives PIL's pixels exactly (checked on
    every JPEG of the inspection samples) while releasing the GIL; everything else goes through PIL.
    """
    name = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    if isinstance(source, bytes):
        rgb = _decode_jpeg(source, name, max_pixels)
        if rgb is not None:
            return rgb
    image = open_pil(source, name, max_pixels)
    return pil_to_rgb8(image, name)


def _jpeg_frame_header(data: bytes) -> tuple[int, int, int, int] | None:
    """(width, height, bits per sample, components) from a JPEG's SOF segment, or None when not found."""
    if data[:3] != b"\xff\xd8\xff":
        return None
    index, end = 2, len(data)
    while index + 10 <= end:
        if data[index] != 0xFF:
            return None
        marker = data[index + 1]
        if marker == 0xFF:  # fill byte
            index += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            index += 2
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">HH", data[index + 5:index + 9])
            return width, height, data[index + 4], data[index + 9]
        if marker == 0xDA:  # scan data before any frame header: not a JPEG we understand
            return None
        index += 2 + int.from_bytes(data[index + 2:index + 4], "big")
    return None


def _decode_jpeg(data: bytes, name: str, max_pixels: int | None = None) -> np.ndarray | None:
    """An 8-bit gray or YCbCr JPEG decoded by libjpeg-turbo (simplejpeg, strict: damaged data raises
    ImageDecodeError naming libjpeg's warning), or None to leave it to PIL. Without simplejpeg: OpenCV for
    complete files, PIL for the rest (OpenCV would fill a truncated JPEG with grey)."""
    header = _jpeg_frame_header(data)
    if header is None or header[2] != 8 or header[3] not in (1, 3):
        return None
    if not data[-64:].rstrip(b"\0").endswith(b"\xff\xd9") and not _has_simplejpeg():
        return None  # no end-of-image marker: truncated; PIL says so
    width, height = header[:2]
    _check_size(width, height, name, max_pixels)
    try:
        import simplejpeg
    except ImportError:  # optional: without it, OpenCV below (which ignores libjpeg's corrupt-data warnings)
        simplejpeg = None
    if simplejpeg is not None:
        # libjpeg-turbo in strict mode: its warnings ("Corrupt JPEG data: premature end of data segment",
        # "N extraneous bytes before marker", a missing end of image) fail the frame instead of yielding grey or
        # shifted pixels that would be scored as real. Same pixels as OpenCV's decode, the GIL released.
        try:
            rgb = simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
        except ValueError as exc:
            raise ImageDecodeError(f"{name}: not a readable image (damaged JPEG: {exc})") from exc
        if rgb.shape[:2] != (height, width):
            raise ImageDecodeError(f"{name}: not a readable image (damaged JPEG: decoded "
                                   f"{rgb.shape[1]}x{rgb.shape[0]}, header says {width}x{height})")
        return rgb
    import cv2

    # IMREAD_COLOR_RGB (OpenCV >= 4.10) has libjpeg write RGB directly, saving a conversion pass.
    rgb_flag = getattr(cv2, "IMREAD_COLOR_RGB", None)
    flags = (cv2.IMREAD_COLOR if rgb_flag is None else rgb_flag) | cv2.IMREAD_IGNORE_ORIENTATION
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if pixels is None or pixels.shape[:2] != (height, width):
        return None
    return pixels if rgb_flag is not None else cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)


def _has_simplejpeg() -> bool:
    try:
        import simplejpeg  # noqa: F401
    except ImportError:
        return False
    return True


def _normalise(chw: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(OPENAI_MEAN, dtype=chw.dtype).view(3, 1, 1)
    std = torch.tensor(OPENAI_STD, dtype=chw.dtype).view(3, 1, 1)
    return (chw - mean) / std


def reference_resize(image: Image.Image, size: int) -> np.ndarray:
    """The official resize: PIL bicubic to size x size (no aspect kept) in the image's own mode, then RGB uint8."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        image = Image.fromarray(pil_to_rgb8(image))
    return np.asarray(image.resize((size, size), Image.Resampling.BICUBIC).convert("RGB"))


def reference_transform(image: Image.Image, size: int) -> torch.Tensor:
    """The official preprocessing: `reference_resize`, [0,1], normalise; (3,S,S) float32."""
    rgb = reference_resize(image, size).astype(np.float32) / 255.0
    return _normalise(torch.from_numpy(rgb).permute(2, 0, 1).contiguous())


def normalise_pixels(pixels: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """(B,S,S,3) uint8 RGB → (B,3,S,S) float32 model input, on the pixels' device, into `out` when given.

    The same arithmetic as `reference_transform` (x/255, minus mean, over std, in float32), so
    `normalise_pixels(reference_resize(...))` equals it bit for bit. The daemon ships uint8 frames to the model's
    device and normalises whole batches there: 4x less data to move than float input.
    """
    chw = pixels.permute(0, 3, 1, 2)
    if out is None:
        out = torch.empty(chw.shape, dtype=torch.float32, device=pixels.device)
    out.copy_(chw).div_(255.0)
    mean = torch.tensor(OPENAI_MEAN, dtype=torch.float32, device=out.device).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD, dtype=torch.float32, device=out.device).view(1, 3, 1, 1)
    return out.sub_(mean).div_(std)


# (x/255 - mean)/std as one multiply-subtract per channel plane: the fast path's normalisation, written straight
# into a CHW array (5x cheaper than permuting and normalising a tensor).
_FAST_SCALE = [1.0 / (255.0 * s) for s in OPENAI_STD]
_FAST_OFFSET = [m / s for m, s in zip(OPENAI_MEAN, OPENAI_STD, strict=True)]


def fast_resize(rgb: np.ndarray, size: int) -> np.ndarray:
    """OpenCV bicubic resize of an RGB uint8 array to size x size (area interpolation when shrinking a lot)."""
    import cv2

    height, width = rgb.shape[:2]
    interpolation = cv2.INTER_AREA if max(height, width) / size >= 2.0 else cv2.INTER_CUBIC
    return cv2.resize(rgb, (size, size), interpolation=interpolation)


def fast_transform(rgb: np.ndarray, size: int) -> torch.Tensor:
    """`fast_resize`, then normalise; (3,S,S) float32."""
    import cv2

    out = np.empty((3, size, size), dtype=np.float32)
    for channel, plane in enumerate(cv2.split(fast_resize(rgb, size))):
        np.multiply(plane, _FAST_SCALE[channel], out=out[channel], dtype=np.float32)
        out[channel] -= _FAST_OFFSET[channel]
    return torch.from_numpy(out)


def mask_transform(mask: Image.Image | np.ndarray, size: int) -> torch.Tensor:
    """The official mask transform: >0 → 255 (L mode), bilinear resize to size, to [0,1], threshold 0.5 → {0,1}."""
    array = np.asarray(mask.convert("L") if isinstance(mask, Image.Image) else mask)
    if array.ndim == 3:
        array = array.max(axis=2)
    binary = Image.fromarray((array > 0).astype(np.uint8) * 255, mode="L")
    resized = np.asarray(binary.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    return torch.from_numpy((resized > 0.5).astype(np.float32))


def load_reference(path: str | Path, size: int) -> torch.Tensor:
    """File → model input through the reference (PIL) path."""
    return reference_transform(open_pil(path), size)
