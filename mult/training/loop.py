"""The training loop of one rank: build, restore, train, validate, checkpoint, report.

:func:`train_loop` runs on every rank of a DDP group (Ray Train's workers, ``torchrun``'s
ranks, or one process) and talks to its launcher only through a
:class:`~mult.training.session.Session`. What it does per optimizer step:

* one :func:`~mult.training.step.train_step` over ``accumulation`` micro-batches of the shard
  loader (every rank runs the same number of steps per epoch; DDP hangs otherwise);
* every ``train.log_every`` steps, a report: the window's metrics reduced across ranks in one
  all-reduce (:class:`MetricWindow`), every rank reporting the same number of times;
* every ``train.val_every`` steps, validation on ``data.val`` with metrics reduced exactly
  across ranks (and Delta-m with baselines); every ``train.checkpoint_every`` steps and at the
  end, a checkpoint written by rank 0 (model, optimizer, schedule, loss weighting, data
  position, every rank's RNG) and handed to the session with the report.

A restored run continues at the same data position with the same RNG streams, so it computes
what the uninterrupted run would have.
"""

from __future__ import annotations

import logging
import math
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist

from mult.config import Config, from_dict
from mult.training.faults import FAULT_MARKER, FaultSwitch
from mult.training.interrupts import Preempted, stop_on_signal, stop_reason, stop_requested
from mult.training.nonfinite import NonFiniteGuard, warn_if_replaying
from mult.training.session import Hook, Session
from mult.training.step import StepResult, TimedIterator

log = logging.getLogger(__name__)

VAL_PREFIX = "val/"  # a report's validation metrics are "val/<task>/<metric>"


@dataclass
class LoopOptions:
    """What a rank needs besides the config (the driver settles it: :class:`~mult.training.plan.RunPlan`)."""

    local_dir: Path  # rank 0's TensorBoard, loss curve and metrics address
    run_url: str | None = None  # the run in storage; telemetry is copied there when it is on S3
    baselines: dict[str, dict[str, float]] | None = None  # for Delta-m at validation
    fault_at_step: int | None = None  # test-only: see mult.training.faults
    fault_kind: str = "exit"
    telemetry: bool = True  # rank 0 serves Prometheus, writes TensorBoard and the PNG


@dataclass
class Progress:
    """The loop's position; saved in every checkpoint."""

    step: int = 0
    epoch: int = 0
    micro_batch: int = 0  # micro-batches consumed in this epoch, on every rank
    bad_samples: int = 0  # summed over ranks
    samples: int = 0  # summed over ranks
    nonfinite_steps: int = 0  # steps skipped for a non-finite loss or gradient (train.nonfinite=skip)
    history: list[dict[str, float]] = field(default_factory=list)  # rank 0's loss curve rows
    val_history: list[dict[str, float]] = field(default_factory=list)
    epoch_sums: dict[str, list[float]] = field(default_factory=dict)  # task -> [sum, count]


