"""Taskonomy's label encodings: raw file values -> physical units -> training targets.

Three representations of a label appear in this package:

* **raw**: the integers stored in the Taskonomy file (what the readers return);
* **physical**: metres, unit vectors, class ids, shading in [0, 1] (``*_physical``), which
  ``pipelines.shard inspect`` and the metrics report;
* **target**: what the network regresses, normalised as in the Taskonomy task-grouping code
  that MulT's recipe follows (``*_target``); the per-task losses are reported in these units.

Every function takes numpy arrays in file layout (``[H, W]`` or ``[H, W, 3]``). The task table
(:mod:`mult.tasks`) says which function belongs to which task.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

DEPTH_UNITS_PER_METRE = 512.0
DEPTH_MISSING = 64500  # raw values at or above this are "no surface" (65535 in the files)
DEPTH_TARGET_MAX_RAW = 8192  # the task-grouping code only trains on raw < 8192 (16 m)
NORMAL_HOLE = 128
NUM_SEMANTIC_CLASSES = 18  # 0 uncertain (ignored), 1 background, 2-17 objects
# Taskonomy's segment_semantic label space (COCO object classes found indoors).
SEMANTIC_CLASSES: tuple[str, ...] = (
    "uncertain", "background", "bottle", "chair", "couch", "potted_plant", "bed", "dining_table",
    "toilet", "tv", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase",
)

Target = tuple[np.ndarray, np.ndarray]  # (target, valid)


def gray(raw: np.ndarray) -> np.ndarray:
    """Older Taskonomy files store some gray domains as RGB with R=G=B; take one channel."""
    return raw[..., 0] if raw.ndim == 3 else raw


def channels_first(raw: np.ndarray) -> np.ndarray:
    """``[H, W, C]`` -> a new contiguous ``float32 [C, H, W]`` (one strided copy; arithmetic on
    the transposed view instead would run ~6x slower)."""
    out = np.empty((raw.shape[2], *raw.shape[:2]), dtype=np.float32)
    out[...] = raw.transpose(2, 0, 1)
    return out


def channel_mean(raw: np.ndarray) -> np.ndarray:
    """Mean over the last axis of ``[H, W, C]`` integers as float32, summing channel by channel
    (exact for 8/16-bit values; ~8x faster than ``mean(axis=-1)`` over a short axis)."""
    total = raw[..., 0].astype(np.float32)
    for c in range(1, raw.shape[-1]):
        total += raw[..., c]
    total /= np.float32(raw.shape[-1])
    return total


def all_valid(raw: np.ndarray) -> np.ndarray:
    return np.ones(raw.shape[:2], dtype=bool)


# depth_zbuffer -------------------------------------------------------------------------------
def depth_valid(raw: np.ndarray) -> np.ndarray:
    return raw < DEPTH_MISSING


def depth_physical(raw: np.ndarray) -> np.ndarray:
    """Raw z-buffer -> metres; missing pixels become NaN."""
    metres = raw.astype(np.float32) / DEPTH_UNITS_PER_METRE
    metres[~depth_valid(raw)] = np.nan
    return metres


def depth_target(raw: np.ndarray) -> Target:
    valid = raw < DEPTH_TARGET_MAX_RAW
    target = (raw.astype(np.float32) - 1500.0) / 1000.0
    return target[None], valid


def depth_from_target(target: np.ndarray) -> np.ndarray:
    """Target units -> metres (used to report metrics in metres)."""
    return (target * 1000.0 + 1500.0) / DEPTH_UNITS_PER_METRE


# normal ---------------------------------------------------------------------------------------
def normal_valid(raw: np.ndarray) -> np.ndarray:
    # Per-channel compares: ~10x faster than np.all(..., axis=-1) over a length-3 axis.
    return ~((raw[..., 0] == NORMAL_HOLE) & (raw[..., 1] == NORMAL_HOLE) & (raw[..., 2] == NORMAL_HOLE))


def normal_physical(raw: np.ndarray) -> np.ndarray:
    """8-bit RGB -> unit vectors in the camera frame (x right, y down, z forward)."""
    vec = raw.astype(np.float32) / 255.0 * 2.0 - 1.0
    norm = np.linalg.norm(vec, axis=-1, keepdims=True)
    vec = vec / np.maximum(norm, 1e-6)
    vec[~normal_valid(raw)] = np.nan
    return vec


def normal_target(raw: np.ndarray) -> Target:
    target = channels_first(raw)
    target /= np.float32(255.0)
    target *= np.float32(2.0)
    target -= np.float32(1.0)
    return target, normal_valid(raw)


# segment_semantic ------------------------------------------------------------------------------
def segment_physical(raw: np.ndarray) -> np.ndarray:
    return gray(raw).astype(np.int64)


def segment_valid(raw: np.ndarray) -> np.ndarray:
    return gray(raw) != 0


def segment_target(raw: np.ndarray) -> Target:
    labels = gray(raw).astype(np.int64)
    if labels.max(initial=0) >= NUM_SEMANTIC_CLASSES:
        raise ValueError(
            f"segment_semantic label {int(labels.max())} outside 0..{NUM_SEMANTIC_CLASSES - 1}"
        )
    return labels, labels != 0


# affine 16-bit / 8-bit responses (keypoints2d, edge_texture, reshading) -----------------------
def affine_target(offset: float, scale: float, mean_rgb: bool = False) -> Callable[[np.ndarray], Target]:
    """``(value - offset) / scale`` of the gray value (or, ``mean_rgb``, of the channel mean
    in [0, 1]); every pixel valid."""

    def target(raw: np.ndarray) -> Target:
        if mean_rgb:
            values = channel_mean(raw) if raw.ndim == 3 else raw.astype(np.float32)
            values /= np.float32(255.0)
        else:
            values = gray(raw).astype(np.float32)
        values -= np.float32(offset)
        values /= np.float32(scale)
        return values[None], np.ones(values.shape, dtype=bool)

    return target


def response_physical(raw: np.ndarray) -> np.ndarray:
    """Keypoint and edge responses carry no unit: the raw value as float."""
    return gray(raw).astype(np.float32)


def reshading_physical(raw: np.ndarray) -> np.ndarray:
    values = channel_mean(raw) if raw.ndim == 3 else raw.astype(np.float32)
    values /= np.float32(255.0)
    return values
