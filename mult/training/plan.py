"""The driver's side of a training run: checks before any worker starts, and the run's identity.

:func:`prepare` checks the whole config, the storage and the data (manifests readable, tasks
present) and settles the run's name and directories in a :class:`RunPlan`; bad input raises
:class:`~mult.config.ConfigError` or :class:`PreflightError` with one clear message. Every
fresh run gets a fresh name ``{train.run_name}-{date}-{time}-{hex}`` because Ray silently
resumes a run whose name it finds in storage; ``resume`` continues the most recent run of that
``run_name`` (or the one named).

Test-only fault switch: ``MULT_FAULT_AT_STEP=N`` in the driver's environment makes rank 1
(rank 0 on one worker) exit hard, send itself SIGTERM or poison one weight
(``MULT_FAULT_KIND=exit|sigterm|nan``), once, when it reaches optimizer step N
(:class:`mult.training.faults.FaultSwitch`).
"""

from __future__ import annotations

import logging
import os
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mult.config import Config, ConfigError, derive
from mult.metrics import Baselines, check_baselines
from mult.training.faults import FAULT_KINDS
from mult.training.loop import LoopOptions

log = logging.getLogger(__name__)

FAULT_ENV = "MULT_FAULT_AT_STEP"
FAULT_KIND_ENV = "MULT_FAULT_KIND"  # exit | sigterm | nan
SMOKE_MAX_STEPS = 4
PREFLIGHT_RETRY_S = 20.0  # how long a pre-flight read may keep failing (storage is down, or the URL is wrong)


class PreflightError(ValueError):
    """Storage, data or resume target unusable; raised in the driver before any worker starts."""


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
    fault_kind: str = "exit"

    @property
    def run_url(self) -> str:
        return f"{self.storage_url.rstrip('/')}/{self.run_name}"

    def loop_options(self) -> LoopOptions:
        """What the workers' loop needs besides the config."""
        return LoopOptions(local_dir=self.local_dir, run_url=self.run_url, baselines=self.baselines,
                           fault_at_step=self.fault_at_step, fault_kind=self.fault_kind)


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
    from mult.data.s3 import s3_client

    bucket = url[len("s3://"):].partition("/")[0]
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS"
    try:
        s3_client(max_attempts=2).head_bucket(Bucket=bucket)
    except Exception as exc:  # botocore raises many unrelated types for one cause: unreachable
        raise PreflightError(
            f"train.storage_path {url!r}: bucket {bucket!r} is not reachable at {endpoint} "
            f"({type(exc).__name__}: {exc}); check the URL, AWS_ENDPOINT_URL and credentials"
        ) from exc
    probe_write(url, "train.storage_path")


def probe_write(url: str, key: str) -> None:
    """Write a small object under ``url`` and delete it: a bucket that can be read but not
    written (a read-only role, a bucket policy, an expired session) fails here, before any
    worker starts, instead of at the first checkpoint hours later."""
    from mult.data.retry import RetryPolicy
    from mult.data.storage import open_storage

    name = f".mult-preflight-{secrets.token_hex(6)}"
    storage = open_storage(url, retry=RetryPolicy(max_retry_s=PREFLIGHT_RETRY_S, timeout_s=PREFLIGHT_RETRY_S))
    try:
        storage.write_bytes(name, b"mult pre-flight write probe; safe to delete\n")
    except Exception as exc:
        raise PreflightError(f"{key} {url!r} is not writable ({type(exc).__name__}: {exc}); checkpoints "
                             "and logs go there: check the credentials' s3:PutObject permission") from exc
    try:
        storage.delete(name)
    except Exception as exc:
        raise PreflightError(f"{key} {url!r}: wrote {name} but could not delete it ({type(exc).__name__}: "
                             f"{exc}); Ray Train deletes old checkpoints there (train.keep_checkpoints): check "
                             "the s3:DeleteObject permission") from exc


def check_shards(url: str, key: str, tasks: list[str]) -> int:
    """Read a shard manifest; refuse tasks no shard has; return its sample count.

    Every stage that trains (train, tune, baselines, ablate) comes through here via
    :func:`prepare`. A task that only some shards have is allowed, with a warning: those
    samples carry no label for it (an all-invalid mask), as for a view whose file was missing.
    """
    from mult.data.retry import RetryPolicy
    from mult.data.samples import read_manifest, task_coverage

    try:
        # a wrong endpoint or bucket should fail in seconds here, not after a training read's bound
        manifest = read_manifest(url, retry=RetryPolicy(max_retry_s=PREFLIGHT_RETRY_S, timeout_s=PREFLIGHT_RETRY_S))
    except Exception as exc:  # missing object, unreachable endpoint, bad JSON: all the same to a user
        raise PreflightError(f"{key}: cannot read the shard manifest at {url!r}: {exc}") from exc
    absent, partial = task_coverage(manifest, tasks)
    if absent:
        raise PreflightError(
            f"{key}: the shards at {url!r} have no {', '.join(absent)} (their tasks: "
            f"{', '.join(manifest['tasks']) or 'none'}); convert with `pipelines.shard --tasks` "
            f"including {'them' if len(absent) > 1 else 'it'}, or leave {'them' if len(absent) > 1 else 'it'} out of `tasks`"
        )
    for task, lacking in partial.items():
        log.warning("%s: %d of %d shard(s) at %s have no %s (e.g. %s); their samples train without it",
                    key, len(lacking), len(manifest["shards"]), url, task, lacking[0])
    return int(manifest["num_samples"])


