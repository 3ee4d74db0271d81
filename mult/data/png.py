"""Exact PNG decoding.

webdataset's and torchvision's default decoders squash 16-bit PNGs to 8 bits (or wrap 65535),
so every reader in this package decodes through here: 8-bit files come back as ``uint8``,
16-bit files as ``uint16`` with their exact integer values, palette files as their indices.
"""

from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
from PIL import Image, UnidentifiedImageError

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class CorruptFileError(ValueError):
    """A file could not be decoded. The message names the file."""


def decode_png(data: bytes, name: str = "<bytes>", *, palette: bool = False) -> np.ndarray:
    """Decode PNG bytes to their exact stored values.

    Returns ``[H, W]`` for gray images and ``[H, W, C]`` (RGB order) for colour ones; dtype is
    ``uint8`` or ``uint16`` following the file's bit depth. A palette image is expanded to RGB
    unless ``palette=True``, which returns the ``[H, W]`` indices.
    Raises :class:`CorruptFileError` naming ``name`` when the bytes are not a complete PNG.
    """
    if not data.startswith(_PNG_SIGNATURE):
        raise CorruptFileError(f"{name}: not a PNG file (bad signature)")
    if len(data) >= 26 and data[12:16] == b"IHDR":
        bit_depth, colour_type = data[24], data[25]
        # Palette files and sub-byte depths go to Pillow; 16-bit RGB(A) must not (Pillow squashes
        # them to 8 bits) and 16-bit gray+alpha neither; 8-bit gray+alpha is Pillow's "LA".
        if (bit_depth == 16 and colour_type in (0, 2, 4, 6)) or (bit_depth == 8 and colour_type in (0, 2, 6)):
            return _decode_cv2(data, name, bit_depth, colour_type)
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return _to_array(img, palette)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, zlib.error) as exc:
        raise CorruptFileError(f"{name}: corrupt PNG ({exc})") from exc


# ---------------------------------------------------------------------------------------------
def check_png(data: bytes, name: str = "<bytes>") -> None:
    """Structural check of a PNG without decoding pixels: signature, every chunk's length and
    CRC, IHDR first, IEND last. Catches truncation and bit rot at about memory speed.
    Raises :class:`CorruptFileError` naming ``name``."""
    if not data.startswith(_PNG_SIGNATURE):
        raise CorruptFileError(f"{name}: not a PNG file (bad signature)")
    pos, first, n = len(_PNG_SIGNATURE), True, len(data)
    view = memoryview(data)
    while True:
        if pos + 12 > n:
            raise CorruptFileError(f"{name}: truncated PNG (no IEND chunk)")
        length, ctype = struct.unpack(">I4s", view[pos:pos + 8])
        end = pos + 12 + length
        if end > n:
            raise CorruptFileError(f"{name}: truncated PNG (chunk {ctype!r} runs past the end)")
        crc = struct.unpack(">I", view[end - 4:end])[0]
        if zlib.crc32(view[pos + 4:end - 4]) != crc:
            raise CorruptFileError(f"{name}: corrupt PNG (bad CRC in chunk {ctype!r})")
        if first and ctype != b"IHDR":
            raise CorruptFileError(f"{name}: corrupt PNG (first chunk is {ctype!r}, not IHDR)")
        first = False
        pos = end
        if ctype == b"IEND":
            return


def _decode_cv2(data: bytes, name: str, bit_depth: int, colour_type: int) -> np.ndarray:
    """8/16-bit gray, gray+alpha, RGB and RGBA files through OpenCV's libpng: exact values, and
    about 1.3x faster than Pillow on the shard loader's hot path (see BENCHMARKS.md).

    Returns ``[H, W]`` for gray and gray+alpha (the gray channel, as Pillow's ``LA`` path does),
    ``[H, W, 3]`` RGB or ``[H, W, 4]`` RGBA, in the file's bit depth.
    """
    cv2 = _cv2()
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    expected = np.uint16 if bit_depth == 16 else np.uint8
    if arr is None or arr.dtype != expected:
        raise CorruptFileError(f"{name}: corrupt {bit_depth}-bit PNG (libpng could not decode it)")
    if colour_type == 4:
        return np.ascontiguousarray(arr[..., 0] if arr.ndim == 3 else arr)
    if colour_type == 0:
        if arr.ndim != 2:
            raise CorruptFileError(f"{name}: gray PNG decoded to shape {arr.shape}")
        return arr
    if arr.ndim != 3:
        raise CorruptFileError(f"{name}: colour PNG decoded to shape {arr.shape}")
    code = cv2.COLOR_BGRA2RGBA if arr.shape[2] == 4 else cv2.COLOR_BGR2RGB
    return cv2.cvtColor(arr, code)


