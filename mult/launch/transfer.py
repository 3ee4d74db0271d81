"""Evaluation on Ray: each part of a set (one rank's share of its shards) and each fine-tuning
is a Ray task (one GPU each when the cluster has GPUs); the driver sums the parts' metric
states (:func:`mult.experiments.transfer.sum_states`), which gives exactly the numbers of one
process over all the data."""

from __future__ import annotations

import logging
from typing import Any

import torch

from mult.experiments.transfer import EvalOutput, run_finetune, run_part

log = logging.getLogger(__name__)


def _ray_part(model, url, tasks, opts, rank, world_size, label) -> EvalOutput:
    from ray.experimental.tqdm_ray import tqdm

    return run_part(model, url, tasks, opts, rank, world_size, label, tqdm)


class RayRunner:
    """:class:`~mult.experiments.transfer.Runner` whose parts and fine-tuning are Ray tasks."""

    def __init__(self, cpus_per_worker: float) -> None:
        import ray

        from mult.launch.env import init_ray

        init_ray()
        gpus = ray.cluster_resources().get("GPU", 0)
        self.options = {"num_cpus": cpus_per_worker, "num_gpus": 1 if gpus >= 1 else 0}
        log.info("Ray: %s; each part gets %s", ray.cluster_resources(), self.options)
        self._part = ray.remote(_ray_part).options(**self.options)
        self._finetune = ray.remote(run_finetune).options(**self.options)

    def parts(self, model: torch.nn.Module, url: str, tasks: list[str], opts: dict[str, Any], world_size: int,
              label: str) -> list[EvalOutput]:
        """One part per rank, in parallel; each returns its state."""
        import ray

        ref = ray.put(model)
        return ray.get([self._part.remote(ref, url, tasks, opts, r, world_size, label) for r in range(world_size)])

    def finetune(self, model: torch.nn.Module, url: str, tasks: list[str], opts: dict[str, Any]) -> torch.nn.Module:
        import ray

        return ray.get(self._finetune.remote(ray.put(model), url, tasks, opts))
