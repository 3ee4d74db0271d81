"""Per-task resizing, flipping and normalisation, driven by the task table.

* Labels and masked geometry (``TaskSpec.resize == "nearest"``: segmentation, depth, normals)
  are resized by nearest sampling, and their valid mask with them, so no hole or label is ever
  blended into a neighbour.
* Smooth regression targets (``"bilinear"``) are resized by area averaging when shrinking and
  bilinear interpolation when enlarging. Where some pixels are invalid, the average is taken
  over valid pixels only (normalised convolution), so invalid values never leak in.
* A horizontal flip mirrors every map and negates ``TaskSpec.hflip_negate_channel`` (normals'
  x component).

Arrays follow file layout (``[H, W]``, ``[H, W, C]``) for raw data and network layout
(``[C, H, W]`` or ``[H, W]`` class ids) for targets.
"""

from __future__ import annotations

import numpy as np

from mult.encodings import channels_first
from mult.tasks import INPUT_DOMAIN, MASK_DOMAIN, TASKS

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def _nearest_index(src: int, dst: int) -> np.ndarray:
    """Source index of each destination pixel centre (the same rule for targets and masks)."""
    return np.minimum(((np.arange(dst) + 0.5) * src / dst).astype(np.int64), src - 1)


def resize_nearest(array: np.ndarray, size: int, *, channels_first: bool = False) -> np.ndarray:
    """Nearest sampling of ``[H, W]``, ``[H, W, C]`` (or ``[C, H, W]``) to ``size x size``; any dtype."""
    h_axis = 1 if channels_first else 0
    h, w = array.shape[h_axis], array.shape[h_axis + 1]
    if (h, w) == (size, size):
        return array
    rows, cols = _nearest_index(h, size), _nearest_index(w, size)
    if channels_first:
        return array[:, rows][:, :, cols]
    return array[rows][:, cols]


def _smooth(image: np.ndarray, size: int) -> np.ndarray:
    """cv2 resize of ``[H, W]`` or ``[H, W, C<=4]`` float32: area when shrinking, bilinear else."""
    import cv2  # imported here so that mult.experiments.viz (drawing, no resizing) does not need OpenCV

    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image
    interp = cv2.INTER_AREA if size < min(h, w) else cv2.INTER_LINEAR
    out = cv2.resize(image, (size, size), interpolation=interp)
    return out.reshape(size, size, *image.shape[2:])


def resize_smooth_masked(values: np.ndarray, valid: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Smooth resize of ``values`` ``float32 [H, W]`` or ``[H, W, C]`` over ``valid`` pixels only.

    Returns ``(values [S, S(, C)], valid [S, S])``; the new mask is the nearest-resized mask
    restricted to pixels with some valid support.
    """
    values = values.astype(np.float32, copy=False)
    if valid.all():
        return _smooth(values, size), np.ones((size, size), dtype=bool)
    weight = valid.astype(np.float32)
    w_expanded = weight[..., None] if values.ndim == 3 else weight
    num = _smooth(values * w_expanded, size)
    den = _smooth(weight, size)
    support = den > 1e-6
    den_safe = np.where(support, den, 1.0)
    out = num / (den_safe[..., None] if values.ndim == 3 else den_safe)
    return out, resize_nearest(valid, size) & support


def resize_target(target: np.ndarray, valid: np.ndarray, size: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Resize a task target (``[C, H, W]`` float or ``[H, W]`` class ids) and its ``[H, W]`` mask."""
    if mode == "nearest":
        return (resize_nearest(target, size, channels_first=target.ndim == 3),
                resize_nearest(valid, size))
    if mode != "bilinear":
        raise ValueError(f"unknown resize mode {mode!r}; valid modes: nearest, bilinear")
    if target.ndim != 3:
        raise ValueError(f"bilinear resize needs a [C, H, W] float target, got shape {target.shape}")
    out, out_valid = resize_smooth_masked(target.transpose(1, 2, 0), valid, size)
    out = out.reshape(size, size, -1).transpose(2, 0, 1)
    return np.ascontiguousarray(out), out_valid


def resize_rgb(rgb: np.ndarray, size: int) -> np.ndarray:
    """``uint8 [H, W, 3]`` -> ``uint8 [S, S, 3]`` (area when shrinking, bilinear when enlarging)."""
    import cv2

    if rgb.shape[:2] == (size, size):
        return rgb
    interp = cv2.INTER_AREA if size < min(rgb.shape[:2]) else cv2.INTER_LINEAR
    return cv2.resize(rgb, (size, size), interpolation=interp)


def normalize_rgb(rgb: np.ndarray) -> np.ndarray:
    """``uint8 [H, W, 3]`` -> ImageNet-normalised ``float32 [3, H, W]``."""
    # In place after one copy: the same float32 operations as (x / 255 - mean) / std on [H, W, 3].
    x = channels_first(rgb)
    x *= np.float32(1.0 / 255.0)
    x -= IMAGENET_MEAN[:, None, None]
    x /= IMAGENET_STD[:, None, None]
    return x


def hflip_target(target: np.ndarray, task: str) -> np.ndarray:
    """Mirror a target (``[C, H, W]`` or ``[H, W]``); negates the task's flip channel (normals' x)."""
    out = target[..., ::-1].copy()
    channel = TASKS[task].hflip_negate_channel
    if channel is not None:
        out[channel] = -out[channel]
    return out


def resize_raw(domain: str, raw: np.ndarray, size: int, mask: np.ndarray | None = None) -> np.ndarray:
    """Resize one raw array (Taskonomy encoding, file layout) to ``size x size``, keeping its dtype.

    Used to write train-resolution shards: ``rgb`` smooth, ``mask_valid`` nearest, each task by
    its ``TaskSpec.resize``. Smooth integer maps are averaged over the pixels that are valid
    for the task (``raw_valid``) and inside ``mask`` (the view's ``mask_valid``, when it has
    one): the same pixels the loader averages when it resizes targets itself, so both routes
    give the same targets up to rounding. They are rounded back to their integer type; a pixel
    with no valid support keeps its nearest value (and is invalid after resizing anyway).
    """
    if domain == INPUT_DOMAIN:
        return resize_rgb(raw, size)
    if domain == MASK_DOMAIN or TASKS[domain].resize == "nearest":
        return resize_nearest(raw, size)
    spec = TASKS[domain]
    valid = spec.raw_valid(raw) if mask is None else spec.raw_valid(raw) & mask
    smooth, support = resize_smooth_masked(raw.astype(np.float32), valid, size)
    info = np.iinfo(raw.dtype)
    out = np.clip(np.rint(smooth), info.min, info.max).astype(raw.dtype)
    if not support.all():
        nearest = resize_nearest(raw, size)
        out[~support] = nearest[~support]
    return out
