"""One optimisation step and one evaluation pass: the two loops every stage shares.

Training (:mod:`mult.training.loop`), fine-tuning before transfer evaluation, validation,
transfer evaluation and single-task baselines all go through :func:`train_step` and
:func:`evaluate`. Precision is decided here and only here (:func:`autocast`): from the device
the step runs on and ``train.precision``; the model itself never casts. Distributed behaviour
(DDP's ``no_sync`` during accumulation, averaging the loss combiner's gradients) switches on
only when ``torch.distributed`` is initialised.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mult.losses import NonFiniteLossError
from mult.tasks import task_losses
from mult.weighting import describe_losses

Batch = Mapping[str, Any]  # a loader batch: "key", "rgb" [B, 3, H, W], "targets", "valid", "bad_samples"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when ``precision == "bf16"``; fp32 everywhere else.

    On a CPU bf16 is slower and less exact, so a model trained in bf16 on GPUs runs in fp32
    when loaded on a CPU.
    """
    if precision == "bf16" and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def predict(model: nn.Module, images: Tensor, device: torch.device, precision: str) -> dict[str, Tensor]:
    """``model(images)`` under :func:`autocast`, outputs in float32: ``{task: [B, C, H, W]}``."""
    with autocast(device, precision):
        out = model(images)
    return {t: y.float() for t, y in out.items()}


def to_device(batch: Batch, device: torch.device) -> dict[str, Any]:
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

    def __init__(self, batches: Iterable[Batch]) -> None:
        self._it: Iterator[Batch] = iter(batches)
        self.wait_seconds = 0.0
        self.bad_samples = 0
        self.batches = 0

    def __iter__(self) -> "TimedIterator":
        return self

    def __next__(self) -> Batch:
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
    """What one optimizer step did. Losses are this rank's means over its micro-batches.

    ``skipped``: a loss or the gradient norm was not finite on some rank, so no rank updated
    its weights (``nonfinite_ranks`` of them saw a non-finite loss; ``problem`` words this
    rank's). ``stop``: some rank asked to stop (:mod:`mult.training.interrupts`).
    """

    loss: float
    task_losses: dict[str, float]
    grad_norm: float
    lr: float
    samples: int  # this rank's samples in the step
    details: dict[str, float] = field(default_factory=dict)  # the combiner's extras (weights)
    skipped: bool = False
    nonfinite_ranks: int = 0
    stop: bool = False
    keys: list[str] = field(default_factory=list)  # this rank's sample keys, for error messages
    problem: str = ""


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