def train_loop(cfg: Config, session: Session, opts: LoopOptions, hooks: Sequence[Hook] = ()) -> dict[str, float]:
    """Train ``cfg`` to ``train.max_steps`` on this rank; returns the last reported metrics."""
    from mult.model import build_model
    from mult.training.optim import build_optimizer, build_scheduler
    from mult.training.step import train_step
    from mult.weighting import build_loss_combiner

    rank, world, device = session.rank, session.world_size, session.device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    seed_everything(cfg.train.seed, rank)
    model = build_model(cfg).to(device)
    combiner = build_loss_combiner(cfg).to(device)
    optimizer = build_optimizer(model, cfg.optim, combiner)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
    progress = Progress()
    with session.restored() as directory:
        if directory is not None:
            progress = restore(directory, cfg, model, optimizer, scheduler, combiner, rank, world)
    resumed_from = progress.step
    if directory is not None and rank == 0:
        warn_if_replaying(opts.run_url, step=progress.step, epoch=progress.epoch, micro_batch=progress.micro_batch)
    net = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
    accumulation = cfg.train.accumulation(world)
    hooks = [*_default_hooks(cfg, opts, rank, world, progress, model), *hooks]
    guard = NonFiniteGuard(cfg.train.nonfinite, cfg.train.max_nonfinite_steps, rank=rank, world=world,
                           run_url=opts.run_url)
    window = MetricWindow(cfg.tasks)
    batches: TimedIterator | None = None
    metrics: dict[str, float] = {}
    last_val = math.nan
    try:
        with stop_on_signal():
            while progress.step < cfg.train.max_steps:
                if batches is None:
                    batches, epoch_length = _open_epoch(cfg, progress, rank, world)
                if progress.micro_batch >= epoch_length:
                    _end_epoch(progress, combiner)
                    batches, epoch_length = _open_epoch(cfg, progress, rank, world)
                for hook in hooks:
                    hook.before_step(progress.step)
                start = time.perf_counter()
                wait0, bad0 = batches.wait_seconds, batches.bad_samples
                result = train_step(net, combiner, optimizer, scheduler, batches, tasks=cfg.tasks,
                                    accumulation=accumulation, grad_clip=cfg.optim.grad_clip, device=device,
                                    precision=cfg.train.precision, normalize=cfg.loss.normalize,
                                    on_nonfinite="skip", stop_requested=stop_requested())
                skipped = guard.check(result, step=progress.step + 1, epoch=progress.epoch,
                                      micro_batch=progress.micro_batch, accumulation=accumulation)
                progress.micro_batch += accumulation
                if skipped:
                    progress.nonfinite_steps += 1
                else:
                    progress.step += 1
                    window.add(result, time.perf_counter() - start, batches.wait_seconds - wait0,
                               batches.bad_samples - bad0)
                metrics, last_val = _after_step(cfg, opts, session, hooks, net, model, optimizer, scheduler,
                                                combiner, progress, window, result, epoch_length, resumed_from,
                                                metrics, last_val)
    finally:
        for hook in hooks:
            hook.close()
    return metrics


def _after_step(cfg: Config, opts: LoopOptions, session: Session, hooks: Sequence[Hook], net, model, optimizer,
                scheduler, combiner, progress: Progress, window: "MetricWindow", result: StepResult,
                epoch_length: int, resumed_from: int, metrics: dict[str, float],
                last_val: float) -> tuple[dict[str, float], float]:
    """Report, validate and checkpoint when this step calls for it; after a stop request,
    checkpoint now and raise :class:`~mult.training.interrupts.Preempted`."""
    rank, world, device = session.rank, session.world_size, session.device
    step = progress.step
    if result.skipped and not result.stop:
        return metrics, last_val  # nothing new to report; the window has no entry for it
    is_ckpt = result.stop or step % cfg.train.checkpoint_every == 0 or step == cfg.train.max_steps
    is_val = not result.stop and (is_ckpt or step % cfg.train.val_every == 0)
    if not (is_ckpt or is_val or step % cfg.train.log_every == 0 or progress.micro_batch >= epoch_length):
        return metrics, last_val
    metrics = window.reduce(device, world, progress)
    metrics.update(step=step, epoch=progress.epoch, lr=result.lr, resumed_from_step=resumed_from,
                   nonfinite_steps_total=float(progress.nonfinite_steps))
    if is_val:
        val = validate(cfg, net, device, rank, world, opts.baselines)
        # without validation data the objective falls back to the training loss
        last_val = val.get("val_objective", metrics["loss/total"])
        metrics.update(val)
        progress.val_history.append({"step": step, "objective": last_val})
    metrics["val_objective"] = last_val
    if rank == 0:
        progress.history.append({"step": step, **{k[5:]: v for k, v in metrics.items() if k.startswith("loss/")}})
    with tempfile.TemporaryDirectory(prefix="mult-ckpt-") as tmp:
        directory = None
        if is_ckpt:
            rng = _gather_rng(world)
            if rank == 0:
                directory = _save(Path(tmp), cfg, model, optimizer, scheduler, combiner, progress, rng, metrics,
                                  last_val)
        _report(session, hooks, metrics, directory)
    if result.stop:
        session.flush(metrics)
        reason = stop_reason() or "a stop request on another rank"
        log.warning("rank %d: stopped at step %d after %s; checkpoint written, the run restarts from it",
                    rank, step, reason)
        raise Preempted(f"stopped at step {step} after {reason}; the checkpoint of step {step} was written")
    return metrics, last_val


def _report(session: Session, hooks: Sequence[Hook], metrics: dict[str, Any], directory: Path | None) -> None:
    for hook in hooks:
        hook.before_report(metrics, directory)
    start = time.perf_counter()
    session.report(metrics, directory)
    seconds = time.perf_counter() - start
    for hook in hooks:
        hook.after_report(metrics, seconds)


