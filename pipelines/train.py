"""The training stage: MulT under Ray Train (DDP), checkpoints in the run's storage, metrics out.

    python -m pipelines.train --config configs/cpu-small.yaml [key=value ...] [--smoke-test]
    python -m pipelines.train --config configs/cpu-small.yaml --resume [RUN_NAME]

Runs the same locally (a local Ray, or ``RAY_ADDRESS``) and under
``ray job submit --working-dir . -- python -m pipelines.train ...``.

The driver checks the whole config, the storage and the data (manifests readable, tasks
present) before any Ray worker starts; bad input exits with code 2 and one clear message.
Every fresh run gets a fresh name ``{train.run_name}-{date}-{time}-{hex}`` because Ray
silently resumes a run whose name it finds in storage; ``--resume`` continues the most recent
run of that ``run_name`` (or the one named).

The worker loop (:func:`train_loop`) talks to Ray only through a small session object, so
``bench/ddp.py`` runs the very same loop under plain ``torchrun``.

Test-only fault switch: ``MULT_FAULT_AT_STEP=N`` in the driver's environment makes rank 1
(rank 0 on one worker) exit hard, once, when it reaches optimizer step N; a marker file in
the run's local directory keeps it from firing again after the restart.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import secrets
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol

from mult.config import Config, ConfigError, from_dict, load_config, to_dict
from pipelines.raysetup import init_ray

log = logging.getLogger("mult.train")

FAULT_ENV = "MULT_FAULT_AT_STEP"
FAULT_MARKER = "fault_fired"
SMOKE_MAX_STEPS = 4


class PreflightError(ValueError):
    """Storage, data or resume target unusable; raised in the driver before any worker starts."""


# =============================================================================================
# Driver: checks, run naming, the TorchTrainer.
# =============================================================================================
@dataclass
class RunPlan:
    """Everything the driver settled before starting Ray Train."""

    cfg: Config
    run_name: str
    storage_url: str  # absolute local directory or s3://bucket/prefix
    local_dir: Path  # rank 0's TensorBoard / loss curve / metrics address
    resume: bool
    baselines: dict[str, dict[str, float]] | None = None
    fault_at_step: int | None = None
    data_samples: int = 0

    @property
    def run_url(self) -> str:
        return f"{self.storage_url.rstrip('/')}/{self.run_name}"


def resolve_storage(url: str) -> str:
    """``s3://...`` stays; a local path becomes absolute (Ray workers have other cwds)."""
    if url.startswith("s3://"):
        bucket = url[len("s3://"):].partition("/")[0]
        if not bucket:
            raise ConfigError(f"train.storage_path: {url!r} has no bucket; expected s3://bucket/prefix")
        return url.rstrip("/")
    if "://" in url:
        raise ConfigError(f"train.storage_path: {url!r}: use a local directory or s3://bucket/prefix")
    return str(Path(url).expanduser().resolve())


def check_storage(url: str) -> None:
    """Writable local directory, or an S3 bucket that answers; else :class:`PreflightError`."""
    if not url.startswith("s3://"):
        path = Path(url)
        try:
            path.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
                pass
        except OSError as exc:
            raise PreflightError(f"train.storage_path {url!r} is not a writable directory: {exc}") from exc
        return
    from mult.data.storage import s3_client

    bucket = url[len("s3://"):].partition("/")[0]
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS"
    try:
        s3_client(max_attempts=2).head_bucket(Bucket=bucket)
    except Exception as exc:  # botocore raises many unrelated types for one cause: unreachable
        raise PreflightError(
            f"train.storage_path {url!r}: bucket {bucket!r} is not reachable at {endpoint} "
            f"({type(exc).__name__}: {exc}); check the URL, AWS_ENDPOINT_URL and credentials"
        ) from exc


