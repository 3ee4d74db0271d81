"""Exact PNG decoding: 16-bit values survive, every bad input raises an error naming the file."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from mult.data.png import CorruptFileError, decode_png, encode_png, encode_png_for_reading, read_png

EXTREMES16 = np.array([[0, 1, 255, 256], [512, 8191, 65534, 65535]], np.uint16)


def _pil_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_uint16_roundtrip_is_exact() -> None:
    out = decode_png(encode_png(EXTREMES16))
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, EXTREMES16)


def test_uint16_written_by_opencv_is_exact() -> None:
    # An independent encoder (OpenCV, big-endian samples as the PNG spec says).
    ok, data = cv2.imencode(".png", EXTREMES16)
    assert ok
    np.testing.assert_array_equal(decode_png(data.tobytes()), EXTREMES16)


def test_uint16_rgb_is_exact_not_squashed() -> None:
    # Pillow opens 48-bit PNGs as 8-bit RGB; decode_png must keep the 16-bit values.
    rgb = np.stack([EXTREMES16, EXTREMES16[::-1], np.full_like(EXTREMES16, 4097)], axis=-1)
    ok, data = cv2.imencode(".png", rgb[..., ::-1].copy())  # OpenCV takes BGR
    assert ok
    out = decode_png(data.tobytes())
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, rgb)


def test_uint16_rgba_is_exact() -> None:
    rgba = np.stack([EXTREMES16, EXTREMES16, EXTREMES16, np.full_like(EXTREMES16, 65535)], axis=-1)
    ok, data = cv2.imencode(".png", rgba)
    assert ok
    out = decode_png(data.tobytes())
    assert out.shape == (2, 4, 4)
    np.testing.assert_array_equal(out, rgba)


@pytest.mark.parametrize("shape", [(3, 5), (3, 5, 3)])
def test_uint8_roundtrip(shape: tuple[int, ...]) -> None:
    arr = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    out = decode_png(encode_png(arr))
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, arr)


def test_palette_indices_and_expansion() -> None:
    idx = np.array([[0, 1], [2, 1]], np.uint8)
    pal = np.zeros((256, 3), np.uint8)
    pal[1] = (10, 20, 30)
    pal[2] = (200, 100, 50)
    data = encode_png(idx, palette=pal)
    np.testing.assert_array_equal(decode_png(data, palette=True), idx)
    np.testing.assert_array_equal(decode_png(data), pal[idx])


def test_rgba_la_and_bilevel_modes() -> None:
    rgba = np.random.default_rng(1).integers(0, 256, size=(2, 3, 4), dtype=np.uint8)
    np.testing.assert_array_equal(decode_png(_pil_png(Image.fromarray(rgba, "RGBA"))), rgba)
    la = Image.fromarray(np.array([[7, 9]], np.uint8), "L").convert("LA")
    np.testing.assert_array_equal(decode_png(_pil_png(la)), [[7, 9]])
    bilevel = Image.fromarray(np.array([[0, 255]], np.uint8), "L").convert("1")
    np.testing.assert_array_equal(decode_png(_pil_png(bilevel)), [[0, 255]])


def test_bad_signature_names_the_file() -> None:
    with pytest.raises(CorruptFileError, match="view-1.depth"):
        decode_png(b"GIF89a....", "view-1.depth")


def test_truncated_png_names_the_file() -> None:
    data = encode_png(EXTREMES16)
    with pytest.raises(CorruptFileError, match="cut.png"):
        decode_png(data[: len(data) // 2], "cut.png")


def test_truncated_wide_colour_png_names_the_file() -> None:
    ok, data = cv2.imencode(".png", np.zeros((8, 8, 3), np.uint16))
    with pytest.raises(CorruptFileError, match="wide.png"):
        decode_png(data.tobytes()[:60], "wide.png")


def test_corrupt_pixel_data_names_the_file() -> None:
    data = bytearray(encode_png(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)))
    start = data.index(b"IDAT") + 8
    data[start : start + 40] = b"\xff" * 40
    with pytest.raises(CorruptFileError, match="garbled.png"):
        decode_png(bytes(data), "garbled.png")


def test_encode_refuses_unsupported_arrays() -> None:
    with pytest.raises(ValueError, match="float32"):
        encode_png(np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match="uint16"):
        encode_png(np.zeros((2, 2, 3), np.uint16))


@pytest.mark.parametrize("shape,dtype", [((37, 29), np.uint8), ((37, 29, 3), np.uint8), ((37, 29), np.uint16)])
def test_encode_for_reading_is_exact_and_readable_by_pillow(shape, dtype) -> None:
    arr = np.random.default_rng(1).integers(0, np.iinfo(dtype).max + 1, size=shape, dtype=dtype)
    arr[0] = 0
    arr[-1] = np.iinfo(dtype).max
    data = encode_png_for_reading(arr)
    out = decode_png(data)
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, arr)
    with Image.open(io.BytesIO(data)) as img:  # a standard PNG, channel order included
        np.testing.assert_array_equal(np.asarray(img).astype(dtype), arr)


def test_encode_for_reading_refuses_unsupported_arrays() -> None:
    for bad in (np.zeros((2, 2), np.float32), np.zeros((2, 2, 3), np.uint16), np.zeros((2, 2, 4), np.uint8)):
        with pytest.raises(ValueError, match="cannot encode"):
            encode_png_for_reading(bad)


def test_read_png_names_the_path(tmp_path) -> None:
    good = tmp_path / "good.png"
    good.write_bytes(encode_png(EXTREMES16))
    np.testing.assert_array_equal(read_png(good), EXTREMES16)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nrubbish")
    with pytest.raises(CorruptFileError, match="bad.png"):
        read_png(bad)