def _default_hooks(cfg: Config, opts: LoopOptions, rank: int, world: int, progress: Progress,
                   model: torch.nn.Module) -> list[Hook]:
    hooks: list[Hook] = []
    if opts.fault_at_step is not None and rank == min(1, world - 1):
        hooks.append(FaultSwitch(opts.fault_at_step, opts.local_dir, kind=opts.fault_kind, model=model))
    if rank == 0 and opts.telemetry:
        from mult.training.telemetry import RankZeroTelemetry

        upload = opts.run_url if opts.run_url and opts.run_url.startswith("s3://") else None
        hooks.append(RankZeroTelemetry(cfg.metrics, opts.local_dir, progress, upload, skip_files=(FAULT_MARKER,)))
    return hooks


def seed_everything(seed: int, rank: int) -> None:
    """Per-rank Python and NumPy streams (data order), one torch stream (identical initial
    weights on every rank; DDP also broadcasts them)."""
    random.seed(seed * 1000 + rank)
    np.random.seed((seed * 1000 + rank) % 2**32)
    torch.manual_seed(seed)


def _save(directory: Path, cfg: Config, model, optimizer, scheduler, combiner, progress: Progress,
          rng: list[dict[str, Any]], metrics: dict[str, Any], last_val: float) -> Path:
    from mult.training.checkpoint import save_checkpoint

    return save_checkpoint(
        directory, model=model, config=cfg, step=progress.step, optimizer=optimizer, scheduler=scheduler,
        combiner=combiner,
        data_position={"epoch": progress.epoch, "micro_batch": progress.micro_batch,
                       "epoch_sums": progress.epoch_sums},
        rng=rng, counters={"bad_samples": progress.bad_samples, "samples": progress.samples,
                           "nonfinite_steps": progress.nonfinite_steps},
        history=progress.history,
        meta={"val_objective": last_val, "val_history": progress.val_history,
              **{k: v for k, v in metrics.items() if k.startswith(("val/", "delta_m"))}},
    )


def restore(directory: Path, cfg: Config, model, optimizer, scheduler, combiner, rank: int, world: int) -> Progress:
    """Load a checkpoint into the loop's objects; returns the position to continue from."""
    from mult.training import checkpoint as ckpt

    payload = ckpt.load_checkpoint(directory)
    saved = from_dict(payload["config"])
    if saved.model != cfg.model or saved.tasks != cfg.tasks:
        raise ckpt.CheckpointError(
            f"checkpoint {directory} was trained with another model or task list; "
            "resume with the config it was started with"
        )
    model.load_state_dict(payload["model"])
    state = payload.get("state")
    if state is None:
        raise ckpt.CheckpointError(f"checkpoint {directory} has no {ckpt.STATE_FILE}; cannot resume")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    combiner.load_state_dict(state["combiner"])
    rng = state.get("rng") or []
    if len(rng) == world:
        ckpt.restore_rng(rng[rank])
    else:  # a different world size: per-rank streams cannot be matched, reseed from the step
        seed_everything(cfg.train.seed + payload["step"], rank)
    pos = state["data_position"]
    counters = state.get("counters", {})
    meta = ckpt.read_meta(directory)
    progress = Progress(step=int(payload["step"]), epoch=int(pos["epoch"]), micro_batch=int(pos["micro_batch"]),
                        bad_samples=int(counters.get("bad_samples", 0)), samples=int(counters.get("samples", 0)),
                        nonfinite_steps=int(counters.get("nonfinite_steps", 0)),
                        history=list(state.get("history", [])), val_history=list(meta.get("val_history", [])),
                        epoch_sums={t: list(v) for t, v in pos.get("epoch_sums", {}).items()})
    log.info("rank %d resumed from step %d (epoch %d, micro-batch %d)", rank, progress.step, progress.epoch,
             progress.micro_batch)
    return progress


def _open_epoch(cfg: Config, progress: Progress, rank: int, world: int) -> tuple[TimedIterator, int]:
    """The train loader for the current epoch, past the micro-batches already consumed, and the
    epoch's length in micro-batches."""
    from mult.data.loader import build_loader

    loader = build_loader(cfg, "train", rank=rank, world_size=world, epoch=progress.epoch,
                          skip=progress.micro_batch)  # resume mid-epoch: skipped before decoding
    return TimedIterator(loader), loader.steps_per_epoch