def _manifest_info(url: str, key: str, tasks: list[str]) -> int:
    """Read a shard manifest; check it has the tasks; return its sample count."""
    from mult.data.loader import read_manifest

    try:
        manifest = read_manifest(url)
    except Exception as exc:  # missing object, unreachable endpoint, bad JSON: all the same to a user
        raise PreflightError(f"{key}: cannot read the shard manifest at {url!r}: {exc}") from exc
    have = _get(manifest, "tasks")
    if have is not None:
        missing = [t for t in tasks if t not in have]
        if missing:
            raise PreflightError(f"{key}: shards at {url!r} lack tasks {missing}; they have {list(have)}")
    count = _get(manifest, "num_samples")
    if count is None:
        shards = _get(manifest, "shards") or []
        count = sum(int(_get(s, "samples") or _get(s, "num_samples") or 0) for s in shards)
    return int(count)


def _get(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


def _run_names(storage_url: str, prefix: str) -> list[str]:
    """Run directories under the storage root whose names start with ``prefix``."""
    if not storage_url.startswith("s3://"):
        root = Path(storage_url)
        return sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith(prefix)) if root.is_dir() else []
    from mult.data.storage import s3_client

    bucket, _, key = storage_url[len("s3://"):].partition("/")
    base = f"{key.strip('/')}/" if key.strip("/") else ""
    pages = s3_client().get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=base + prefix, Delimiter="/"
    )
    return sorted(cp["Prefix"][len(base):].rstrip("/") for page in pages for cp in page.get("CommonPrefixes", []))


def _has_checkpoint(storage_url: str, run_name: str) -> bool:
    from mult.data.storage import open_storage

    names = open_storage(f"{storage_url.rstrip('/')}/{run_name}").list("")
    return any(n.startswith("checkpoint_") and n.endswith("/model.pt") for n in names)


def choose_run_name(cfg: Config, storage_url: str, resume: str | bool) -> str:
    """A fresh unique name, or (``resume``) the stored run to continue."""
    base = cfg.train.run_name
    if not resume:
        return f"{base}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    if isinstance(resume, str):
        name = resume
    else:
        candidates = [n for n in _run_names(storage_url, base + "-") if _has_checkpoint(storage_url, n)]
        if not candidates:
            raise PreflightError(
                f"--resume: no run of train.run_name {base!r} with a checkpoint under {storage_url!r}"
            )
        name = candidates[-1]  # names sort by their timestamp
    if not _has_checkpoint(storage_url, name):
        raise PreflightError(f"--resume: run {name!r} has no checkpoint under {storage_url!r}")
    return name


def prepare(cfg: Config, *, resume: str | bool = False) -> RunPlan:
    """All driver-side checks; raises :class:`ConfigError` / :class:`PreflightError`."""
    if cfg.data.train is None:
        raise ConfigError("data.train: no training shards configured (set data.train=URL or use --smoke-test)")
    if cfg.model.img_size != cfg.data.image_size:
        raise ConfigError(
            f"data.image_size ({cfg.data.image_size}) must equal model.img_size ({cfg.model.img_size})"
        )
    storage_url = resolve_storage(cfg.train.storage_path)
    check_storage(storage_url)
    samples = _manifest_info(cfg.data.train, "data.train", cfg.tasks)
    if cfg.data.val is not None:
        _manifest_info(cfg.data.val, "data.val", cfg.tasks)
    if samples < cfg.train.global_batch_size and cfg.data.steps_per_epoch is None:
        log.warning("data.train has %d samples, fewer than one global batch (%d): samples repeat",
                    samples, cfg.train.global_batch_size)
    baselines = None
    if cfg.train.baselines is not None:
        from mult.metrics import load_baselines

        try:
            baselines = load_baselines(cfg.train.baselines, cfg.tasks)
        except (OSError, ValueError) as exc:
            raise PreflightError(f"train.baselines: {exc}") from exc
    run_name = choose_run_name(cfg, storage_url, resume)
    if storage_url.startswith("s3://"):
        root = Path(cfg.metrics.local_dir or "~/.cache/mult/runs").expanduser().resolve()
        local_dir = root / run_name
    else:
        local_dir = Path(storage_url) / run_name
    fault = os.environ.get(FAULT_ENV)
    try:
        fault_at_step = int(fault) if fault else None
    except ValueError:
        raise ConfigError(f"{FAULT_ENV}={fault!r}: must be an integer step (test-only switch)") from None
    return RunPlan(cfg, run_name, storage_url, local_dir, bool(resume), baselines, fault_at_step, samples)


