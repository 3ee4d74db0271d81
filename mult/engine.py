"""The pure-torch training pieces: optimizer and schedule builders, the train step, validation.

Nothing here imports Ray: the training stage (``pipelines.train``), the DDP benchmark under
``torchrun`` and the evaluation stage all use these functions. Distributed behaviour (DDP's
``no_sync`` during accumulation, averaging the loss combiner's gradients) switches on only when
``torch.distributed`` is initialised.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from mult.config import OptimConfig

log = logging.getLogger(__name__)

# Parameters that AdamW must not decay: norms, biases and Swin's position tables.
_NO_DECAY_KEYWORDS = ("relative_position_bias_table", "absolute_pos_embed", "pos_embed", "log_var")


# --------------------------------------------------------------------------------------------
# Optimizer and schedule.
# --------------------------------------------------------------------------------------------
def param_groups(modules: Iterable[nn.Module], weight_decay: float) -> list[dict[str, Any]]:
    """Split trainable parameters into a decayed and a non-decayed AdamW group.

    Weights of rank >= 2 (linear, conv) are decayed; biases, norm scales and Swin's position
    tables are not (as in timm's ``param_groups_weight_decay``).
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in modules:
        for name, param in module.named_parameters():
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            if param.ndim <= 1 or any(key in name for key in _NO_DECAY_KEYWORDS):
                no_decay.append(param)
            else:
                decay.append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(
    model: nn.Module, optim: OptimConfig, extra: nn.Module | None = None
) -> torch.optim.AdamW:
    """AdamW over ``model`` and ``extra`` (e.g. the uncertainty weighting's log-variances)."""
    if len(optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in optim.betas):
        raise ValueError(f"optim.betas: need two values in [0, 1), got {optim.betas}")
    modules = [model] if extra is None else [model, extra]
    return torch.optim.AdamW(
        param_groups(modules, optim.weight_decay), lr=optim.lr, betas=tuple(optim.betas)
    )


def warmup_cosine(step: int, *, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier at ``step``: linear warm-up from ~0 to 1, then cosine decay to ``min_lr_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, warmup_steps: int, max_steps: int, min_lr_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up + cosine schedule, stepped once per optimizer step."""
    if warmup_steps < 0:
        raise ValueError(f"optim.warmup_steps: must be >= 0, got {warmup_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"optim.min_lr_ratio: must be in [0, 1], got {min_lr_ratio}")

    def factor(step: int) -> float:
        return warmup_cosine(
            step, warmup_steps=warmup_steps, max_steps=max_steps, min_lr_ratio=min_lr_ratio
        )

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def accumulation_steps(global_batch_size: int, micro_batch_size: int, world_size: int) -> int:
    """Micro-batches per rank per optimizer step so that the global batch is reached."""
    per_step = micro_batch_size * world_size
    if global_batch_size < per_step or global_batch_size % per_step:
        raise ValueError(
            f"train.global_batch_size ({global_batch_size}) must be a positive multiple of "
            f"micro_batch_size x world size ({micro_batch_size} x {world_size})"
        )
    return global_batch_size // per_step


# --------------------------------------------------------------------------------------------
# Devices, precision, batches.
# --------------------------------------------------------------------------------------------
def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when asked; a no-op on CPU (CPU bf16 is slower and less exact)."""
    if precision == "bf16" and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Move a loader batch's tensors (``rgb``, ``targets``, ``valid``) to ``device``."""
    out = dict(batch)
    non_blocking = device.type == "cuda"
    out["rgb"] = batch["rgb"].to(device, non_blocking=non_blocking)
    for key in ("targets", "valid"):
        out[key] = {t: v.to(device, non_blocking=non_blocking) for t, v in batch[key].items()}
    return out


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


class TimedIterator:
    """Wraps a batch iterator; counts the seconds spent waiting for batches and bad samples."""

    def __init__(self, batches: Iterable[dict[str, Any]]) -> None:
        self._it: Iterator[dict[str, Any]] = iter(batches)
        self.wait_seconds = 0.0
        self.bad_samples = 0
        self.batches = 0

    def __iter__(self) -> "TimedIterator":
        return self

    def __next__(self) -> dict[str, Any]:
        start = time.perf_counter()
        try:
            batch = next(self._it)
        finally:
            self.wait_seconds += time.perf_counter() - start
        self.bad_samples += int(batch.get("bad_samples", 0))
        self.batches += 1
        return batch


# --------------------------------------------------------------------------------------------
# Training step.
# --------------------------------------------------------------------------------------------
@dataclass
class StepResult:
    """What one optimizer step did. Losses are this rank's means over its micro-batches."""

    loss: float
    task_losses: dict[str, float]
    grad_norm: float
    lr: float
    samples: int  # this rank's samples in the step
    details: dict[str, float] = field(default_factory=dict)  # the combiner's extras (weights)


def _average_gradients(params: list[nn.Parameter]) -> None:
    """All-reduce the gradients of parameters outside DDP (the loss combiner's)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for p in params:  # every rank must send the same sizes, used or not
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def _scalar_details(details: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Flatten the combiner's extras (nested dicts of scalars) to ``{"weight/normal": 1.0}``."""
    out: dict[str, float] = {}
    for key, value in details.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_scalar_details(value, name + "/"))
        elif isinstance(value, torch.Tensor) and value.numel() == 1:
            out[name] = float(value.detach())
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def train_step(
    model: nn.Module,
    combiner: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    micro_batches: Iterator[dict[str, Any]],
    *,
    tasks: list[str],
    accumulation: int,
    grad_clip: float | None,
    device: torch.device,
    precision: str = "fp32",
) -> StepResult:
    """One optimizer step over ``accumulation`` micro-batches drawn from ``micro_batches``.

    Each micro-batch is a loader batch (``rgb`` ``[B, 3, H, W]``, ``targets``, ``valid``). The
    combined loss is divided by ``accumulation`` so the gradient is the mean over the global
    batch; DDP's all-reduce runs only on the last micro-batch (``no_sync`` before it).
    Gradients are clipped to ``grad_clip`` (global L2 norm; ``None`` or <= 0: no clipping).
    A non-finite loss raises (the combiner's ``NonFiniteLossError``).
    """
    from mult.losses import task_losses

    model.train()
    combiner.train()
    combiner_params = [p for p in combiner.parameters() if p.requires_grad]
    totals: dict[str, float] = {}
    total_loss = 0.0
    samples = 0
    details: dict[str, float] = {}
    for index in range(accumulation):
        batch = to_device(next(micro_batches), device)
        last = index == accumulation - 1
        is_ddp = isinstance(model, nn.parallel.DistributedDataParallel)
        sync = model.no_sync() if is_ddp and not last else contextlib.nullcontext()
        with sync:
            with autocast(device, precision):
                preds = model(batch["rgb"])
            preds = {t: p.float() for t, p in preds.items()}
            losses = task_losses(preds, batch["targets"], batch["valid"], tasks)
            total, extra = combiner(losses)
            (total / accumulation).backward()
        samples += int(batch["rgb"].shape[0])
        details = _scalar_details(extra) if isinstance(extra, dict) else {}
        # the combiner already copied its numbers to the host once; reuse them
        total_loss += details.get("loss/total", float(total.detach())) / accumulation
        for t in losses:  # a dataset may lack some tasks' labels
            value = details.get(f"loss/{t}")
            value = float(losses[t].detach()) if value is None else value
            totals[t] = totals.get(t, 0.0) + value / accumulation
    if combiner_params:
        _average_gradients(combiner_params)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    max_norm = grad_clip if grad_clip is not None and grad_clip > 0 else float("inf")
    norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if scheduler is not None:
        scheduler.step()
    return StepResult(total_loss, totals, norm, lr, samples, details)


# --------------------------------------------------------------------------------------------
# Validation.
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[dict[str, Any]],
    suite: Any,
    *,
    tasks: list[str],
    device: torch.device,
    precision: str = "fp32",
    max_batches: int | None = None,
) -> int:
    """Run ``model`` over ``batches`` (at most ``max_batches``) and feed ``suite`` (a MetricSuite).

    The model is unwrapped from DDP first so that no collective runs here; ranks may see
    different batch counts. Reduce ``suite`` across ranks afterwards (``suite.reduce_()``).
    Returns the number of samples this rank evaluated.
    """
    from mult.losses import task_losses

    net = unwrap(model)
    was_training = net.training
    net.eval()
    seen = 0
    try:
        for index, batch in enumerate(batches):
            if max_batches is not None and index >= max_batches:
                break
            batch = to_device(batch, device)
            with autocast(device, precision):
                preds = net(batch["rgb"])
            preds = {t: p.float() for t, p in preds.items()}
            losses = task_losses(preds, batch["targets"], batch["valid"], tasks)
            suite.update(preds, batch["targets"], batch["valid"], losses)
            seen += int(batch["rgb"].shape[0])
    finally:
        net.train(was_training)
    return seen


def weighted_objective(metrics: dict[str, dict[str, float]], weights: dict[str, float]) -> float:
    """The validation objective (lower is better): the loss-weighted sum of per-task val losses."""
    missing = [t for t in weights if "loss" not in metrics.get(t, {})]
    if missing:
        raise KeyError(f"validation metrics lack a 'loss' for tasks {missing}")
    return float(sum(w * metrics[t]["loss"] for t, w in weights.items()))