def _agree(nonfinite: bool, stop: bool, device: torch.device) -> tuple[int, bool]:
    """How many ranks saw a non-finite loss, and whether any asked to stop: one all-reduce of
    two numbers, so that every rank takes the same branch (a rank that skipped alone, or
    stopped alone, would leave the others waiting in DDP's next all-reduce)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return int(nonfinite), stop
    flags = torch.tensor([float(nonfinite), float(stop)], device=device)
    dist.all_reduce(flags)
    return int(flags[0].item()), bool(flags[1].item() > 0)


def train_step(
    model: nn.Module,
    combiner: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    micro_batches: Iterator[Batch],
    *,
    tasks: list[str],
    accumulation: int,
    grad_clip: float | None,
    device: torch.device,
    precision: str = "fp32",
    normalize: str = "valid",
    on_nonfinite: str = "raise",
    stop_requested: bool = False,
) -> StepResult:
    """One optimizer step over ``accumulation`` micro-batches drawn from ``micro_batches``.

    The combined loss (:class:`mult.weighting.LossCombiner`) is divided by ``accumulation`` so
    the gradient is the mean over the global batch; DDP's all-reduce runs only on the last
    micro-batch (``no_sync`` before it). Gradients are clipped to ``grad_clip`` (global L2 norm;
    ``None`` or <= 0: no clipping). ``normalize`` is ``loss.normalize``.

    A NaN or infinite loss on any rank, or a non-finite gradient norm, is decided by all ranks
    together (:func:`_agree`; the norm is the same everywhere after DDP's all-reduce): no rank
    steps the optimizer or the schedule. ``on_nonfinite="raise"`` then raises
    :class:`~mult.losses.NonFiniteLossError` on every rank; ``"skip"`` returns the result with
    ``skipped`` set and lets the caller decide (the training loop's ``train.nonfinite``).
    ``stop_requested`` (this rank was asked to stop) travels in the same all-reduce.
    """
    if on_nonfinite not in ("raise", "skip"):
        raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
    model.train()
    combiner.train()
    combiner_params = [p for p in combiner.parameters() if p.requires_grad]
    totals: dict[str, float] = {}
    total_loss = 0.0
    samples = 0
    details: dict[str, float] = {}
    keys: list[str] = []
    problem = ""
    is_ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    for index in range(accumulation):
        batch = to_device(next(micro_batches), device)
        last = index == accumulation - 1
        with model.no_sync() if is_ddp and not last else contextlib.nullcontext():
            preds = predict(model, batch["rgb"], device, precision)
            losses = task_losses(preds, batch["targets"], batch["valid"], tasks, normalize)
            total, details = combiner(losses)
            # backward even when the loss is not finite: every rank must enter DDP's all-reduce
            (total / accumulation).backward()
        batch_keys = [str(k) for k in batch.get("key", [])]
        keys += batch_keys
        if not problem and not math.isfinite(details["loss/total"]):
            problem = f"{describe_losses(details)}; samples {batch_keys}"
        samples += int(batch["rgb"].shape[0])
        # the combiner already copied its numbers to the host once; reuse them
        total_loss += details["loss/total"] / accumulation
        for t in losses:  # a dataset may lack some tasks' labels
            totals[t] = totals.get(t, 0.0) + details[f"loss/{t}"] / accumulation
    nonfinite_ranks, stop = _agree(bool(problem), stop_requested, device)
    if combiner_params:
        _average_gradients(combiner_params)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    max_norm = grad_clip if grad_clip is not None and grad_clip > 0 else float("inf")
    norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    lr = optimizer.param_groups[0]["lr"]
    skipped = nonfinite_ranks > 0 or not math.isfinite(norm)
    if skipped:
        problem = problem or (f"gradient norm {norm} with finite losses ({totals})" if nonfinite_ranks == 0
                              else "this rank's losses were finite")
        optimizer.zero_grad(set_to_none=True)
        if on_nonfinite == "raise":
            raise NonFiniteLossError(f"non-finite loss or gradient ({nonfinite_ranks} rank(s) with a non-finite "
                                     f"loss); this rank: {problem}")
        return StepResult(total_loss, totals, norm, lr, samples, details, skipped=True,
                          nonfinite_ranks=nonfinite_ranks, stop=stop, keys=keys, problem=problem)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if scheduler is not None:
        scheduler.step()
    return StepResult(total_loss, totals, norm, lr, samples, details, stop=stop, keys=keys)


# --------------------------------------------------------------------------------------------
# Evaluation.
# --------------------------------------------------------------------------------------------
@dataclass
class EvalCounts:
    samples: int = 0  # evaluated on this rank
    bad_samples: int = 0  # the loader skipped as undecodable


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[Batch],
    suite: Any,
    *,
    tasks: list[str],
    device: torch.device,
    precision: str = "fp32",
    max_batches: int | None = None,
    transform: Callable[[Tensor], Tensor] | None = None,
    on_batch: Callable[[dict[str, Any], dict[str, Tensor]], None] | None = None,
    normalize: str = "valid",
) -> EvalCounts:
    """Run ``model`` over ``batches`` (at most ``max_batches``) and feed ``suite``
    (a :class:`~mult.metrics.MetricSuite`) with its predictions and losses.

    ``transform`` changes the input images first (a corruption such as blur); ``on_batch(batch,
    preds)`` sees every batch on ``device`` with its float32 predictions (prediction grids,
    progress bars). The losses are normalised as ``normalize`` says (``loss.normalize``). The
    model is unwrapped from DDP, so no collective runs here and ranks may see different batch
    counts; reduce ``suite`` across ranks afterwards (``suite.reduce_()``).
    """
    net = unwrap(model)
    was_training = net.training
    net.eval()
    counts = EvalCounts()
    try:
        for index, batch in enumerate(batches):
            if max_batches is not None and index >= max_batches:
                break
            batch = to_device(batch, device)
            if transform is not None:
                batch["rgb"] = transform(batch["rgb"])
            preds = predict(net, batch["rgb"], device, precision)
            losses = task_losses(preds, batch["targets"], batch["valid"], tasks, normalize)
            suite.update(preds, batch["targets"], batch["valid"], losses)
            counts.samples += int(batch["rgb"].shape[0])
            counts.bad_samples += int(batch.get("bad_samples", 0))
            if on_batch is not None:
                on_batch(batch, preds)
    finally:
        net.train(was_training)
    return counts


def weighted_objective(metrics: Mapping[str, Mapping[str, float]], weights: Mapping[str, float]) -> float:
    """The validation objective (lower is better): the loss-weighted sum of per-task val losses."""
    missing = [t for t in weights if "loss" not in metrics.get(t, {})]
    if missing:
        raise KeyError(f"validation metrics lack a 'loss' for tasks {missing}")
    return float(sum(w * metrics[t]["loss"] for t, w in weights.items()))
