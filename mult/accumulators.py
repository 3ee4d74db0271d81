"""Metric accumulators with an exact cross-rank reduce: one per kind of task.

Every accumulator keeps sufficient statistics (sums, counts, a confusion matrix, a histogram)
in **one flat float64 tensor** (``state()``). Statistics are summed, never averaged, so
``all_reduce(SUM)`` over ranks, or adding the states of several single-process accumulators,
gives the numbers one process would get over all the data: counts and histograms exactly
(integers below 2**53), float sums up to float64 summation order (~1e-16 relative). Every
update is computed in float64.

Units: depth errors in metres (predictions and targets go through ``depth_from_target``);
normal angles in degrees; keypoints/edges/reshading L1 in the Taskonomy target units of
:mod:`mult.encodings`. Accuracy-type metrics (``miou``, ``pixel_acc``, ``delta1``,
``within_*``) are percentages; ``abs_rel`` is a fraction. A metric with no valid pixel behind
it is NaN. The task table (:mod:`mult.tasks`) names each task's accumulator;
:class:`mult.metrics.MetricSuite` runs one per task.

Tensor conventions as in :mod:`mult.losses`: ``pred``/``target`` ``[B, C, H, W]`` (segmentation:
logits ``[B, K, H, W]`` or class ids ``[B, H, W]``, labels ``long [B, H, W]``), ``valid``
``bool [B, H, W]`` or ``None``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from mult.encodings import NUM_SEMANTIC_CLASSES, depth_from_target

# Depth: predictions are clamped into this range (metres) before any ratio; targets below
# MIN_DEPTH_M are not scored (a zero z-buffer value is "no measurement", not 0 m).
MIN_DEPTH_M = 1e-3
MAX_DEPTH_M = 65535 / 512.0
DELTA1_THRESHOLD = 1.25
# Normals: the median angle comes from a fixed histogram, 0.01 degree bins over [0, 180],
# read with linear interpolation inside the bin: resolution 0.01 degree.
NORMAL_HIST_BIN_DEG = 0.01
NORMAL_HIST_BINS = 18000
NORMAL_THRESHOLDS_DEG: dict[str, float] = {
    "within_11_25": 11.25,
    "within_22_5": 22.5,
    "within_30": 30.0,
}


class Accumulator:
    """Base class: named slots in one flat ``float64`` state tensor (kept on the CPU).

    Subclasses declare a layout of ``(slot, size)`` pairs and implement ``update`` and
    ``compute`` (``{metric: value}``, the names of the task table's metrics). Every layout starts with
    ``samples`` (images seen) and ``pixels`` (pixels scored).
    """


    def __init__(self, layout: Sequence[tuple[str, int]]) -> None:
        self._slices: dict[str, slice] = {}
        offset = 0
        for name, size in (("samples", 1), ("pixels", 1), *layout):
            self._slices[name] = slice(offset, offset + size)
            offset += size
        self._state = torch.zeros(offset, dtype=torch.float64)

    # -- state ---------------------------------------------------------------------------
    def state(self) -> Tensor:
        """A copy of the statistics, ``float64 [S]``; sum states to merge accumulators."""
        return self._state.clone()

    def load_state(self, state: Tensor) -> None:
        if state.dim() != 1 or state.numel() != self._state.numel():
            raise ValueError(
                f"{type(self).__name__}.load_state: expected a flat tensor of {self._state.numel()} "
                f"values, got shape {tuple(state.shape)}"
            )
        self._state = state.detach().to(device="cpu", dtype=torch.float64).clone()

    def reset(self) -> None:
        self._state.zero_()

    @property
    def samples(self) -> int:
        return int(self._state[self._slices["samples"]].item())

    def _get(self, name: str) -> Tensor:
        part = self._state[self._slices[name]]
        return part if part.numel() > 1 else part[0]

    def _add(self, device: torch.device, **parts: Tensor | float) -> None:
        """Add per-update statistics, with a single device-to-host copy."""
        increment = torch.zeros(self._state.numel(), dtype=torch.float64, device=device)
        for name, value in parts.items():
            increment[self._slices[name]] += torch.as_tensor(
                value, dtype=torch.float64, device=device
            ).reshape(-1)
        self._state += increment.cpu()

    def _ratio(self, name: str, denominator: str = "pixels", scale: float = 1.0) -> float:
        count = float(self._get(denominator))
        return scale * float(self._get(name)) / count if count > 0 else math.nan

    # -- interface -------------------------------------------------------------------------
    def update(self, pred: Tensor, target: Tensor, valid: Tensor | None = None) -> None:
        raise NotImplementedError

    def compute(self) -> dict[str, float]:
        raise NotImplementedError


def _dense_mask(
    name: str, pred: Tensor, target: Tensor, valid: Tensor | None, channels: int | None
) -> Tensor:
    """Check ``[B, C, H, W]`` shapes; return ``bool [B, H, W]``: valid and target finite."""
    if (
        pred.dim() != 4
        or pred.shape != target.shape
        or (channels is not None and pred.shape[1] != channels)
    ):
        want = f"[B, {channels}, H, W]" if channels is not None else "[B, C, H, W]"
        raise ValueError(
            f"{name}: pred and target must both be {want}, got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    mask = torch.isfinite(target).all(dim=1)
    if valid is not None:
        if valid.dtype != torch.bool or valid.shape != mask.shape:
            raise ValueError(
                f"{name}: valid must be bool {tuple(mask.shape)}, got {valid.dtype} {tuple(valid.shape)}"
            )
        mask = mask & valid
    return mask


class SegmentationAccumulator(Accumulator):
    """Confusion matrix (``[K, K]``, rows = label, columns = prediction) over labelled pixels.

    ``miou``: mean IoU over the classes other than ``ignore_index`` that occur in the labels
    or the predictions (union > 0); ``pixel_acc``: correct / labelled pixels. Both in percent.
    """


    def __init__(
        self, num_classes: int = NUM_SEMANTIC_CLASSES, ignore_index: int | None = 0
    ) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        super().__init__([("confusion", num_classes * num_classes)])

    def update(self, pred: Tensor, target: Tensor, valid: Tensor | None = None) -> None:
        """pred: logits ``[B, K, H, W]`` or class ids ``[B, H, W]``; target: ``long [B, H, W]``."""
        k = self.num_classes
        if pred.dim() == 4:
            if pred.shape[1] != k:
                raise ValueError(
                    f"segmentation logits must have {k} channels, got {tuple(pred.shape)}"
                )
            pred = pred.argmax(dim=1)
        if pred.shape != target.shape or target.dim() != 3:
            raise ValueError(
                f"segmentation: predictions (ids) and labels must be [B, H, W], "
                f"got {tuple(pred.shape)} and {tuple(target.shape)}"
            )
        mask = torch.ones_like(target, dtype=torch.bool) if valid is None else valid
        if mask.dtype != torch.bool or mask.shape != target.shape:
            raise ValueError(
                f"segmentation: valid must be bool {tuple(target.shape)}, got {mask.dtype} {tuple(mask.shape)}"
            )
        if self.ignore_index is not None:
            mask = mask & (target != self.ignore_index)
        labels, predicted = target[mask].long(), pred[mask].long()
        for what, ids in (("labels", labels), ("predictions", predicted)):
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= k):
                raise ValueError(
                    f"segmentation {what} must lie in 0..{k - 1}, got {int(ids.min())}..{int(ids.max())}"
                )
        confusion = torch.bincount(labels * k + predicted, minlength=k * k)
        self._add(
            target.device, samples=target.shape[0], pixels=labels.numel(), confusion=confusion
        )

    def compute(self) -> dict[str, float]:
        confusion = self._get("confusion").reshape(self.num_classes, self.num_classes)
        classes = [c for c in range(self.num_classes) if c != self.ignore_index]
        tp = confusion.diagonal()[classes]
        union = confusion.sum(dim=1)[classes] + confusion.sum(dim=0)[classes] - tp
        present = union > 0
        miou = (
            float((tp[present] / union[present]).mean()) * 100.0
            if bool(present.any())
            else math.nan
        )
        correct = float(confusion.diagonal().sum())
        pixels = float(self._get("pixels"))
        return {"miou": miou, "pixel_acc": 100.0 * correct / pixels if pixels > 0 else math.nan}


class DepthAccumulator(Accumulator):
    """Depth errors in metres on valid pixels with a target above ``MIN_DEPTH_M``.

    Predictions are clamped to ``[MIN_DEPTH_M, MAX_DEPTH_M]``. Pooled over all scored pixels
    (the monocular-depth literature's set, Eigen et al. 2014): ``l1_m``, ``abs_rel`` (mean of
    ``|p - t| / t``), ``sq_rel`` (mean of ``(p - t)^2 / t``), ``rmse_m``, ``log_rmse``
    (``sqrt(mean((ln p - ln t)^2))``) and ``delta1``/``delta2``/``delta3`` (% of pixels with
    ``max(p/t, t/p) < 1.25, 1.25^2, 1.25^3``). The ``si_*`` variants first scale each image's
    prediction by ``median(t) / median(p)`` over its scored pixels (torch's lower median),
    which removes an unknown global scale (other datasets, Doom units).
    """

    _SUMS = ("abs", "abs_rel", "sq_rel", "sq", "log_sq", "delta1", "delta2", "delta3",
             "si_abs_rel", "si_sq", "si_delta1")

    def __init__(self) -> None:
        super().__init__([(name, 1) for name in self._SUMS])

    @staticmethod
    def _errors(pred: Tensor, target: Tensor, mask: Tensor) -> dict[str, Tensor]:
        zero = torch.zeros((), dtype=pred.dtype, device=pred.device)
        diff = pred - target
        ratio = torch.maximum(pred / target, target / pred)
        log_diff = torch.log(pred) - torch.log(target)
        return {
            "abs": torch.where(mask, diff.abs(), zero).sum(),
            "abs_rel": torch.where(mask, diff.abs() / target, zero).sum(),
            "sq_rel": torch.where(mask, diff * diff / target, zero).sum(),
            "sq": torch.where(mask, diff * diff, zero).sum(),
            "log_sq": torch.where(mask, log_diff * log_diff, zero).sum(),
            **{f"delta{k}": (mask & (ratio < DELTA1_THRESHOLD**k)).sum() for k in (1, 2, 3)},
        }

    def update(self, pred: Tensor, target: Tensor, valid: Tensor | None = None) -> None:
        """pred, target: ``[B, 1, H, W]`` in depth target units."""
        mask = _dense_mask("depth", pred, target, valid, channels=1)
        target_m = depth_from_target(target[:, 0].double())
        pred_m = depth_from_target(pred[:, 0].detach().double()).clamp(MIN_DEPTH_M, MAX_DEPTH_M)
        mask = mask & (target_m > MIN_DEPTH_M)
        target_m = torch.where(mask, target_m, torch.ones_like(target_m))  # keep ratios finite
        plain = self._errors(pred_m, target_m, mask)
        nan = torch.full_like(pred_m, math.nan)
        flat = (-1, pred_m.shape[-2] * pred_m.shape[-1])
        med_t = torch.where(mask, target_m, nan).reshape(flat).nanmedian(dim=1).values
        med_p = torch.where(mask, pred_m, nan).reshape(flat).nanmedian(dim=1).values
        scale = torch.nan_to_num(med_t / med_p, nan=1.0)[
            :, None, None
        ]  # images with no pixel: unused
        aligned = self._errors(pred_m * scale, target_m, mask)
        self._add(
            target.device,
            samples=target.shape[0],
            pixels=mask.sum(),
            **plain,
            si_abs_rel=aligned["abs_rel"],
            si_sq=aligned["sq"],
            si_delta1=aligned["delta1"],
        )

    def compute(self) -> dict[str, float]:
        return {
            "l1_m": self._ratio("abs"),
            "abs_rel": self._ratio("abs_rel"),
            "sq_rel": self._ratio("sq_rel"),
            "rmse_m": math.sqrt(self._ratio("sq")),
            "log_rmse": math.sqrt(self._ratio("log_sq")),
            "delta1": self._ratio("delta1", scale=100.0),
            "delta2": self._ratio("delta2", scale=100.0),
            "delta3": self._ratio("delta3", scale=100.0),
            "si_abs_rel": self._ratio("si_abs_rel"),
            "si_rmse_m": math.sqrt(self._ratio("si_sq")),
            "si_delta1": self._ratio("si_delta1", scale=100.0),
        }


class NormalAccumulator(Accumulator):
    """Angular error in degrees between predicted and target normals on valid pixels.

    The angle is ``atan2(|p x t|, p . t)`` (no normalisation needed, accurate near 0 and 180);
    a zero-length prediction counts as 90 degrees. ``mean_angle``; ``median_angle`` from a
    histogram of ``NORMAL_HIST_BIN_DEG`` bins (resolution 0.01 degree); ``within_*`` the
    percentage of pixels with an angle strictly below 11.25, 22.5, 30 degrees (exact counts).
    """


    def __init__(self) -> None:
        super().__init__(
            [
                ("angle", 1),
                *((name, 1) for name in NORMAL_THRESHOLDS_DEG),
                ("hist", NORMAL_HIST_BINS),
            ]
        )

    def update(self, pred: Tensor, target: Tensor, valid: Tensor | None = None) -> None:
        """pred, target: ``[B, 3, H, W]`` in normal target units (any length)."""
        mask = _dense_mask("normal", pred, target, valid, channels=3)
        p, t = pred.detach().double(), target.double()
        cross = torch.linalg.cross(p, t, dim=1).norm(dim=1)
        dot = (p * t).sum(dim=1)
        angle = torch.rad2deg(torch.atan2(cross, dot))
        degenerate = p.norm(dim=1) * t.norm(dim=1) < 1e-12
        angle = torch.where(degenerate, torch.full_like(angle, 90.0), angle)[mask]
        bins = (
            (torch.nan_to_num(angle, nan=180.0) / NORMAL_HIST_BIN_DEG)
            .long()
            .clamp(0, NORMAL_HIST_BINS - 1)
        )
        within = {
            name: (angle < threshold).sum() for name, threshold in NORMAL_THRESHOLDS_DEG.items()
        }
        self._add(
            target.device,
            samples=target.shape[0],
            pixels=angle.numel(),
            angle=angle.sum(),
            hist=torch.bincount(bins, minlength=NORMAL_HIST_BINS),
            **within,
        )

    def _median(self) -> float:
        hist = self._get("hist")
        count = float(hist.sum())
        if count == 0:
            return math.nan
        cumulative = hist.cumsum(0)
        half = count / 2.0
        index = int(torch.searchsorted(cumulative, torch.tensor([half], dtype=torch.float64))[0])
        before = float(cumulative[index] - hist[index])
        return (index + (half - before) / float(hist[index])) * NORMAL_HIST_BIN_DEG

    def compute(self) -> dict[str, float]:
        out = {"mean_angle": self._ratio("angle"), "median_angle": self._median()}
        out.update({name: self._ratio(name, scale=100.0) for name in NORMAL_THRESHOLDS_DEG})
        return out


class L1Accumulator(Accumulator):
    """``l1``: mean absolute error over valid pixels and channels, in target units."""


    def __init__(self) -> None:
        super().__init__([("abs", 1), ("values", 1)])

    def update(self, pred: Tensor, target: Tensor, valid: Tensor | None = None) -> None:
        """pred, target: ``[B, C, H, W]``."""
        mask = _dense_mask("l1", pred, target, valid, channels=None)
        dense = mask.unsqueeze(1).expand_as(target)
        error = torch.where(dense, (pred.detach().double() - target.double()).abs(), 0.0)
        self._add(
            target.device,
            samples=target.shape[0],
            pixels=mask.sum(),
            abs=error.sum(),
            values=dense.sum(),
        )

    def compute(self) -> dict[str, float]:
        return {"l1": self._ratio("abs", denominator="values")}