def _end_epoch(progress: Progress, combiner) -> None:
    """Hand the epoch's mean task losses (already reduced across ranks) to the combiner (DWA)
    and move to the next epoch."""
    means = {t: s / c for t, (s, c) in progress.epoch_sums.items() if c > 0}
    if means:
        combiner.end_epoch(means)
    progress.epoch_sums = {}
    progress.epoch += 1
    progress.micro_batch = 0


class MetricWindow:
    """Per-rank sums since the last report, reduced across ranks in one all-reduce."""

    def __init__(self, tasks: Sequence[str]) -> None:
        self.tasks = list(tasks)
        self._reset()

    def _reset(self) -> None:
        self.loss = 0.0
        self.task_sums = [0.0] * len(self.tasks)
        self.task_counts = [0.0] * len(self.tasks)
        self.steps = 0
        self.seconds = 0.0
        self.wait = 0.0
        self.samples = 0
        self.bad = 0

    def add(self, result: StepResult, seconds: float, wait: float, bad: int) -> None:
        self.loss += result.loss
        for i, t in enumerate(self.tasks):
            if t in result.task_losses:
                self.task_sums[i] += result.task_losses[t]
                self.task_counts[i] += 1
        self.steps += 1
        self.seconds += seconds
        self.wait += wait
        self.samples += result.samples
        self.bad += bad

    def reduce(self, device: torch.device, world: int, progress: Progress) -> dict[str, float]:
        """Metrics over the window, the same on every rank; adds to ``progress``'s counters."""
        values = [self.loss, *self.task_sums, *self.task_counts, self.wait, self.samples, self.bad]
        flat = torch.tensor(values, dtype=torch.float64, device=device)
        if world > 1 and dist.is_initialized():
            dist.all_reduce(flat)
        flat = flat.cpu().tolist()
        n = len(self.tasks)
        steps = max(1, self.steps)
        out = {"loss/total": flat[0] / (steps * world)}
        for i, t in enumerate(self.tasks):
            total, count = flat[1 + i], flat[1 + n + i]
            if count > 0:
                out[f"loss/{t}"] = total / count
                acc = progress.epoch_sums.setdefault(t, [0.0, 0.0])
                acc[0] += total
                acc[1] += count
        wait, samples, bad = flat[1 + 2 * n:]
        progress.samples += int(samples)
        progress.bad_samples += int(bad)
        out.update(
            samples_per_second=samples / max(self.seconds, 1e-9),
            step_seconds=self.seconds / steps,
            data_wait_seconds=wait / (steps * world),
            bad_samples_total=float(progress.bad_samples),
            samples_total=float(progress.samples),
        )
        self._reset()
        return out


def validate(cfg: Config, model, device: torch.device, rank: int, world: int,
             baselines: dict[str, dict[str, float]] | None = None) -> dict[str, float]:
    """Validation metrics on ``data.val`` reduced across ranks, flattened to
    ``val/<task>/<metric>``, plus ``val_objective`` and (with baselines) ``delta_m``."""
    if cfg.data.val is None:
        return {}
    from mult.data.loader import build_loader
    from mult.metrics import MetricSuite, delta_m
    from mult.training.step import evaluate, weighted_objective

    suite = MetricSuite(cfg.tasks)
    evaluate(model, build_loader(cfg, "val", rank=rank, world_size=world), suite, tasks=cfg.tasks,
             device=device, precision=cfg.train.precision, max_batches=cfg.train.val_batches,
             normalize=cfg.loss.normalize)
    suite.reduce_()
    values = suite.compute()
    out = {f"{VAL_PREFIX}{t}/{m}": v for t, ms in values.items() for m, v in ms.items()}
    present = {t: cfg.weight(t) for t in cfg.tasks if t in values}
    out["val_objective"] = weighted_objective(values, present) if present else math.nan
    if baselines:
        out["delta_m"] = delta_m(values, baselines, [t for t in cfg.tasks if t in values])
    return out


def val_metrics(report: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """A report's ``{"val/normal/loss": 0.3, ...}`` -> ``{"normal": {"loss": 0.3}}`` (other keys ignored)."""
    out: dict[str, dict[str, float]] = {}
    for key, value in report.items():
        if not key.startswith(VAL_PREFIX) or key.count("/") != 2:
            continue
        _, task, metric = key.split("/")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out.setdefault(task, {})[metric] = float(value)
    return out


def _gather_rng(world: int) -> list[dict[str, Any]]:
    from mult.training.checkpoint import capture_rng

    state = capture_rng()
    if world == 1 or not dist.is_initialized():
        return [state]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, state)
    return gathered