def _storage_args(storage_url: str) -> dict[str, Any]:
    """RunConfig storage arguments: a plain path, or an explicit pyarrow S3 filesystem.

    The explicit filesystem carries ``AWS_ENDPOINT_URL`` to Ray's controller and workers,
    whatever environment they were started with; credentials come from the standard chain.
    """
    if not storage_url.startswith("s3://"):
        return {"storage_path": storage_url}
    import pyarrow.fs

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs: dict[str, Any] = {}
    if endpoint:
        scheme, _, rest = endpoint.partition("://")
        kwargs = {"endpoint_override": rest or scheme, "scheme": scheme if rest else "https"}
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    return {
        "storage_path": storage_url[len("s3://"):],
        "storage_filesystem": pyarrow.fs.S3FileSystem(**kwargs),
    }


def build_trainer(plan: RunPlan, callbacks: list | None = None, controller_failure_limit: int = -1):
    """The ``TorchTrainer`` for a prepared plan (Tune wraps this, adding its callback).

    ``controller_failure_limit``: controller errors (e.g. a worker group that cannot be placed)
    tolerated before the run fails; -1 (Ray's default) retries forever. Tune trials set it.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = plan.cfg
    s = cfg.scaling
    resources = {"CPU": s.cpus_per_worker}
    if s.use_gpu:
        resources["GPU"] = s.gpus_per_worker
    loop_config = {
        "config": to_dict(cfg),
        "run_name": plan.run_name,
        "run_url": plan.run_url,
        "local_dir": str(plan.local_dir),
        "baselines": plan.baselines,
        "fault_at_step": plan.fault_at_step,
        "data_samples": plan.data_samples,
    }
    return TorchTrainer(
        train_func,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=plan.run_name,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures,
                                         controller_failure_limit=controller_failure_limit),
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.train.keep_checkpoints,
                checkpoint_score_attribute="val_objective",
                checkpoint_score_order="min",
            ),
            callbacks=callbacks,
            **_storage_args(plan.storage_url),
        ),
    )


def apply_smoke_test(cfg: Config) -> Config:
    """Shrink a config to a seconds-long run; generate and shard data when none is named."""
    data = to_dict(cfg)
    t = data["train"]
    t["max_steps"] = min(t["max_steps"], SMOKE_MAX_STEPS)
    t["val_every"] = t["checkpoint_every"] = max(1, t["max_steps"] // 2)
    t["val_batches"] = 1
    t["log_every"] = 1
    t["baselines"] = None
    data["optim"]["warmup_steps"] = min(data["optim"]["warmup_steps"], 1)
    if cfg.data.train is None:
        from mult.smoke import make_smoke_dataset

        root = f"{resolve_storage(cfg.train.storage_path).rstrip('/')}/smoke-data"
        data["data"]["train"], data["data"]["val"] = make_smoke_dataset(
            root, size=cfg.data.image_size, seed=cfg.train.seed
        )
    return from_dict(data)


def fit(plan: RunPlan, callbacks: list | None = None):
    """Start Ray if needed and run the trainer; returns Ray's ``Result``."""
    # The job-wide runtime env (S3 endpoint, RAY_ADDRESS) reaches the Train controller and its
    # placement-group cleaner too, not only the workers; a new local instance gets the dashboard.
    init_ray(local_dashboard=True)
    log.info("%s run %s -> %s (local files in %s)",
             "resuming" if plan.resume else "starting", plan.run_name, plan.run_url, plan.local_dir)
    return build_trainer(plan, callbacks).fit()


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="experiment YAML (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=10")
    parser.add_argument("--smoke-test", action="store_true",
                        help=f"at most {SMOKE_MAX_STEPS} steps; generates and shards tiny data if none is configured")
    parser.add_argument("--resume", nargs="?", const=True, default=False, metavar="RUN_NAME",
                        help="continue the latest run of train.run_name (or RUN_NAME) from its last checkpoint")
    parser.add_argument("--summary", default=None, metavar="PATH",
                        help="write a JSON summary (run name, run URL, final metrics, checkpoint) here")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = get_args_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        resolve_storage(cfg.train.storage_path)
        if args.smoke_test:
            check_storage(resolve_storage(cfg.train.storage_path))
            cfg = apply_smoke_test(cfg)
        plan = prepare(cfg, resume=args.resume)
    except (ConfigError, PreflightError) as exc:
        log.error("%s", exc)
        return 2
    result = fit(plan)
    if result.error is not None:
        log.error("run %s failed: %s", plan.run_name, result.error)
        return 1
    metrics = result.metrics or {}
    checkpoint = result.checkpoint.path if result.checkpoint else None
    log.info("run %s finished at step %s: loss %.4g, val_objective %.4g; checkpoint %s",
             plan.run_name, metrics.get("step"), metrics.get("loss/total", math.nan),
             metrics.get("val_objective", math.nan), checkpoint)
    if args.summary:
        summary = {
            "run_name": plan.run_name,
            "run_url": plan.run_url,
            "local_dir": str(plan.local_dir),
            "checkpoint": checkpoint,
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))},
        }
        Path(args.summary).parent.mkdir(parents=True, exist_ok=True)
        Path(args.summary).write_text(json.dumps(summary, indent=2, default=str))
    return 0


