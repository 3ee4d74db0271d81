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

    def flush(self, metrics: dict[str, float]) -> None:
        """One more report, without a checkpoint. Ray Train's per-worker result queue holds one
        report, so this returns only after the controller has taken the previous one (and
        registered its checkpoint); a worker that raised right after its checkpoint report
        could otherwise fail the group before the controller saw the checkpoint, and the
        restart would begin from an older one (seen here: from step 0)."""
        import ray.train

        ray.train.report(metrics)

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


def _install_stop_handler() -> bool:
    from mult.training.interrupts import install_stop_handler

    return install_stop_handler()


def torch_config(backend: str):
    """Ray's ``TorchConfig`` whose backend also installs the SIGTERM stop handler
    (:mod:`mult.training.interrupts`) in every worker actor when the group starts.

    The training function runs in a thread of the actor, where Python cannot install signal
    handlers; the backend's ``on_training_start`` runs ``worker_group.execute`` in the actors'
    main threads, where it can. Without it SIGTERM kills the worker mid-step (Ray's handler).
    """
    from ray.train.torch import TorchConfig

    base = TorchConfig().backend_cls

    class _StopOnSigtermBackend(base):  # type: ignore[misc, valid-type]
        def on_training_start(self, worker_group, backend_config) -> None:
            super().on_training_start(worker_group, backend_config)
            installed = worker_group.execute(_install_stop_handler)
            if not all(installed):
                log.warning("the SIGTERM stop handler could not be installed on %d of %d workers: SIGTERM "
                            "kills those mid-step", installed.count(False), len(installed))

    class _TorchConfig(TorchConfig):
        @property
        def backend_cls(self):
            return _StopOnSigtermBackend

    return _TorchConfig(backend=backend)


def build_trainer(plan: RunPlan, callbacks: list | None = None, controller_failure_limit: int = -1):
    """The ``TorchTrainer`` for a prepared plan (Tune wraps this, adding its callback).

    ``controller_failure_limit``: controller errors (e.g. a worker group that cannot be placed)
    tolerated before the run fails; -1 (Ray's default) retries forever. Tune trials set it.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = plan.cfg
    s = cfg.scaling
    resources = worker_resources(cfg)
    options = dataclasses.asdict(plan.loop_options())
    options["local_dir"] = str(options["local_dir"])
    return TorchTrainer(
        train_func,
        train_loop_config={"config": to_dict(cfg), "options": options},
        torch_config=torch_config("nccl" if s.use_gpu else "gloo"),
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


def worker_resources(cfg) -> dict[str, float]:
    """One training worker's Ray resources."""
    s = cfg.scaling
    resources = {"CPU": s.cpus_per_worker}
    if s.use_gpu:
        resources["GPU"] = s.gpus_per_worker
    return resources


def wait_for_placement(cfg, timeout_s: float) -> None:
    """Reserve the workers' resources once, as Ray Train will (one bundle per worker), and give
    them back; :class:`~mult.training.plan.PreflightError` naming what is missing when that
    does not happen within ``timeout_s``. Ray Train itself would wait forever for a request the
    cluster can never place."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from mult.training.plan import PreflightError

    n, resources = cfg.scaling.num_workers, worker_resources(cfg)
    group = placement_group([dict(resources) for _ in range(n)], strategy="PACK")
    try:
        ready, _ = ray.wait([group.ready()], timeout=timeout_s)
        if not ready:
            raise PreflightError(
                f"could not place {n} training worker(s) x {resources} within scaling.placement_timeout_s="
                f"{timeout_s:g} s; the cluster has {ray.cluster_resources()} in all, {ray.available_resources()} "
                "free now. Lower scaling.num_workers, scaling.cpus_per_worker or scaling.gpus_per_worker, add "
                "nodes, or raise scaling.placement_timeout_s while an autoscaler is still adding them")
    finally:
        remove_placement_group(group)


def fit(plan: RunPlan, callbacks: list | None = None):
    """Join Ray (or start it), check that the workers can be placed, and run the trainer;
    returns Ray's ``Result``."""
    # The job-wide runtime env (S3 endpoint, RAY_ADDRESS) reaches the Train controller and its
    # placement-group cleaner too, not only the workers; a new local instance gets the dashboard.
    init_ray(local_dashboard=True)
    wait_for_placement(plan.cfg, plan.cfg.scaling.placement_timeout_s)
    log.info("%s run %s -> %s (local files in %s)",
             "resuming" if plan.resume else "starting", plan.run_name, plan.run_url, plan.local_dir)
    return build_trainer(plan, callbacks).fit()