def list_runs(storage_url: str, prefix: str) -> list[str]:
    """Run directories under the storage root whose names start with ``prefix``."""
    if not storage_url.startswith("s3://"):
        root = Path(storage_url)
        return sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith(prefix)) if root.is_dir() else []
    from mult.data.s3 import s3_client

    bucket, _, key = storage_url[len("s3://"):].partition("/")
    base = f"{key.strip('/')}/" if key.strip("/") else ""
    pages = s3_client().get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=base + prefix, Delimiter="/"
    )
    return sorted(cp["Prefix"][len(base):].rstrip("/") for page in pages for cp in page.get("CommonPrefixes", []))


def _has_checkpoint(storage_url: str, run_name: str) -> bool:
    """Whether the run holds a complete checkpoint; incomplete ones (cut off while saved or
    uploaded) are named in a warning and never count."""
    from mult.training.checkpoint import scan_checkpoints

    complete, incomplete = scan_checkpoints(f"{storage_url.rstrip('/')}/{run_name}")
    for name, reason in incomplete.items():
        log.warning("run %s: skipping incomplete checkpoint %s: %s", run_name, name, reason)
    return bool(complete)


def choose_run_name(cfg: Config, storage_url: str, resume: str | bool) -> str:
    """A fresh unique name, or (``resume``) the stored run to continue."""
    base = cfg.train.run_name
    if not resume:
        return f"{base}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    if isinstance(resume, str):
        name = resume
    else:
        candidates = [n for n in list_runs(storage_url, base + "-") if _has_checkpoint(storage_url, n)]
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
    storage_url = resolve_storage(cfg.train.storage_path)
    check_storage(storage_url)
    samples = check_shards(cfg.data.train, "data.train", cfg.tasks)
    if cfg.data.val is not None:
        check_shards(cfg.data.val, "data.val", cfg.tasks)
    if samples < cfg.train.global_batch_size and cfg.data.steps_per_epoch is None:
        log.warning("data.train has %d samples, fewer than one global batch (%d): samples repeat",
                    samples, cfg.train.global_batch_size)
    baselines = None
    if cfg.train.baselines is not None:
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
    fault_kind = os.environ.get(FAULT_KIND_ENV, "exit")
    if fault_kind not in FAULT_KINDS:
        raise ConfigError(f"{FAULT_KIND_ENV}={fault_kind!r}: choose one of {list(FAULT_KINDS)} (test-only switch)")
    return RunPlan(cfg, run_name, storage_url, local_dir, bool(resume), baselines, fault_at_step, fault_kind)


def smoke_config(cfg: Config) -> Config:
    """Shrink a config to a seconds-long run; generate and shard data when none is named."""
    steps = min(cfg.train.max_steps, SMOKE_MAX_STEPS)
    changes: dict[str, Any] = {
        "train.max_steps": steps, "train.val_every": max(1, steps // 2),
        "train.checkpoint_every": max(1, steps // 2), "train.val_batches": 1, "train.log_every": 1,
        "train.baselines": None, "optim.warmup_steps": min(cfg.optim.warmup_steps, 1),
    }
    if cfg.data.train is None:
        from mult.data.smoke import make_smoke_dataset

        root = f"{resolve_storage(cfg.train.storage_path).rstrip('/')}/smoke-data"
        changes["data.train"], changes["data.val"] = make_smoke_dataset(
            root, size=cfg.model.img_size, seed=cfg.train.seed
        )
    return derive(cfg, changes)


def load_baselines(url: str, tasks: list[str] | None = None) -> Baselines:
    """Single-task baselines ``{task: {metric: value}}`` from a JSON file (path or ``s3://``),
    checked against the task table (:func:`mult.metrics.check_baselines`); with ``tasks``, each
    must have its primary metric. Raises ValueError (OSError when unreadable)."""
    from mult.data.storage import read_json

    return check_baselines(read_json(url), f"baselines {url}", tasks)
