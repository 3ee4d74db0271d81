"""The loss-weight search without Ray: space, objective, trial records, trial settings.

:mod:`mult.launch.tune` runs the search with Ray Tune; :mod:`mult.experiments.search_report`
writes its outputs.

* :func:`build_search_space`: which task weights are searched, over which log-uniform ranges,
  and which one is held fixed as the reference; every problem is a :class:`ConfigError`.
* The objective. With single-task baselines it is **Delta-m** (percent, higher is better,
  :func:`mult.metrics.delta_m`). Without them it is the fallback
  ``mean_normalized_val_loss`` = mean over tasks of ``L_t / L_t(first validation)`` (lower is
  better). The weighted total loss is never used: it moves with the weights being searched.
* :class:`TrialRecord`: one trial's outcome; :func:`best_record` picks the winner.
* Where a search lives (:func:`experiment_root`), its baselines (:func:`find_baselines`), what a
  trial may use (:func:`trial_resources`) and its config (:func:`trial_config`).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from mult.config import Config, ConfigError, derive, validate_tune
from mult.metrics import Baselines, delta_m

log = logging.getLogger(__name__)

OBJECTIVE_KEY = "objective"  # the metric name Tune and ASHA see
SEARCH_ARM = "search"
LEARNED_ARMS = ("uncertainty", "dwa")
BASELINES_FILE = "baselines.json"
SMOKE = {"max_steps": 8, "val_every": 2, "num_samples": 4, "grace_period": 2}


# --------------------------------------------------------------------------------------------
# Search space.
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SearchSpace:
    """``searched``: task -> (low, high), sampled log-uniformly; ``fixed``: task -> weight."""

    searched: dict[str, tuple[float, float]]
    fixed: dict[str, float]

    def weights(self, sampled: Mapping[str, float]) -> dict[str, float]:
        """Every task's weight: the sampled ones plus the fixed reference."""
        missing = [t for t in self.searched if t not in sampled]
        if missing:
            raise KeyError(f"sampled weights lack tasks {missing}")
        return {**{t: float(sampled[t]) for t in self.searched}, **self.fixed}


def _check_range(key: str, value: Sequence[float]) -> tuple[float, float]:
    if len(value) != 2 or not all(math.isfinite(v) for v in value) or not 0 < value[0] < value[1]:
        raise ConfigError(f"{key}: need [low, high] with 0 < low < high (log-uniform), got {list(value)}")
    return float(value[0]), float(value[1])


def build_search_space(cfg: Config) -> SearchSpace:
    """The search space from ``cfg.tune`` and ``cfg.tasks``; raises :class:`ConfigError`.

    The fixed task (``tune.fixed_task``) keeps ``cfg.weight(task)`` (its ``loss_weights`` entry,
    else the task's default weight); every other task is searched over ``tune.weight_range``
    or its own ``tune.weight_ranges[task]``.
    """
    validate_tune(cfg)
    t = cfg.tune
    default = _check_range("tune.weight_range", t.weight_range)
    fixed = {t.fixed_task: cfg.weight(t.fixed_task)} if t.fixed_task is not None else {}
    searched_tasks = [task for task in cfg.tasks if task not in fixed]
    for task, value in t.weight_ranges.items():
        if task not in searched_tasks:
            why = "is the fixed reference task" if task in fixed else "is not among tasks"
            raise ConfigError(
                f"tune.weight_ranges.{task}: {task!r} {why}; searched tasks: {', '.join(searched_tasks)}"
            )
    searched = {
        task: _check_range(f"tune.weight_ranges.{task}", t.weight_ranges[task])
        if task in t.weight_ranges else default
        for task in searched_tasks
    }
    if t.trial_driver_cpus <= 0:
        raise ConfigError(
            f"tune.trial_driver_cpus: must be > 0 (Ray refuses a trial asking for 0 CPUs; 0.01 works), "
            f"got {t.trial_driver_cpus}"
        )
    if t.grace_period < 1:
        raise ConfigError(f"tune.grace_period: must be >= 1 validation, got {t.grace_period}")
    if t.reduction_factor < 2:
        raise ConfigError(f"tune.reduction_factor: must be >= 2, got {t.reduction_factor}")
    workers = t.trial_num_workers or cfg.scaling.num_workers
    if workers < 1:
        raise ConfigError(f"tune.trial_num_workers: must be >= 1, got {workers}")
    per_step = cfg.train.micro_batch_size * workers
    if cfg.train.global_batch_size % per_step:
        raise ConfigError(
            f"tune.trial_num_workers ({workers}): train.global_batch_size ({cfg.train.global_batch_size}) "
            f"must be a multiple of micro_batch_size x trial_num_workers ({per_step})"
        )
    if len(set(t.extra_arms)) != len(t.extra_arms):
        raise ConfigError(f"tune.extra_arms: duplicates in {t.extra_arms}")
    return SearchSpace(searched, fixed)


