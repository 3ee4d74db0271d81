"""An ablation's runs on Ray: one Ray task per small run, or one TorchTrainer per large run.

* ``task``: each run is one Ray task asking ``cpus`` CPUs and ``gpus`` GPUs, running
  :func:`mult.experiments.ablation.execute_run` (the training loop on one rank, no DDP, no
  TorchTrainer). Ray packs as many runs as the cluster holds and an autoscaler adds nodes for
  the queue: what fits many *small* runs (a TorchTrainer costs about 20 s of start-up per run
  here, more than a small run itself).
* ``trainer``: each run is a normal ``TorchTrainer`` fit (``scaling.num_workers`` DDP workers,
  checkpoints under ``{out}/train-runs``, fault tolerance), started from a Ray task that asks
  ``driver_cpus``: for runs too large for one device.
* ``local``: the runs one after another in this process, without Ray (debugging).

Each result is saved the moment it arrives, so a rerun resumes.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Mapping, Sequence

from mult.config import from_dict, to_dict
from mult.experiments.ablation import Ablation, ResultStore, RunResult, RunSpec, execute_run, run_result

log = logging.getLogger(__name__)

LAUNCHERS = ("task", "trainer", "local")


def execute_trainer_run(config: dict[str, Any]) -> dict[str, Any]:
    """Train one run as a normal ``TorchTrainer`` fit (DDP over ``scaling.num_workers``)."""
    from mult.launch.trainer import build_trainer
    from mult.training.plan import prepare

    start = time.perf_counter()
    plan = prepare(from_dict(config))
    result = build_trainer(plan).fit()
    if result.error is not None:
        raise RuntimeError(f"run {plan.run_name} failed: {result.error}")
    return {"report": dict(result.metrics or {}), "seconds": time.perf_counter() - start, "train_run": plan.run_url}


def _submitter(abl: Ablation, launcher: str, *, cpus: float, gpus: float, driver_cpus: float,
               max_retries: int) -> Callable[[RunSpec], Any]:
    """``spec -> ObjectRef`` for the Ray launchers."""
    import ray

    if launcher == "task":
        remote = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=max_retries)(execute_run)
        return lambda spec: remote.options(name=f"ablate:{spec.run_id}").remote(to_dict(abl.configs[spec]), cpus)
    remote = ray.remote(num_cpus=driver_cpus, max_retries=0)(execute_trainer_run)

    def submit(spec: RunSpec) -> Any:
        config = to_dict(abl.configs[spec])
        config["train"]["run_name"] = f"ablate-{spec.run_id}"  # Train's run directory says which run
        return remote.options(name=f"ablate:{spec.run_id}").remote(config)

    return submit


def run_pending(abl: Ablation, pending: Sequence[RunSpec], store: ResultStore, *, launcher: str = "task",
                cpus: float = 1.0, gpus: float = 0.0, driver_cpus: float = 0.01, max_retries: int = 1,
                max_concurrent: int | None = None) -> tuple[dict[RunSpec, RunResult], dict[RunSpec, str]]:
    """Train ``pending``; save each result the moment it arrives. Returns (results, failures)."""
    results: dict[RunSpec, RunResult] = {}
    failures: dict[RunSpec, str] = {}

    def finish(spec: RunSpec, outcome: Callable[[], Mapping[str, Any]]) -> None:
        try:
            result = run_result(spec, abl.configs[spec], outcome())
        except Exception as exc:  # one failed run must not cost the others; reported at the end
            failures[spec] = f"{type(exc).__name__}: {exc}"
            log.error("run %s failed: %s", spec.run_id, failures[spec])
            return
        store.save(result)
        results[spec] = result
        log.info("[%d/%d] %s done in %.0f s", len(results) + len(failures), len(pending), spec.run_id, result.seconds)

    if launcher == "local":
        for spec in pending:
            finish(spec, lambda spec=spec: execute_run(to_dict(abl.configs[spec]), cpus))
        return results, failures
    import ray

    from mult.launch.env import init_ray

    init_ray()
    submit = _submitter(abl, launcher, cpus=cpus, gpus=gpus, driver_cpus=driver_cpus, max_retries=max_retries)
    queue = list(pending)
    in_flight: dict[Any, RunSpec] = {}
    limit = max_concurrent or len(queue)
    while queue or in_flight:
        while queue and len(in_flight) < limit:
            spec = queue.pop(0)
            in_flight[submit(spec)] = spec
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        for ref in ready:
            finish(in_flight.pop(ref), lambda ref=ref: ray.get(ref))
    return results, failures
