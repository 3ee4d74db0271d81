"""The per-task loss functions; :class:`mult.weighting.LossCombiner` weights them into a total.

The task table (:mod:`mult.tasks`) names each task's function. Conventions (shared with
:mod:`mult.accumulators`):

* ``pred``: ``float [B, C, H, W]`` in the task's target units (see :mod:`mult.tasks`);
  segmentation logits ``[B, K, H, W]``.
* ``target``: ``float [B, C, H, W]``; segmentation class ids ``long [B, H, W]``.
* ``valid``: ``bool [B, H, W]`` (or ``None``: every pixel counts). Invalid pixels never touch
  the value or the gradient, even when the target holds NaN or garbage there.

Each loss returns a scalar. A batch without a single valid pixel gives ``0`` that is still
connected to ``pred`` (so ``backward`` and DDP work unchanged).

``normalize`` (``loss.normalize``) says what an L1 loss divides by: ``"valid"`` (default) the
valid pixels it sums over; ``"all"`` every pixel, valid or not, as the Taskonomy task-grouping
code does (masked pixels count as zero error, so a view with few valid pixels weighs less).
Cross-entropy averages over labelled pixels in both (the task-grouping code's ``ignore_index``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


NORMALIZE = ("valid", "all")

# The 9 one-pixel shifts (dy, dx) the rotate loss chooses from; (0, 0) is the plain L1.
ROTATE_SHIFTS: tuple[tuple[int, int], ...] = tuple(
    (dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
)


class NonFiniteLossError(ValueError):
    """The total loss is NaN or infinite; the message lists every per-task loss and weight."""


def _check_dense(name: str, pred: Tensor, target: Tensor, valid: Tensor | None) -> None:
    if pred.dim() != 4 or pred.shape != target.shape:
        raise ValueError(
            f"{name}: pred and target must both be [B, C, H, W] of the same shape, "
            f"got pred {tuple(pred.shape)} and target {tuple(target.shape)}"
        )
    _check_valid(name, valid, (pred.shape[0], *pred.shape[2:]))


def _check_valid(name: str, valid: Tensor | None, shape: tuple[int, ...]) -> None:
    if valid is None:
        return
    if valid.dtype != torch.bool or tuple(valid.shape) != tuple(shape):
        raise ValueError(
            f"{name}: valid must be a bool mask [B, H, W] = {tuple(shape)}, "
            f"got {valid.dtype} {tuple(valid.shape)}"
        )


def _dense_mask(target: Tensor, valid: Tensor | None) -> Tensor:
    """``bool [B, C, H, W]``: valid pixels whose target value is finite."""
    mask = torch.isfinite(target)
    if valid is not None:
        mask = mask & valid.unsqueeze(1)
    return mask


def _check_normalize(normalize: str) -> None:
    if normalize not in NORMALIZE:
        raise ValueError(f"loss.normalize: {normalize!r} is not allowed; choose one of {list(NORMALIZE)}")


def masked_l1(pred: Tensor, target: Tensor, valid: Tensor | None = None, *, normalize: str = "valid") -> Tensor:
    """Mean absolute error over the valid pixels and channels of the whole batch (``normalize=
    "all"``: the sum of their errors over every pixel and channel of the batch).

    pred, target: ``[B, C, H, W]``; valid: ``bool [B, H, W]`` or ``None``. Returns a scalar.
    """
    _check_dense("masked_l1", pred, target, valid)
    _check_normalize(normalize)
    mask = _dense_mask(target, valid)
    error = torch.where(mask, (pred - target).abs(), torch.zeros_like(pred))
    count = mask.sum() if normalize == "valid" else mask.numel()
    if count == 0:
        return pred.sum() * 0.0
    return error.sum() / count


def rotate_l1(pred: Tensor, target: Tensor, valid: Tensor | None = None, *, normalize: str = "valid") -> Tensor:
    """MulT's rotate loss for depth: per sample, the masked L1 at the best of 9 one-pixel shifts.

    For each shift ``(dy, dx)`` in ``{-1, 0, 1}^2`` the prediction is read at ``(y + dy, x + dx)``
    (edge pixels replicated), compared with the target at ``(y, x)`` on the valid pixels, and each
    sample keeps its smallest mean error. The result is the mean over samples that have at least
    one valid pixel. With shift ``(0, 0)`` winning for every sample and equal valid counts per
    sample, it equals :func:`masked_l1`. The gradient flows through the winning shift only.
    ``normalize="all"``: each sample's error sum is divided by all its pixels and channels, and
    the mean is over every sample.

    pred, target: ``[B, C, H, W]``; valid: ``bool [B, H, W]`` or ``None``. Returns a scalar.
    """
    _check_dense("rotate_l1", pred, target, valid)
    _check_normalize(normalize)
    height, width = pred.shape[-2:]
    mask = _dense_mask(target, valid)
    counts = mask.sum(dim=(1, 2, 3))  # [B]
    if normalize == "all":
        counts = torch.full_like(counts, mask[0].numel())
    padded = F.pad(pred, (1, 1, 1, 1), mode="replicate")
    zeros = torch.zeros_like(pred)
    sums = []
    for dy, dx in ROTATE_SHIFTS:
        shifted = padded[:, :, 1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width]
        sums.append(torch.where(mask, (shifted - target).abs(), zeros).sum(dim=(1, 2, 3)))
    best = torch.stack(sums).min(dim=0).values  # [B]
    has_pixels = counts > 0
    if not bool(has_pixels.any()):
        return pred.sum() * 0.0
    return (best[has_pixels] / counts[has_pixels]).mean()


def segmentation_ce(
    logits: Tensor, labels: Tensor, valid: Tensor | None = None, ignore_index: int = 0, *, normalize: str = "valid"
) -> Tensor:
    """Pixel-wise cross-entropy over the labelled pixels of the batch.

    logits: ``float [B, K, H, W]``; labels: ``long [B, H, W]`` in ``0..K-1``;
    valid: ``bool [B, H, W]`` or ``None``. Pixels labelled ``ignore_index`` (Taskonomy's 0,
    "uncertain") or marked invalid are left out. Returns the mean over the rest (a scalar),
    whatever ``normalize`` says (the task-grouping code averages its cross-entropy over the
    pixels it does not ignore too).
    """
    _check_normalize(normalize)
    if logits.dim() != 4 or labels.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            "segmentation_ce: logits must be [B, K, H, W] and labels [B, H, W] with the same "
            f"B, H, W; got logits {tuple(logits.shape)} and labels {tuple(labels.shape)}"
        )
    if labels.dtype != torch.long:
        raise ValueError(
            f"segmentation_ce: labels must be torch.long class ids, got {labels.dtype}"
        )
    _check_valid("segmentation_ce", valid, tuple(labels.shape))
    num_classes = logits.shape[1]
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"segmentation_ce: labels must lie in 0..{num_classes - 1}, "
            f"got {int(labels.min())}..{int(labels.max())}"
        )
    if valid is not None:
        labels = torch.where(valid, labels, torch.full_like(labels, ignore_index))
    count = (labels != ignore_index).sum()
    if count == 0:
        return logits.sum() * 0.0
    total = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    return total / count