_CV2 = None


def _cv2():
    global _CV2
    if _CV2 is None:
        import cv2

        cv2.setNumThreads(1)  # loader workers are the parallelism; no nested thread pools
        _CV2 = cv2
    return _CV2


def _to_array(img: Image.Image, palette: bool) -> np.ndarray:
    mode = img.mode
    if mode == "P":
        if palette:
            return np.asarray(img, dtype=np.uint8)
        return np.asarray(img.convert("RGB"), dtype=np.uint8)
    if mode in ("I;16", "I;16B", "I;16L"):
        return np.asarray(img, dtype=np.uint16).copy()
    if mode == "I":
        # Pillow opens some 16-bit gray files as 32-bit "I"; the values are still 0..65535.
        arr = np.asarray(img, dtype=np.int32)
        return arr.astype(np.uint16)
    if mode in ("L", "RGB", "RGBA"):
        return np.asarray(img, dtype=np.uint8).copy()
    if mode == "LA":
        return np.asarray(img.getchannel(0), dtype=np.uint8).copy()
    if mode == "1":
        return (np.asarray(img, dtype=np.uint8) * 255).astype(np.uint8)
    raise CorruptFileError(f"unsupported PNG mode {mode!r}")


def encode_png_for_reading(array: np.ndarray) -> bytes:
    """Encode ``uint8``/``uint16`` gray ``[H, W]`` or ``uint8`` RGB ``[H, W, 3]`` losslessly for
    data written once and decoded every epoch (the members of ``--resize`` shards).

    zlib level 6 with every row "Up"-filtered: measured on 256 px Taskonomy-format views, about
    15% smaller and 1.5x faster to decode than :func:`encode_png`'s level 1 with adaptive filters,
    for 2.5x the encoding time (BENCHMARKS.md, Loader). Exact: any PNG decoder reads the values back.
    """
    cv2 = _cv2()
    array = np.ascontiguousarray(array)
    if array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)  # OpenCV writes BGR order
    elif not ((array.dtype == np.uint8 or array.dtype == np.uint16) and array.ndim == 2):
        raise ValueError(f"cannot encode array of dtype {array.dtype} and shape {array.shape} as PNG")
    params = [cv2.IMWRITE_PNG_COMPRESSION, 6]
    if hasattr(cv2, "IMWRITE_PNG_FILTER"):  # older OpenCV builds: libpng's adaptive filters
        params += [cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_UP]
    ok, buf = cv2.imencode(".png", array, params)
    if not ok:
        raise ValueError(f"OpenCV could not encode an array of dtype {array.dtype} and shape {array.shape}")
    return buf.tobytes()


def read_png(path: str | os.PathLike, *, palette: bool = False) -> np.ndarray:
    """Read and decode one PNG file exactly (see :func:`decode_png`)."""
    with open(path, "rb") as fh:
        data = fh.read()
    return decode_png(data, str(path), palette=palette)


def encode_png(array: np.ndarray, *, palette: np.ndarray | None = None) -> bytes:
    """Encode ``uint8``/``uint16`` gray ``[H, W]`` or ``uint8`` RGB ``[H, W, 3]`` losslessly.

    With ``palette`` (``[256, 3]`` uint8), ``array`` holds indices and a palette PNG is written.
    """
    array = np.ascontiguousarray(array)
    if palette is not None:
        img = Image.fromarray(array.astype(np.uint8), mode="P")
        img.putpalette(np.asarray(palette, dtype=np.uint8).reshape(-1).tolist())
    elif array.dtype == np.uint16 and array.ndim == 2:
        # Pillow 13 refuses mode="I;16" here; a little-endian uint16 array gets "I;16" by itself.
        img = Image.fromarray(array.astype("<u2", copy=False))
    elif array.dtype == np.uint8 and array.ndim in (2, 3):
        img = Image.fromarray(array)
    else:
        raise ValueError(f"cannot encode array of dtype {array.dtype} and shape {array.shape} as PNG")
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