# --------------------------------------------------------------------------------------------
# Objective.
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Objective:
    name: str  # "delta_m" | "mean_normalized_val_loss"
    mode: str  # "max" | "min"
    description: str

    def better(self, a: float, b: float) -> bool:
        """Is ``a`` strictly better than ``b``?"""
        return a > b if self.mode == "max" else a < b


DELTA_M = Objective("delta_m", "max", "Delta-m (%) against single-task baselines, higher is better")
FALLBACK = Objective(
    "mean_normalized_val_loss", "min",
    "fallback (no baselines): mean over tasks of val loss / that task's val loss at the trial's "
    "first validation, lower is better",
)


def choose_objective(has_baselines: bool) -> Objective:
    return DELTA_M if has_baselines else FALLBACK


def normalized_loss(
    metrics: Mapping[str, Mapping[str, float]],
    reference: Mapping[str, float],
    tasks: Sequence[str],
) -> float:
    """Mean over ``tasks`` of ``metrics[t]["loss"] / reference[t]``; NaN when a value is missing.

    A reference of 0 (a task already perfect at the first validation) contributes 1.0 while its
    loss stays 0, else infinity: the ratio has no finite meaning there.
    """
    ratios = []
    for task in tasks:
        value, ref = metrics.get(task, {}).get("loss"), reference.get(task)
        if value is None or ref is None or not math.isfinite(value) or not math.isfinite(ref):
            return math.nan
        ratios.append(value / ref if ref > 0 else (1.0 if value == 0 else math.inf))
    return sum(ratios) / len(ratios) if ratios else math.nan


def compute_objective(
    objective: Objective,
    metrics: Mapping[str, Mapping[str, float]],
    tasks: Sequence[str],
    *,
    baselines: Mapping[str, Mapping[str, float]] | None = None,
    reference: Mapping[str, float] | None = None,
) -> float:
    """The objective's value for one validation's ``{task: {metric: value}}``."""
    if objective.name == DELTA_M.name:
        if baselines is None:
            raise ValueError("the delta_m objective needs baselines")
        return delta_m(metrics, baselines, tasks)
    if reference is None:
        raise ValueError("the fallback objective needs the first validation's losses (reference)")
    return normalized_loss(metrics, reference, tasks)


# --------------------------------------------------------------------------------------------
# Results.
# --------------------------------------------------------------------------------------------
@dataclass
class TrialRecord:
    """One finished (or stopped, errored, interrupted) trial."""

    trial_id: str
    arm: str  # "search", "uncertainty" or "dwa"
    status: str  # Tune's: TERMINATED, ERROR, RUNNING, PENDING, PAUSED
    weights: dict[str, float]
    step: int | None = None  # last reported optimizer step
    objective: float | None = None  # at the last validation
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # last validation
    history: list[tuple[int, float]] = field(default_factory=list)  # (step, objective)
    stopped_early: bool = False  # by the scheduler (ASHA), before train.max_steps
    error: str | None = None


def mark_stopped_early(records: Sequence[TrialRecord], max_steps: int) -> None:
    """A trial that terminated without error before ``max_steps`` was stopped by the scheduler."""
    for r in records:
        r.stopped_early = r.status == "TERMINATED" and r.error is None and (r.step or 0) < max_steps


def finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def best_record(records: Sequence[TrialRecord], objective: Objective, arm: str = SEARCH_ARM) -> TrialRecord | None:
    """The best finished trial of ``arm``.

    Trials that ASHA stopped early are ranked too, by their last value; a stopped trial's value
    comes from fewer steps, so it rarely wins, but when it does it is the best evidence there is.
    """
    best = None
    for r in records:
        if r.arm != arm or r.status != "TERMINATED" or not finite(r.objective):
            continue
        if best is None or objective.better(r.objective, best.objective):
            best = r
    return best


