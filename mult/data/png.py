"""Exact PNG decoding.

webdataset's and torchvision's default decoders squash 16-bit PNGs to 8 bits (or wrap 65535),
so every reader in this package decodes through here: 8-bit files come back as ``uint8``,
16-bit files as ``uint16`` with their exact integer values, palette files as their indices.
"""

from __future__ import annotations

import io
import os
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
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return _to_array(img, palette)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, zlib.error) as exc:
        raise CorruptFileError(f"{name}: corrupt PNG ({exc})") from exc


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
        img = Image.fromarray(array, mode="I;16")
    elif array.dtype == np.uint8 and array.ndim in (2, 3):
        img = Image.fromarray(array)
    else:
        raise ValueError(f"cannot encode array of dtype {array.dtype} and shape {array.shape} as PNG")
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
