"""The task table: one :class:`TaskSpec` per task, the only place that describes a task.

Everything that iterates over tasks (the readers, the loader's targets, model heads, losses,
metrics, Tune's search space, drawings and reports) reads this table, so adding a task is one
entry here plus its encoding functions (:mod:`mult.encodings`), its loss (:mod:`mult.losses`)
and, if no existing one fits, its accumulator (:mod:`mult.accumulators`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Literal, Mapping, Sequence

import numpy as np
from torch import Tensor

from mult import encodings as enc
from mult.accumulators import Accumulator, DepthAccumulator, L1Accumulator, NormalAccumulator, SegmentationAccumulator
from mult.drawing import draw_normal, draw_scalar, draw_segment
from mult.losses import masked_l1, rotate_l1, segmentation_ce

# Non-task domains that travel with a view.
INPUT_DOMAIN = "rgb"
MASK_DOMAIN = "mask_valid"
POINT_INFO_DOMAIN = "point_info"

LossFn = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]


@dataclass(frozen=True)
class Metric:
    """One reported number. ``absolute_scale``: it depends on the prediction's absolute scale
    (metric depth errors), so it means nothing on a set whose depth has no metric unit."""

    name: str
    higher_is_better: bool
    absolute_scale: bool = False


@dataclass(frozen=True)
class TaskSpec:
    """Everything the pipeline knows about one task.

    ``to_target(raw)`` returns ``(target, valid)``: ``target`` is ``float32 [C, H, W]`` for
    regression tasks and ``int64 [H, W]`` class ids for classification; ``valid`` is a bool
    ``[H, W]`` mask of the pixels that count in the loss and the metrics. ``loss(pred, target,
    valid)`` is the task's loss in target units; ``accumulator()`` makes its metric accumulator,
    whose metrics are ``metrics`` (the last one, ``loss``, is kept by the metric suite).
    """

    name: str
    folder: str  # directory name in the Taskonomy tree
    file_domain: str  # the domain string in file names (differs for segment_semantic)
    channels: int  # network output channels
    kind: Literal["classification", "regression"]
    bit_depth: int  # 8 or 16: how the file stores it
    png_layout: Literal["gray", "rgb", "gray_or_rgb"]  # gray_or_rgb: RGB with R=G=B, or gray
    to_target: Callable[[np.ndarray], enc.Target]
    to_physical: Callable[[np.ndarray], np.ndarray]
    raw_valid: Callable[[np.ndarray], np.ndarray]
    resize: Literal["nearest", "bilinear"]  # nearest: labels and masked geometry
    loss: LossFn
    accumulator: Callable[[], Accumulator]
    metrics: tuple[Metric, ...]
    default_weight: float
    draw: Callable[[np.ndarray], np.ndarray]
    ignore_index: int | None = None
    hflip_negate_channel: int | None = None  # normals: a horizontal flip negates x

    @property
    def primary_metric(self) -> Metric:
        return self.metrics[0]

    def metric(self, name: str) -> Metric:
        for m in self.metrics:
            if m.name == name:
                return m
        raise KeyError(f"task {self.name!r} has no metric {name!r}; its metrics: {[m.name for m in self.metrics]}")


_LOSS_METRIC = Metric("loss", higher_is_better=False)

TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            name="segment_semantic",
            folder="segment_semantic",
            file_domain="segmentsemantic",
            channels=enc.NUM_SEMANTIC_CLASSES,
            kind="classification",
            bit_depth=8,
            png_layout="gray",
            to_target=enc.segment_target,
            to_physical=enc.segment_physical,
            raw_valid=enc.segment_valid,
            resize="nearest",
            loss=functools.partial(segmentation_ce, ignore_index=0),
            accumulator=functools.partial(SegmentationAccumulator, enc.NUM_SEMANTIC_CLASSES, ignore_index=0),
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
            png_layout="gray",
            to_target=enc.depth_target,
            to_physical=enc.depth_physical,
            raw_valid=enc.depth_valid,
            resize="nearest",
            loss=rotate_l1,
            accumulator=DepthAccumulator,
            metrics=(
                Metric("l1_m", False, absolute_scale=True),
                Metric("abs_rel", False, absolute_scale=True),
                Metric("sq_rel", False, absolute_scale=True),
                Metric("rmse_m", False, absolute_scale=True),
                Metric("log_rmse", False, absolute_scale=True),
                Metric("delta1", True, absolute_scale=True),
                Metric("delta2", True, absolute_scale=True),
                Metric("delta3", True, absolute_scale=True),
                Metric("si_abs_rel", False),
                Metric("si_rmse_m", False),
                Metric("si_delta1", True),
                Metric("loss", False, absolute_scale=True),
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
            png_layout="rgb",
            to_target=enc.normal_target,
            to_physical=enc.normal_physical,
            raw_valid=enc.normal_valid,
            resize="nearest",
            loss=masked_l1,
            accumulator=NormalAccumulator,
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
            png_layout="gray",
            to_target=enc.affine_target(50.0, 100.0),
            to_physical=enc.response_physical,
            raw_valid=enc.all_valid,
            resize="bilinear",
            loss=masked_l1,
            accumulator=L1Accumulator,
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
            png_layout="gray",
            to_target=enc.affine_target(718.0, 1070.0),
            to_physical=enc.response_physical,
            raw_valid=enc.all_valid,
            resize="bilinear",
            loss=masked_l1,
            accumulator=L1Accumulator,
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
            png_layout="gray_or_rgb",
            to_target=enc.affine_target(0.4962, 0.2846, mean_rgb=True),
            to_physical=enc.reshading_physical,
            raw_valid=enc.all_valid,
            resize="bilinear",
            loss=masked_l1,
            accumulator=L1Accumulator,
            metrics=(Metric("l1", False), _LOSS_METRIC),
            default_weight=1.0,
            draw=draw_scalar(-1.8, 1.8),
        ),
    )
}

TASK_NAMES: tuple[str, ...] = tuple(TASKS)


def get_task(name: str) -> TaskSpec:
    """Look a task up, with an error that lists the valid names."""
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; valid tasks: {', '.join(TASK_NAMES)}") from None


def task_losses(
    preds: Mapping[str, Tensor],
    targets: Mapping[str, Tensor],
    valid: Mapping[str, Tensor] | None,
    tasks: Sequence[str],
    normalize: str = "valid",
) -> dict[str, Tensor]:
    """Each task's loss (``TaskSpec.loss``) in its target units, for the tasks in ``targets``.

    A task in ``tasks`` but not in ``targets`` (a dataset without that label) is skipped; a task
    with a target but no prediction is an error. ``valid`` may lack a task (every pixel counts).
    ``normalize``: ``loss.normalize`` (:mod:`mult.losses`). Returns ``{task: scalar Tensor}``.
    """
    valid = valid or {}
    out: dict[str, Tensor] = {}
    for task in tasks:
        spec = get_task(task)
        if task not in targets:
            continue
        if task not in preds:
            raise KeyError(f"task {task!r} has a target but no prediction; predictions: {sorted(preds)}")
        out[task] = spec.loss(preds[task], targets[task], valid.get(task), normalize=normalize)
    return out
