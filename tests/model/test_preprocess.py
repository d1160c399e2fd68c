"""Decoding: the OpenCV JPEG path gives PIL's pixels exactly, and bad JPEGs still get a clear error."""

from __future__ import annotations

import io
import random
import struct

import cv2
import numpy as np
import pytest
from PIL import Image

from model.preprocess import ImageDecodeError, _decode_jpeg, decode_image


def test_jpeg_fast_path_gives_pil_pixels(samples_dir):
    jpegs = sorted(p for p in samples_dir.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    assert jpegs, "the inspection samples hold no JPEG"
    for path in random.Random(0).sample(jpegs, min(40, len(jpegs))):
        data = path.read_bytes()
        assert _decode_jpeg(data, path.name) is not None, f"{path} took the PIL path"
        assert np.array_equal(decode_image(data, path.name), np.asarray(Image.open(path).convert("RGB"))), path


@pytest.mark.parametrize("subsampling", [0, 1, 2])
def test_gray_and_colour_jpegs_match_pil(subsampling):
    rng = np.random.default_rng(subsampling)
    rgb = cv2.GaussianBlur((rng.random((61, 83, 3)) * 255).astype(np.uint8), (5, 5), 0)
    for image in (Image.fromarray(rgb), Image.fromarray(rgb[:, :, 0])):
        encoded = io.BytesIO()
        image.save(encoded, "JPEG", quality=85, subsampling=subsampling)
        data = encoded.getvalue()
        assert _decode_jpeg(data, "x") is not None
        assert np.array_equal(decode_image(data), np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


def _jpeg() -> bytes:
    _ok, encoded = cv2.imencode(".jpg", np.full((32, 40, 3), 128, np.uint8))
    return encoded.tobytes()


def test_truncated_jpeg_is_an_error_not_a_grey_image():
    data = _jpeg()
    with pytest.raises(ImageDecodeError, match=r"cam1\.jpg: not a readable image"):
        decode_image(data[: len(data) - 40], "cam1.jpg")


def test_absurd_jpeg_size_is_refused_before_decoding():
    data = bytearray(_jpeg())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", 60000, 60000)
    with pytest.raises(ImageDecodeError, match=r"huge\.jpg: image is 60000x60000, more than"):
        decode_image(bytes(data), "huge.jpg")


def test_cmyk_jpeg_goes_through_pil():
    encoded = io.BytesIO()
    Image.new("CMYK", (24, 16), (0, 128, 255, 10)).save(encoded, "JPEG")
    data = encoded.getvalue()
    assert _decode_jpeg(data, "x") is None
    assert decode_image(data).shape == (16, 24, 3)


def test_unknown_format_error_names_the_input_not_a_buffer():
    with pytest.raises(ImageDecodeError) as error:
        decode_image(b"not an image at all", "cam2/0001.jpg")
    assert str(error.value).startswith("cam2/0001.jpg: not a readable image") and "BytesIO" not in str(error.value)