def read_records(path: str | Path) -> tuple[Objective, list[TrialRecord]]:
    """Read ``trials.json`` back."""
    payload = json.loads(Path(path).read_text())
    records = []
    for row in payload["trials"]:
        row["history"] = [tuple(h) for h in row.get("history", [])]
        records.append(TrialRecord(**row))
    return Objective(**payload["objective"]), records


def best_overrides(record: TrialRecord) -> dict[str, Any]:
    """The config keys that reproduce a trial: its loss weights, and the weighting for an arm."""
    data: dict[str, Any] = {"loss_weights": {t: float(w) for t, w in record.weights.items()}}
    if record.arm in LEARNED_ARMS:
        data["loss"] = {"weighting": record.arm}
    return data


# --------------------------------------------------------------------------------------------
# Where a search lives and what its trials run.
# --------------------------------------------------------------------------------------------
def experiment_root(cfg: Config) -> str:
    """``tune.experiment_path``: absolute or ``s3://`` as given; relative under ``train.storage_path``."""
    from mult.training.plan import resolve_storage

    path = cfg.tune.experiment_path
    if path.startswith("s3://") or Path(path).expanduser().is_absolute():
        return resolve_storage(path)
    return f"{resolve_storage(cfg.train.storage_path)}/{path.strip('/')}"


def find_baselines(cfg: Config, root: str) -> tuple[str | None, Baselines | None]:
    """``train.baselines`` if set, else ``{root}/baselines.json`` if it exists; else (None, None).
    Raises :class:`~mult.training.plan.PreflightError` for an unreadable file."""
    from mult.data.storage import open_storage
    from mult.training.plan import PreflightError, load_baselines

    url = cfg.train.baselines
    if url is None and open_storage(root).exists(BASELINES_FILE):
        url = f"{root}/{BASELINES_FILE}"
    if url is None:
        return None, None
    try:
        return url, load_baselines(url, cfg.tasks)
    except (OSError, ValueError) as exc:
        raise PreflightError(f"baselines {url!r}: {exc}") from exc


@dataclass(frozen=True)
class TrialResources:
    driver_cpus: float
    num_workers: int
    cpus_per_worker: float
    gpus_per_worker: float  # 0 without GPUs

    @property
    def cpus(self) -> float:
        return self.driver_cpus + self.num_workers * self.cpus_per_worker

    @property
    def gpus(self) -> float:
        return self.num_workers * self.gpus_per_worker


def trial_resources(cfg: Config) -> TrialResources:
    """The driver's share comes out of the workers', so a trial needs what a training run needs."""
    workers = cfg.tune.trial_num_workers or cfg.scaling.num_workers
    driver = cfg.tune.trial_driver_cpus
    per_worker = cfg.scaling.cpus_per_worker - driver / workers
    if per_worker <= 0:
        raise ConfigError(
            f"tune.trial_driver_cpus ({driver}) leaves no CPU for the {workers} workers of a trial "
            f"(scaling.cpus_per_worker = {cfg.scaling.cpus_per_worker}); lower it (0.01 works)"
        )
    gpus = cfg.scaling.gpus_per_worker if cfg.scaling.use_gpu else 0.0
    return TrialResources(driver, workers, round(per_worker, 4), gpus)


def trial_config(base: Config, weights: Mapping[str, float], weighting: str | None, res: TrialResources) -> Config:
    """The training config of one trial."""
    changes: dict[str, Any] = {
        "loss_weights": dict(weights), "scaling.num_workers": res.num_workers,
        "scaling.cpus_per_worker": res.cpus_per_worker,
        "train.baselines": None,  # handed over as numbers in the plan instead
    }
    if weighting is not None:
        changes["loss.weighting"] = weighting
    if base.metrics.prometheus_port:
        changes["metrics.prometheus_port"] = 0  # concurrent trials on one host need their own ports
    return derive(base, changes)


def tune_smoke_config(cfg: Config) -> Config:
    """At most 4 trials of 8 steps each (4 validations), on generated data if none is named."""
    every = SMOKE["val_every"]
    from mult.training.plan import smoke_config

    return derive(smoke_config(cfg), {
        "train.max_steps": SMOKE["max_steps"], "train.val_every": every, "train.checkpoint_every": every,
        "train.log_every": every, "train.keep_checkpoints": 1,
        "tune.num_samples": min(cfg.tune.num_samples, SMOKE["num_samples"]),
        "tune.grace_period": SMOKE["grace_period"], "tune.reduction_factor": 2,
        "metrics.tensorboard": False, "metrics.prometheus_port": None,
    })
