"""The optimiser and its schedule: AdamW with decoupled groups, warm-up then cosine decay."""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import nn

from mult.config import OptimConfig

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
    optimizer: torch.optim.Optimizer, optim: OptimConfig, max_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up + cosine schedule over ``max_steps``, stepped once per optimizer step."""
    if optim.warmup_steps < 0:
        raise ValueError(f"optim.warmup_steps: must be >= 0, got {optim.warmup_steps}")
    if not 0.0 <= optim.min_lr_ratio <= 1.0:
        raise ValueError(f"optim.min_lr_ratio: must be in [0, 1], got {optim.min_lr_ratio}")

    def factor(step: int) -> float:
        return warmup_cosine(step, warmup_steps=optim.warmup_steps, max_steps=max_steps,
                             min_lr_ratio=optim.min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
