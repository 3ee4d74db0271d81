"""The task table: one :class:`TaskSpec` per task.

Everything that iterates over tasks (model heads, losses, metrics, the shard decoder, Tune's
search space, plots) reads this table, so adding a task is one entry here plus its functions.

Three representations of a label appear in this package:

* **raw**: the integers stored in the Taskonomy file (``decode_raw``);
* **physical**: metres, unit vectors, class ids, shading in [0, 1] (``to_physical``), which
  ``pipelines.shard inspect`` and the metrics report;
* **target**: what the network regresses, normalised as in the Taskonomy task-grouping code
  that MulT's recipe follows (``to_target``); the per-task losses are reported in these units.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from mult.data.png import decode_png

# --------------------------------------------------------------------------------------------
# Per-task functions. All take numpy arrays; shapes are [H, W] or [H, W, 3] (file layout).
# --------------------------------------------------------------------------------------------

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


def _gray(raw: np.ndarray) -> np.ndarray:
    """Older Taskonomy files store some gray domains as RGB with R=G=B; take one channel."""
    return raw[..., 0] if raw.ndim == 3 else raw


# depth_zbuffer -------------------------------------------------------------------------------
def depth_valid(raw: np.ndarray) -> np.ndarray:
    return raw < DEPTH_MISSING


def depth_physical(raw: np.ndarray) -> np.ndarray:
    """Raw z-buffer -> metres; missing pixels become NaN."""
    metres = raw.astype(np.float32) / DEPTH_UNITS_PER_METRE
    metres[~depth_valid(raw)] = np.nan
    return metres


def depth_target(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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


def channels_first(raw: np.ndarray) -> np.ndarray:
    """``[H, W, C]`` -> a new contiguous ``float32 [C, H, W]`` (one strided copy; arithmetic on
    the transposed view instead would run ~6x slower)."""
    out = np.empty((raw.shape[2], *raw.shape[:2]), dtype=np.float32)
    out[...] = raw.transpose(2, 0, 1)
    return out


def normal_target(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    target = channels_first(raw)
    target /= np.float32(255.0)
    target *= np.float32(2.0)
    target -= np.float32(1.0)
    return target, normal_valid(raw)


# segment_semantic ------------------------------------------------------------------------------
def segment_physical(raw: np.ndarray) -> np.ndarray:
    return _gray(raw).astype(np.int64)


def segment_valid(raw: np.ndarray) -> np.ndarray:
    return _gray(raw) != 0


def segment_target(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = _gray(raw).astype(np.int64)
    if labels.max(initial=0) >= NUM_SEMANTIC_CLASSES:
        raise ValueError(
            f"segment_semantic label {int(labels.max())} outside 0..{NUM_SEMANTIC_CLASSES - 1}"
        )
    return labels, labels != 0


# affine 16-bit / 8-bit regression targets ----------------------------------------------------
def _affine(offset: float, scale: float, mean_rgb: bool = False):
    def target(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if mean_rgb:
            values = _channel_mean(raw) if raw.ndim == 3 else raw.astype(np.float32)
            values /= np.float32(255.0)
        else:
            values = _gray(raw).astype(np.float32)
        values -= np.float32(offset)
        values /= np.float32(scale)
        return values[None], np.ones(values.shape, dtype=bool)

    return target


def _channel_mean(raw: np.ndarray) -> np.ndarray:
    """Mean over the last axis of ``[H, W, C]`` integers as float32, summing channel by channel
    (exact for 8/16-bit values; ~8x faster than ``mean(axis=-1)`` over a short axis)."""
    total = raw[..., 0].astype(np.float32)
    for c in range(1, raw.shape[-1]):
        total += raw[..., c]
    total /= np.float32(raw.shape[-1])
    return total


def _all_valid(raw: np.ndarray) -> np.ndarray:
    return np.ones(raw.shape[:2], dtype=bool)


def keypoints_physical(raw: np.ndarray) -> np.ndarray:
    return _gray(raw).astype(np.float32)


def reshading_physical(raw: np.ndarray) -> np.ndarray:
    values = _channel_mean(raw) if raw.ndim == 3 else raw.astype(np.float32)
    values /= np.float32(255.0)
    return values


# --------------------------------------------------------------------------------------------
# Drawing: target-space prediction or label [C, H, W] (or [H, W] class ids) -> uint8 RGB.
# --------------------------------------------------------------------------------------------
def _colormap(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """A dependency-free perceptual-ish ramp (dark blue -> yellow)."""
    t = np.clip((values - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    r = np.clip(1.5 * t - 0.2, 0, 1)
    g = np.clip(1.2 * t, 0, 1) ** 0.8
    b = np.clip(0.6 - 0.8 * np.abs(t - 0.35), 0, 1)
    return (np.stack([r, g, b], axis=-1) * 255).astype(np.uint8)


def draw_scalar(lo: float, hi: float) -> Callable[[np.ndarray], np.ndarray]:
    def draw(values: np.ndarray) -> np.ndarray:
        return _colormap(values.reshape(values.shape[-2:]), lo, hi)

    return draw


def draw_normal(values: np.ndarray) -> np.ndarray:
    rgb = (np.clip(values, -1, 1) + 1.0) / 2.0 * 255.0
    return rgb.transpose(1, 2, 0).round().astype(np.uint8)


def _palette(n: int) -> np.ndarray:
    rng = np.random.default_rng(7)
    pal = rng.integers(40, 255, size=(n, 3), dtype=np.uint8)
    pal[0] = 0
    pal[1] = (90, 90, 90)
    return pal


SEGMENT_PALETTE = _palette(NUM_SEMANTIC_CLASSES)


def draw_segment(values: np.ndarray) -> np.ndarray:
    """Class ids [H, W], or logits [C, H, W] (argmax taken)."""
    labels = values.argmax(axis=0) if values.ndim == 3 else values
    return SEGMENT_PALETTE[np.clip(labels, 0, NUM_SEMANTIC_CLASSES - 1)]


# --------------------------------------------------------------------------------------------
# The table.
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Metric:
    name: str
    higher_is_better: bool


@dataclass(frozen=True)
class TaskSpec:
    """Everything the pipeline knows about one task.

    ``to_target(raw)`` returns ``(target, valid)``: ``target`` is ``float32 [C, H, W]`` for
    regression tasks and ``int64 [H, W]`` class ids for classification; ``valid`` is a bool
    ``[H, W]`` mask of the pixels that count in the loss and the metrics.
    """

    name: str
    folder: str  # directory name in the Taskonomy tree
    file_domain: str  # the domain string in file names (differs for segment_semantic)
    channels: int  # network output channels
    kind: str  # "classification" | "regression"
    bit_depth: int  # 8 or 16: how the file stores it
    to_target: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
    to_physical: Callable[[np.ndarray], np.ndarray]
    raw_valid: Callable[[np.ndarray], np.ndarray]
    resize: str  # "nearest" (labels, masked geometry) | "bilinear"
    loss: str  # "cross_entropy" | "rotate_l1" | "masked_l1"
    metrics: tuple[Metric, ...]
    default_weight: float
    draw: Callable[[np.ndarray], np.ndarray]
    ignore_index: int | None = None
    hflip_negate_channel: int | None = None  # normals: a horizontal flip negates x

    def decode(self, data: bytes, name: str = "<bytes>") -> np.ndarray:
        """File bytes -> exact raw integers."""
        return decode_png(data, name)

    @property
    def primary_metric(self) -> Metric:
        return self.metrics[0]


_LOSS_METRIC = Metric("loss", higher_is_better=False)

TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            name="segment_semantic",
            folder="segment_semantic",
            file_domain="segmentsemantic",
            channels=NUM_SEMANTIC_CLASSES,
            kind="classification",
            bit_depth=8,
            to_target=segment_target,
            to_physical=segment_physical,
            raw_valid=segment_valid,
            resize="nearest",
            loss="cross_entropy",
            metrics=(Metric("miou", True), Metric("pixel_acc", True), _LOSS_METRIC),
            default_weight=1.0,
            draw=draw_segment,
            ignore_index=0,
        ),
        TaskSpec(
            name="depth_zbuffer",
            folder="depth_zbuffer",
            file_domain="depth_zbuffer",
            channels=1,
            kind="regression",
            bit_depth=16,
            to_target=depth_target,
            to_physical=depth_physical,
            raw_valid=depth_valid,
            resize="nearest",
            loss="rotate_l1",
            metrics=(
                Metric("l1_m", False),
                Metric("abs_rel", False),
                Metric("rmse_m", False),
                Metric("delta1", True),
                Metric("si_abs_rel", False),
                Metric("si_rmse_m", False),
                Metric("si_delta1", True),
                _LOSS_METRIC,
            ),
            default_weight=1.0,
            draw=draw_scalar(-1.5, 6.0),
        ),
        TaskSpec(
            name="normal",
            folder="normal",
            file_domain="normal",
            channels=3,
            kind="regression",
            bit_depth=8,
            to_target=normal_target,
            to_physical=normal_physical,
            raw_valid=normal_valid,
            resize="nearest",
            loss="masked_l1",
            metrics=(
                Metric("mean_angle", False),
                Metric("median_angle", False),
                Metric("within_11_25", True),
                Metric("within_22_5", True),
                Metric("within_30", True),
                _LOSS_METRIC,
            ),
            default_weight=1.0,
            draw=draw_normal,
            hflip_negate_channel=0,
        ),
        TaskSpec(
            name="keypoints2d",
            folder="keypoints2d",
            file_domain="keypoints2d",
            channels=1,
            kind="regression",
            bit_depth=16,
            to_target=_affine(50.0, 100.0),
            to_physical=keypoints_physical,
            raw_valid=_all_valid,
            resize="bilinear",
            loss="masked_l1",
            metrics=(Metric("l1", False), _LOSS_METRIC),
            default_weight=1.0,
            draw=draw_scalar(-0.5, 3.0),
        ),
        TaskSpec(
            name="edge_texture",
            folder="edge_texture",
            file_domain="edge_texture",
            channels=1,
            kind="regression",
            bit_depth=16,
            to_target=_affine(718.0, 1070.0),
            to_physical=keypoints_physical,
            raw_valid=_all_valid,
            resize="bilinear",
            loss="masked_l1",
            metrics=(Metric("l1", False), _LOSS_METRIC),
            default_weight=1.0,
            draw=draw_scalar(-0.7, 3.0),
        ),
        TaskSpec(
            name="reshading",
            folder="reshading",
            file_domain="reshading",
            channels=1,
            kind="regression",
            bit_depth=8,
            to_target=_affine(0.4962, 0.2846, mean_rgb=True),
            to_physical=reshading_physical,
            raw_valid=_all_valid,
            resize="bilinear",
            loss="masked_l1",
            metrics=(Metric("l1", False), _LOSS_METRIC),
            default_weight=1.0,
            draw=draw_scalar(-1.8, 1.8),
        ),
    )
}

TASK_NAMES: tuple[str, ...] = tuple(TASKS)

# Non-task domains that travel with a view.
INPUT_DOMAIN = "rgb"
MASK_DOMAIN = "mask_valid"
POINT_INFO_DOMAIN = "point_info"


def get_task(name: str) -> TaskSpec:
    """Look a task up, with an error that lists the valid names."""
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; valid tasks: {', '.join(TASK_NAMES)}") from None