# =============================================================================================
# Worker side: the loop, with Ray behind a small session interface.
# =============================================================================================
class Session(Protocol):
    """What the loop needs from its launcher (Ray Train, or torchrun in the benchmark)."""

    rank: int
    world_size: int
    device: Any

    def restored(self) -> contextlib.AbstractContextManager[Path | None]: ...

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None: ...


class RaySession:
    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self._gauges: dict[str, Any] | None = None

    @contextlib.contextmanager
    def restored(self) -> Iterator[Path | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as directory:
            yield Path(directory)

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        import ray.train

        if self.rank == 0:
            self._to_dashboard(metrics)
        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    def _to_dashboard(self, metrics: dict[str, float]) -> None:
        """The same numbers as Ray metrics (the dashboard's and Ray's Prometheus export)."""
        from ray.util.metrics import Gauge

        if self._gauges is None:
            names = ("samples_per_second", "step_seconds", "data_wait_seconds", "bad_samples_total", "step")
            self._gauges = {n: Gauge(f"mult_train_{n}", f"MulT training {n}") for n in names}
            self._gauges["loss"] = Gauge("mult_train_loss", "MulT training loss", tag_keys=("task",))
            self._gauges["val_objective"] = Gauge("mult_val_objective", "MulT validation objective")
        for name, gauge in self._gauges.items():
            if name == "loss":
                for key, value in metrics.items():
                    if key.startswith("loss/"):
                        gauge.set(value, tags={"task": key[len("loss/"):]})
            elif name in metrics and math.isfinite(metrics[name]):
                gauge.set(metrics[name])


def train_func(loop_config: dict[str, Any]) -> None:
    """Ray Train's per-worker entry point."""
    _worker_logging()
    train_loop(from_dict(loop_config["config"]), RaySession(), LoopOptions.from_dict(loop_config))


def _worker_logging() -> None:
    """INFO for this project's loggers only (the root stays quiet: Ray logs every report at INFO)."""
    logger = logging.getLogger("mult")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


@dataclass
class LoopOptions:
    local_dir: Path
    run_url: str | None = None  # the run in storage; telemetry is copied there when it is on S3
    baselines: dict[str, dict[str, float]] | None = None
    fault_at_step: int | None = None
    data_samples: int = 0
    telemetry: bool = True  # rank 0 serves Prometheus, writes TensorBoard and the PNG

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LoopOptions":
        return cls(Path(d["local_dir"]), d.get("run_url"), d.get("baselines"), d.get("fault_at_step"),
                   int(d.get("data_samples") or 0))


@dataclass
class Progress:
    """The loop's position; saved in every checkpoint."""

    step: int = 0
    epoch: int = 0
    micro_batch: int = 0  # micro-batches consumed in this epoch, on every rank
    bad_samples: int = 0  # summed over ranks
    samples: int = 0  # summed over ranks
    history: list[dict[str, float]] = field(default_factory=list)  # rank 0's loss curve rows
    val_history: list[dict[str, float]] = field(default_factory=list)
    epoch_sums: dict[str, list[float]] = field(default_factory=dict)  # task -> [sum, count]


def train_loop(cfg: Config, session: Session, opts: LoopOptions) -> dict[str, float]:
    """Train ``cfg`` to ``train.max_steps`` on this rank; returns the last reported metrics."""
    import torch

    from mult import build_model
    from mult import checkpoint as ckpt
    from mult import engine
    from mult.losses import build_loss_combiner

    rank, world, device = session.rank, session.world_size, session.device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    _seed(cfg.train.seed, rank)
    model = build_model(cfg).to(device)
    combiner = build_loss_combiner(cfg).to(device)
    optimizer = engine.build_optimizer(model, cfg.optim, combiner)
    scheduler = engine.build_scheduler(optimizer, warmup_steps=cfg.optim.warmup_steps,
                                       max_steps=cfg.train.max_steps, min_lr_ratio=cfg.optim.min_lr_ratio)
    progress = Progress()
    with session.restored() as directory:
        if directory is not None:
            progress = _restore(directory, cfg, model, optimizer, scheduler, combiner, rank, world)
    resumed_from = progress.step
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    else:
        net = model
    accumulation = engine.accumulation_steps(cfg.train.global_batch_size, cfg.train.micro_batch_size, world)
    steps_per_epoch = cfg.data.steps_per_epoch or max(1, opts.data_samples // cfg.train.global_batch_size)
    loader_steps = steps_per_epoch * accumulation
    telemetry = _Telemetry(cfg, opts, progress) if rank == 0 and opts.telemetry else None
    batches: engine.TimedIterator | None = None
    window = _Window(cfg.tasks)
    metrics: dict[str, float] = {}
    last_val: float = math.nan
    try:
        while progress.step < cfg.train.max_steps:
            if batches is None or progress.micro_batch >= loader_steps:
                if batches is not None:
                    _end_epoch(progress, combiner, device)
                batches = _open_epoch(cfg, progress, loader_steps, rank, world)
            _maybe_fault(opts, progress.step, rank, world)
            start = time.perf_counter()
            wait0, bad0 = batches.wait_seconds, batches.bad_samples
            result = engine.train_step(net, combiner, optimizer, scheduler, batches, tasks=cfg.tasks,
                                       accumulation=accumulation, grad_clip=cfg.optim.grad_clip,
                                       device=device, precision=cfg.train.precision)
            progress.step += 1
            progress.micro_batch += accumulation
            window.add(result, time.perf_counter() - start, batches.wait_seconds - wait0,
                       batches.bad_samples - bad0)
            step = progress.step
            last = step == cfg.train.max_steps
            is_ckpt = step % cfg.train.checkpoint_every == 0 or last
            is_val = is_ckpt or step % cfg.train.val_every == 0
            epoch_end = progress.micro_batch >= loader_steps
            if not (is_val or step % cfg.train.log_every == 0 or epoch_end):
                continue
            metrics = window.reduce(device, world, progress)
            metrics.update(step=step, epoch=progress.epoch, lr=result.lr, resumed_from_step=resumed_from)
            if is_val:
                val = _validate(cfg, net, device, rank, world, opts)
                # without validation data the objective falls back to the training loss
                last_val = val.get("val_objective", metrics["loss/total"])
                metrics.update(val)
                progress.val_history.append({"step": step, "objective": last_val})
            metrics["val_objective"] = last_val
            if rank == 0:
                progress.history.append({"step": step, **{k[5:]: v for k, v in metrics.items() if k.startswith("loss/")}})
            if telemetry is not None:
                telemetry.update(metrics, is_val)
            if is_ckpt:
                rng = _gather_rng(world)
                with tempfile.TemporaryDirectory(prefix="mult-ckpt-") as tmp:
                    directory = None
                    if rank == 0:
                        directory = ckpt.save_checkpoint(
                            tmp, model=model, config=cfg, step=step, optimizer=optimizer,
                            scheduler=scheduler, combiner=combiner,
                            data_position={"epoch": progress.epoch, "micro_batch": progress.micro_batch,
                                           "epoch_sums": progress.epoch_sums},
                            rng=rng, counters={"bad_samples": progress.bad_samples, "samples": progress.samples},
                            history=progress.history,
                            meta={"val_objective": last_val, "val_history": progress.val_history,
                                  **{k: v for k, v in metrics.items() if k.startswith(("val/", "delta_m"))}},
                        )
                        if telemetry is not None:
                            telemetry.flush(progress)
                    session.report(metrics, directory)
            else:
                session.report(metrics, None)
    finally:
        if telemetry is not None:
            telemetry.close(progress)
    return metrics


def _seed(seed: int, rank: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed * 1000 + rank)
    np.random.seed((seed * 1000 + rank) % 2**32)
    torch.manual_seed(seed)  # identical initial weights on every rank (DDP also broadcasts)


def _restore(directory: Path, cfg: Config, model, optimizer, scheduler, combiner, rank: int, world: int) -> Progress:
    from mult import checkpoint as ckpt

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
        _seed(cfg.train.seed + payload["step"], rank)
    pos = state["data_position"]
    counters = state.get("counters", {})
    meta = ckpt.read_meta(directory)
    progress = Progress(step=int(payload["step"]), epoch=int(pos["epoch"]), micro_batch=int(pos["micro_batch"]),
                        bad_samples=int(counters.get("bad_samples", 0)), samples=int(counters.get("samples", 0)),
                        history=list(state.get("history", [])), val_history=list(meta.get("val_history", [])),
                        epoch_sums={t: list(v) for t, v in pos.get("epoch_sums", {}).items()})
    log.info("rank %d resumed from step %d (epoch %d, micro-batch %d)", rank, progress.step, progress.epoch,
             progress.micro_batch)
    return progress


def _open_epoch(cfg: Config, progress: Progress, loader_steps: int, rank: int, world: int):
    """The train loader for the current epoch, advanced past the batches already consumed."""
    from mult.data.loader import make_loader
    from mult.engine import TimedIterator

    if progress.micro_batch >= loader_steps:
        progress.epoch += 1
        progress.micro_batch = 0
    loader = make_loader(
        cfg.data.train, tasks=cfg.tasks, image_size=cfg.data.image_size,
        batch_size=cfg.train.micro_batch_size, mode="train", steps_per_epoch=loader_steps,
        rank=rank, world_size=world, num_workers=cfg.data.num_workers, seed=cfg.train.seed,
        epoch=progress.epoch, shuffle_buffer=cfg.data.shuffle_buffer, hflip=cfg.data.hflip,
        bad_sample_policy=cfg.data.bad_sample_policy,
        skip=progress.micro_batch,  # resume mid-epoch: the loader drops those before decoding
    )
    return TimedIterator(loader)


def _end_epoch(progress: Progress, combiner, device) -> None:
    """Hand the epoch's mean task losses (already reduced across ranks) to the combiner (DWA)."""
    means = {t: s / c for t, (s, c) in progress.epoch_sums.items() if c > 0}
    if means:
        combiner.end_epoch(means)
    progress.epoch_sums = {}


class _Window:
    """Per-rank sums since the last report, reduced across ranks in one all-reduce."""

    def __init__(self, tasks: list[str]) -> None:
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

    def add(self, result, seconds: float, wait: float, bad: int) -> None:
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

    def reduce(self, device, world: int, progress: Progress) -> dict[str, float]:
        import torch
        import torch.distributed as dist

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


def _validate(cfg: Config, net, device, rank: int, world: int, opts: LoopOptions) -> dict[str, float]:
    """Validation metrics reduced across ranks, flattened to ``val/<task>/<metric>``."""
    from mult.engine import evaluate, weighted_objective
    from mult.metrics import MetricSuite, delta_m

    if cfg.data.val is None:
        return {}
    from mult.data.loader import make_loader

    loader = make_loader(
        cfg.data.val, tasks=cfg.tasks, image_size=cfg.data.image_size,
        batch_size=cfg.train.micro_batch_size, mode="eval", steps_per_epoch=None,
        rank=rank, world_size=world, num_workers=cfg.data.num_workers, seed=cfg.train.seed,
        epoch=0, shuffle_buffer=cfg.data.shuffle_buffer, hflip=False,
        bad_sample_policy=cfg.data.bad_sample_policy,
    )
    suite = MetricSuite(cfg.tasks)
    evaluate(net, loader, suite, tasks=cfg.tasks, device=device, precision=cfg.train.precision,
             max_batches=cfg.train.val_batches)
    suite.reduce_()
    values = suite.compute()
    out = {f"val/{t}/{m}": v for t, ms in values.items() for m, v in ms.items()}
    present = {t: cfg.weight(t) for t in cfg.tasks if t in values}
    out["val_objective"] = weighted_objective(values, present) if present else math.nan
    if opts.baselines:
        out["delta_m"] = delta_m(values, opts.baselines, [t for t in cfg.tasks if t in values])
    return out


def _gather_rng(world: int) -> list[dict[str, Any]]:
    import torch.distributed as dist

    from mult.checkpoint import capture_rng

    state = capture_rng()
    if world == 1 or not dist.is_initialized():
        return [state]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, state)
    return gathered


def _maybe_fault(opts: LoopOptions, step: int, rank: int, world: int) -> None:
    """The test-only fault switch (``MULT_FAULT_AT_STEP``): a hard exit, once."""
    if opts.fault_at_step is None or step != opts.fault_at_step or rank != min(1, world - 1):
        return
    marker = opts.local_dir / FAULT_MARKER
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(step))
    log.error("%s=%d: rank %d exits hard (test-only fault switch)", FAULT_ENV, step, rank)
    os._exit(17)


