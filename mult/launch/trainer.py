"""The training loop under Ray Train: the ``TorchTrainer``, its storage, and the Ray session.

:func:`build_trainer` turns a :class:`~mult.training.plan.RunPlan` into a ``TorchTrainer``
(DDP: NCCL on GPU, gloo on CPU; sized by ``scaling.*``; checkpoints kept by validation
objective; restarts from the latest checkpoint on a worker failure). Each worker runs
:func:`train_func`: :func:`mult.training.loop.train_loop` with a :class:`RaySession`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
from pathlib import Path
from typing import Any, Iterator

from mult.config import from_dict, to_dict
from mult.data.retry import RetryPolicy
from mult.launch.env import init_ray
from mult.training.plan import RunPlan

log = logging.getLogger(__name__)


def storage_args(storage_url: str, retry: RetryPolicy | None = None) -> dict[str, Any]:
    """Ray's storage arguments for a run or experiment root: a plain path, or an explicit
    pyarrow S3 filesystem with ``storage_path`` as ``bucket/prefix``.

    The explicit filesystem carries ``AWS_ENDPOINT_URL`` to Ray's controller and workers,
    whatever environment they were started with; credentials come from the standard chain.
    It is how Ray Train writes and reads checkpoints, so it retries as ``retry`` asks
    (:class:`RetryingS3FileSystem`).
    """
    if not storage_url.startswith("s3://"):
        return {"storage_path": storage_url}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs: dict[str, Any] = {}
    if endpoint:
        scheme, _, rest = endpoint.partition("://")
        kwargs = {"endpoint_override": rest or scheme, "scheme": scheme if rest else "https"}
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    from mult.launch.s3fs import RetryingS3FileSystem, pyarrow_attempts

    policy = retry or RetryPolicy()
    fs = RetryingS3FileSystem(max_attempts=pyarrow_attempts(policy), connect_timeout=min(10.0, policy.timeout_s),
                              request_timeout=policy.timeout_s, **kwargs)
    return {"storage_path": storage_url[len("s3://"):], "storage_filesystem": fs}


class RaySession:
    """:class:`~mult.training.session.Session` for a Ray Train worker: rank, device and the
    checkpoint to restore from Ray; reports go to ``ray.train.report`` and, on rank 0, to Ray's
    metrics (the dashboard's and Ray's Prometheus export)."""

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
        """The checkpoint to resume from, downloaded once per node.

        Ray's ``as_directory`` shares one temporary download per node among its workers and
        deletes it when the last registered reader leaves; a worker that registers late can
        find it deleted under it (seen here as a truncated ``train_state.pt`` on restore). The
        barrier makes every rank register and finish the download before any rank leaves.
        """
        import ray.train
        import torch.distributed as dist

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as directory:
            if dist.is_available() and dist.is_initialized():
                dist.barrier()
            yield Path(directory)

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        import ray.train

        if self.rank == 0:
            self._to_dashboard(metrics)
        if checkpoint_dir is None:
            ray.train.report(metrics, checkpoint=None)
            return
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(checkpoint_dir)),
                         checkpoint_upload_fn=_persist_verified)

    def _to_dashboard(self, metrics: dict[str, float]) -> None:
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


def _persist_verified(checkpoint: Any, checkpoint_dir_name: str) -> Any:
    """Ray's own upload of a checkpoint, then a check that every file arrived whole.

    pyarrow's ``copy_files`` (what Ray uploads with) does not raise when a file's upload fails
    after its retries: measured with pyarrow 26, the error is only logged ("Error ignored when
    destroying file") and the file is missing, and Ray would register the checkpoint. Raising
    here keeps it unregistered: the worker fails and Ray restarts from the last checkpoint that
    did arrive whole (``train.max_failures``).
    """
    import ray.train

    persisted = ray.train.get_context().get_storage().persist_current_checkpoint(checkpoint, checkpoint_dir_name)
    verify_persisted(Path(checkpoint.path), persisted.filesystem, persisted.path)
    return persisted


def verify_persisted(local_dir: Path, filesystem: Any, path: str) -> None:
    """Raise :class:`~mult.training.checkpoint.CheckpointError` unless every file that
    ``local_dir``'s ``complete.json`` lists is at ``path`` on ``filesystem`` with its size."""
    import pyarrow.fs

    from mult.training.checkpoint import COMPLETE_FILE, CheckpointError, why_incomplete

    infos = filesystem.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
    files = {info.base_name: info.size for info in infos if info.type == pyarrow.fs.FileType.File}
    reason = why_incomplete(files, (local_dir / COMPLETE_FILE).read_bytes())
    if reason:
        raise CheckpointError(f"checkpoint upload to {path} is incomplete: {reason}; the upload's "
                              "retries gave up (data.storage_retry_s), so it is not registered")


def train_func(loop_config: dict[str, Any]) -> None:
    """Ray Train's per-worker entry point."""
    from mult.training.loop import LoopOptions, train_loop

    _worker_logging()
    options = LoopOptions(**{**loop_config["options"], "local_dir": Path(loop_config["options"]["local_dir"])})
    train_loop(from_dict(loop_config["config"]), RaySession(), options)


def _worker_logging() -> None:
    """INFO for this project's loggers only (the root stays quiet: Ray logs every report at INFO)."""
    logger = logging.getLogger("mult")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


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
    options = dataclasses.asdict(plan.loop_options())
    options["local_dir"] = str(options["local_dir"])
    return TorchTrainer(
        train_func,
        train_loop_config={"config": to_dict(cfg), "options": options},
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources),
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
            **storage_args(plan.storage_url, retry=RetryPolicy.from_config(cfg.data)),
        ),
    )


def fit(plan: RunPlan, callbacks: list | None = None):
    """Join Ray (or start it) and run the trainer; returns Ray's ``Result``."""
    # The job-wide runtime env (S3 endpoint, RAY_ADDRESS) reaches the Train controller and its
    # placement-group cleaner too, not only the workers; a new local instance gets the dashboard.
    init_ray(local_dashboard=True)
    log.info("%s run %s -> %s (local files in %s)",
             "resuming" if plan.resume else "starting", plan.run_name, plan.run_url, plan.local_dir)
    return build_trainer(plan, callbacks).fit()
