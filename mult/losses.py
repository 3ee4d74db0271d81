"""Per-task losses and the one place where they are weighted into a total.

Conventions (shared with :mod:`mult.metrics`):

* ``pred``: ``float [B, C, H, W]`` in the task's target units (see :mod:`mult.tasks`);
  segmentation logits ``[B, K, H, W]``.
* ``target``: ``float [B, C, H, W]``; segmentation class ids ``long [B, H, W]``.
* ``valid``: ``bool [B, H, W]`` (or ``None``: every pixel counts). Invalid pixels never touch
  the value or the gradient, even when the target holds NaN or garbage there.

Each loss returns a scalar. A batch without a single valid pixel gives ``0`` that is still
connected to ``pred`` (so ``backward`` and DDP work unchanged).
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mult.config import Config
from mult.tasks import TASKS, get_task
from mult.weighting import Weighting, build_weighting

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


def masked_l1(pred: Tensor, target: Tensor, valid: Tensor | None = None) -> Tensor:
    """Mean absolute error over the valid pixels and channels of the whole batch.

    pred, target: ``[B, C, H, W]``; valid: ``bool [B, H, W]`` or ``None``. Returns a scalar.
    """
    _check_dense("masked_l1", pred, target, valid)
    mask = _dense_mask(target, valid)
    error = torch.where(mask, (pred - target).abs(), torch.zeros_like(pred))
    count = mask.sum()
    if count == 0:
        return pred.sum() * 0.0
    return error.sum() / count


def rotate_l1(pred: Tensor, target: Tensor, valid: Tensor | None = None) -> Tensor:
    """MulT's rotate loss for depth: per sample, the masked L1 at the best of 9 one-pixel shifts.

    For each shift ``(dy, dx)`` in ``{-1, 0, 1}^2`` the prediction is read at ``(y + dy, x + dx)``
    (edge pixels replicated), compared with the target at ``(y, x)`` on the valid pixels, and each
    sample keeps its smallest mean error. The result is the mean over samples that have at least
    one valid pixel. With shift ``(0, 0)`` winning for every sample and equal valid counts per
    sample, it equals :func:`masked_l1`. The gradient flows through the winning shift only.

    pred, target: ``[B, C, H, W]``; valid: ``bool [B, H, W]`` or ``None``. Returns a scalar.
    """
    _check_dense("rotate_l1", pred, target, valid)
    height, width = pred.shape[-2:]
    mask = _dense_mask(target, valid)
    counts = mask.sum(dim=(1, 2, 3))  # [B]
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
    logits: Tensor, labels: Tensor, valid: Tensor | None = None, ignore_index: int = 0
) -> Tensor:
    """Pixel-wise cross-entropy over the labelled pixels of the batch.

    logits: ``float [B, K, H, W]``; labels: ``long [B, H, W]`` in ``0..K-1``;
    valid: ``bool [B, H, W]`` or ``None``. Pixels labelled ``ignore_index`` (Taskonomy's 0,
    "uncertain") or marked invalid are left out. Returns the mean over the rest (a scalar).
    """
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


def _task_ce(pred: Tensor, target: Tensor, valid: Tensor | None, task: str) -> Tensor:
    ignore = TASKS[task].ignore_index
    return segmentation_ce(pred, target, valid, ignore_index=-100 if ignore is None else ignore)


# TaskSpec.loss -> fn(pred, target, valid, task)
LOSSES: dict[str, Callable[[Tensor, Tensor, Tensor | None, str], Tensor]] = {
    "cross_entropy": _task_ce,
    "rotate_l1": lambda pred, target, valid, task: rotate_l1(pred, target, valid),
    "masked_l1": lambda pred, target, valid, task: masked_l1(pred, target, valid),
}


def task_losses(
    preds: Mapping[str, Tensor],
    targets: Mapping[str, Tensor],
    valid: Mapping[str, Tensor] | None,
    tasks: Sequence[str],
) -> dict[str, Tensor]:
    """Each task's loss (``TASKS[t].loss``) in its target units, for the tasks in ``targets``.

    A task in ``tasks`` but not in ``targets`` (a dataset without that label) is skipped; a task
    with a target but no prediction is an error. ``valid`` may lack a task (every pixel counts).
    Returns ``{task: scalar Tensor}``.
    """
    valid = valid or {}
    out: dict[str, Tensor] = {}
    for task in tasks:
        spec = get_task(task)
        if task not in targets:
            continue
        if task not in preds:
            raise KeyError(
                f"task {task!r} has a target but no prediction; predictions: {sorted(preds)}"
            )
        try:
            loss_fn = LOSSES[spec.loss]
        except KeyError:
            raise ValueError(
                f"task {task!r}: unknown loss {spec.loss!r}; known: {sorted(LOSSES)}"
            ) from None
        out[task] = loss_fn(preds[task], targets[task], valid.get(task), task)
    return out


class LossCombiner(nn.Module):
    """Weights per-task losses into the total; the only place weighting happens.

    ``weights`` holds the static ``loss_weights`` (missing tasks take ``TASKS[t].default_weight``);
    ``weighting`` picks the strategy of :mod:`mult.weighting` (``fixed`` | ``uncertainty`` |
    ``dwa``). Learnable parameters (uncertainty's log-variances) are this module's
    ``parameters()``: add them to the optimiser, and under DDP average their gradients with
    :meth:`all_reduce_grads_` (they live outside the DDP-wrapped model). ``state_dict`` holds
    everything, DWA history included.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        weights: Mapping[str, float] | None = None,
        weighting: str = "fixed",
        dwa_temperature: float = 2.0,
    ) -> None:
        super().__init__()
        self.tasks: tuple[str, ...] = tuple(get_task(t).name for t in tasks)
        if not self.tasks:
            raise ValueError("LossCombiner needs at least one task")
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(self.tasks))
        if unknown:
            raise ValueError(
                f"loss weights for tasks {unknown} that are not combined; tasks: {list(self.tasks)}"
            )
        resolved = {t: float(weights.get(t, TASKS[t].default_weight)) for t in self.tasks}
        bad = {t: w for t, w in resolved.items() if not (math.isfinite(w) and w >= 0)}
        if bad:
            raise ValueError(f"loss weights must be finite and >= 0, got {bad}")
        self.weights = resolved
        self.weighting = weighting
        self.strategy: Weighting = build_weighting(weighting, self.tasks, resolved, dwa_temperature)

    def forward(self, losses: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """``losses``: ``{task: scalar}`` for any non-empty subset of the tasks.

        Returns ``(total, details)``; details hold floats: ``loss/<task>`` (raw loss),
        ``weight/<task>`` (effective multiplier), the strategy's values (``log_var/<task>`` or
        ``dwa_factor/<task>``) and ``loss/total``. Raises :class:`NonFiniteLossError` when the
        total is not finite.
        """
        if not losses:
            raise ValueError(
                f"LossCombiner got no task losses; expected some of {list(self.tasks)}"
            )
        unknown = sorted(set(losses) - set(self.tasks))
        if unknown:
            raise ValueError(
                f"losses for tasks {unknown} that are not combined; tasks: {list(self.tasks)}"
            )
        total, effective, extras = self.strategy(losses)
        names, values = ["loss/total"], [total]
        for task, loss in losses.items():
            names += [f"loss/{task}", f"weight/{task}"]
            values += [loss, effective[task]]
        for kind, per_task in extras.items():
            for task, value in per_task.items():
                names.append(f"{kind}/{task}")
                values.append(value)
        # one device->host copy for all of them
        numbers = torch.stack(
            [v.detach().float().reshape(()).to(total.device) for v in values]
        ).tolist()
        details = dict(zip(names, numbers))
        if not math.isfinite(details["loss/total"]):
            per_task = ", ".join(
                f"{t}={details[f'loss/{t}']:.6g} (weight {details[f'weight/{t}']:.6g})"
                for t in losses
            )
            raise NonFiniteLossError(
                f"non-finite total loss {details['loss/total']}; per-task losses: {per_task}"
            )
        return total, details

    def end_epoch(self, mean_losses: Mapping[str, float]) -> None:
        """Hand the strategy one finished epoch's mean loss per task (DWA uses it)."""
        self.strategy.end_epoch(mean_losses)

    def all_reduce_grads_(self, group=None) -> None:
        """Average the learnable parameters' gradients across ranks (no-op without a process group)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        world = torch.distributed.get_world_size(group)
        for param in self.parameters():
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            torch.distributed.all_reduce(param.grad, op=torch.distributed.ReduceOp.SUM, group=group)
            param.grad.div_(world)


def build_loss_combiner(cfg: Config) -> LossCombiner:
    """The combiner a :class:`mult.config.Config` describes (tasks, loss_weights, loss.*)."""
    return LossCombiner(
        cfg.tasks,
        weights={t: cfg.weight(t) for t in cfg.tasks},
        weighting=cfg.loss.weighting,
        dwa_temperature=cfg.loss.dwa_temperature,
    )