class _Telemetry:
    """Rank 0's Prometheus endpoint, TensorBoard writer and loss-curve PNG."""

    def __init__(self, cfg: Config, opts: LoopOptions, progress: Progress) -> None:
        from mult.telemetry import ADDRESS_FILE, PrometheusExporter, TensorBoardLogger, TENSORBOARD_DIR

        self.dir = opts.local_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.upload_url = opts.run_url if opts.run_url and opts.run_url.startswith("s3://") else None
        m = cfg.metrics
        self.exporter = None
        if m.prometheus_port is not None or m.pushgateway:
            self.exporter = PrometheusExporter(
                m.prometheus_host, m.prometheus_port, pushgateway=m.pushgateway,
                grouping_key={"run": self.dir.name}, address_file=self.dir / ADDRESS_FILE,
            )
            self.exporter.set_bad_samples_base(progress.bad_samples)
        self.tb = TensorBoardLogger(self.dir / TENSORBOARD_DIR) if m.tensorboard else None

    def update(self, metrics: dict[str, float], validated: bool) -> None:
        from mult.telemetry import TrainSnapshot

        if self.exporter is not None:
            self.exporter.update(TrainSnapshot(
                step=int(metrics["step"]), samples_per_second=metrics["samples_per_second"],
                step_seconds=metrics["step_seconds"], data_wait_seconds=metrics["data_wait_seconds"],
                losses={k[5:]: v for k, v in metrics.items() if k.startswith("loss/")},
                bad_samples_total=int(metrics["bad_samples_total"]),
            ))
            if validated and math.isfinite(metrics.get("val_objective", math.nan)):
                self.exporter.update_validation(metrics["val_objective"])
        if self.tb is not None:
            scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
            scalars = {k: v for k, v in scalars.items() if k not in ("step", "epoch", "resumed_from_step")}
            self.tb.log(int(metrics["step"]), scalars)

    def flush(self, progress: Progress) -> None:
        """Draw the loss curve; copy the telemetry files to S3 storage."""
        from mult.telemetry import LOSS_CURVE_FILE, plot_loss_curve

        if progress.history:
            plot_loss_curve(progress.history, self.dir / LOSS_CURVE_FILE, progress.val_history)
        if self.upload_url is None:
            return
        from mult.data.storage import StorageError, open_storage

        storage = open_storage(self.upload_url)
        for path in self.dir.rglob("*"):
            if path.is_file() and path.name != FAULT_MARKER:
                try:
                    storage.upload_file(path, path.relative_to(self.dir).as_posix())
                except StorageError as exc:
                    log.warning("could not copy %s to %s: %s", path, self.upload_url, exc)

    def close(self, progress: Progress) -> None:
        try:
            self.flush(progress)
        finally:
            if self.tb is not None:
                self.tb.close()
            if self.exporter is not None:
                self.exporter.close()


if __name__ == "__main__":
    sys.exit(main())
