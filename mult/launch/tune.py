"""The loss-weight search under Ray Tune: each trial a small Ray Train run.

* **Search**: one log-uniform weight per task (``tune.weight_range``, per-task
  ``tune.weight_ranges``), ``tune.fixed_task`` held as the reference; Optuna TPE
  (``tune.search=optuna``) or random search, seeded from ``train.seed``.
* **Trials**: the Ray 2.60 pattern for Tune with Train V2: a Tune function trainable that
  builds and fits :func:`mult.launch.trainer.build_trainer`'s ``TorchTrainer`` (run name = trial id), with a
  :class:`ObjectiveCallback` (a ``TuneReportCallback``) that forwards rank 0's metrics of every
  *validation* to Tune, plus the objective. The trial driver asks ``tune.trial_driver_cpus``
  (Ray refuses 0); its workers ask ``scaling.cpus_per_worker`` less the driver's share, so a
  trial occupies exactly ``num_workers x cpus_per_worker`` CPUs and a 2-CPU machine holds one
  trial without the driver starving its own workers. ``max_concurrent_trials`` is capped at
  what the cluster holds now (``tune.limit_concurrency_to_cluster``), so no started driver waits
  on workers that cannot be placed.
* **Objective**: Delta-m against single-task baselines (``train.baselines``, else
  ``{experiment root}/baselines.json`` written by ``pipelines.baselines``); without baselines the
  fallback named in :mod:`mult.experiments.search`. ASHA (time = optimizer step, grace period =
  ``tune.grace_period`` validations) stops trials on it.
* **Extra arms**: ``tune.extra_arms`` (``uncertainty``, ``dwa``) run after the search as a second
  small Tune experiment with the default weights and ``loss.weighting`` set to the arm.
* **Outputs** in ``{experiment root}/{name}/`` (local or S3): ``trials.csv``, ``trials.json``,
  ``best.yaml`` (``python -m pipelines.train --config X.yaml @best.yaml``), ``report.md``,
  ``plots/``, ``search_config.yaml``; Tune's state in ``search/`` and ``arms/``; each trial's
  Train run (checkpoints, telemetry) in ``runs/{trial_id}``.
* **Resume**: SIGINT (Ctrl+C) stops the search and saves its state (exit code 130); ``--resume``
  restores it with ``Tuner.restore``: finished trials are kept, unfinished ones continue from
  their Train checkpoint, errored ones are retried with ``--retry-errored``. ASHA's rungs are
  kept in ``asha_state.json`` (Tune restores the searcher but not the scheduler).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import secrets
import signal
import threading
import time
from pathlib import Path
from typing import Any

# Base classes from Ray: the classes below must live at module level (Ray pickles them by name).
from ray.tune import Callback as TuneCallback
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler

from mult.config import Config, derive, from_dict, to_dict
from mult.experiments.search import (
    OBJECTIVE_KEY,
    SEARCH_ARM,
    Objective,
    SearchSpace,
    TrialRecord,
    TrialResources,
    build_search_space,
    choose_objective,
    compute_objective,
    experiment_root,
    find_baselines,
    trial_config,
    trial_resources,
    tune_smoke_config,
)
from mult.launch.env import init_ray
from mult.launch.trainer import build_trainer, storage_args
from mult.training.loop import val_metrics
from mult.training.plan import PreflightError, RunPlan, check_storage, list_runs, prepare


log = logging.getLogger("mult.tune")

CONFIG_FILE = "search_config.yaml"
REFERENCE_FILE = "objective_reference.json"
ASHA_STATE_FILE = "asha_state.json"
EXIT_INTERRUPTED = 130
# A trial whose worker group cannot start this many times in a row errors (retry it with
# --resume --retry-errored) instead of holding its slot forever.
TRIAL_CONTROLLER_FAILURES = 3


# =============================================================================================
# Where things live.
# =============================================================================================
def _tune_path(url: str) -> tuple[str, Any]:
    """(path, pyarrow filesystem or None) for Tune's storage arguments."""
    args = storage_args(url)
    return args["storage_path"], args.get("storage_filesystem")


def _can_restore(exp_url: str, part: str) -> bool:
    from ray import tune

    path, fs = _tune_path(f"{exp_url}/{part}")
    return tune.Tuner.can_restore(path, storage_filesystem=fs)


def choose_experiment(cfg: Config, root: str, resume: str | bool) -> str:
    """A fresh experiment name, or (``resume``) the stored one to continue."""
    prefix = f"{cfg.train.run_name}-tune-"
    if not resume:
        return f"{prefix}{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    if isinstance(resume, str):
        name = resume
    else:
        names = [n for n in list_runs(root, prefix) if _can_restore(f"{root}/{n}", "search")]
        if not names:
            raise PreflightError(f"--resume: no restorable search named {prefix}* under {root!r}")
        name = names[-1]  # names sort by their timestamp
    if not _can_restore(f"{root}/{name}", "search"):
        raise PreflightError(f"--resume: {root}/{name}/search holds no restorable Tune experiment")
    return name


def concurrency(cfg: Config, res: TrialResources) -> int:
    """``tune.max_concurrent_trials``, capped at how many trials the cluster holds right now."""
    import ray

    wanted = cfg.tune.max_concurrent_trials
    if not cfg.tune.limit_concurrency_to_cluster:
        return wanted
    total = ray.cluster_resources()
    fits = math.floor(total.get("CPU", 0.0) / res.cpus + 1e-9)
    if res.gpus > 0:
        fits = min(fits, math.floor(total.get("GPU", 0.0) / res.gpus + 1e-9))
    if fits < 1:
        raise PreflightError(
            f"one trial needs {res.cpus:g} CPUs and {res.gpus:g} GPUs but the cluster has "
            f"{total.get('CPU', 0):g} CPUs and {total.get('GPU', 0):g} GPUs; lower tune.trial_num_workers / "
            "scaling.cpus_per_worker, or set tune.limit_concurrency_to_cluster=false on an autoscaling cluster"
        )
    if fits < wanted:
        log.info("tune.max_concurrent_trials %d -> %d: the cluster holds %d trials of %g CPUs now",
                 wanted, fits, fits, res.cpus)
    return min(wanted, fits)


# =============================================================================================
# Inside a trial.
# =============================================================================================
class ObjectiveCallback(TuneReportCallback):
    """Forward rank 0's metrics of each validation to Tune, with ``objective`` added.

    Runs in the Train controller. For the fallback objective it keeps each task's loss at the
    trial's first validation in ``{run}/objective_reference.json``, so a trial resumed from its
    Train checkpoint goes on normalising by the same numbers.
    """

    def __init__(self, objective: Objective, tasks: list[str], baselines: dict | None, run_url: str) -> None:
        super().__init__()
        self.objective = objective
        self.tasks = list(tasks)
        self.baselines = baselines
        self.run_url = run_url
        self._reference: dict[str, float] | None = None

    def _reference_for(self, values: dict[str, dict[str, float]]) -> dict[str, float]:
        from mult.data.storage import open_storage

        if self._reference is None:
            storage = open_storage(self.run_url)
            if storage.exists(REFERENCE_FILE):
                self._reference = json.loads(storage.read_bytes(REFERENCE_FILE))
            else:
                self._reference = {t: values.get(t, {}).get("loss", math.nan) for t in self.tasks}
                storage.write_bytes(REFERENCE_FILE, json.dumps(self._reference).encode())
        return self._reference

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        flat = dict(metrics[0])
        values = val_metrics(flat)
        if not values:
            return  # a training-only report: ASHA and the searcher act on validations
        reference = self._reference_for(values) if self.baselines is None else None
        try:
            value = compute_objective(self.objective, values, self.tasks,
                                      baselines=self.baselines, reference=reference)
        except ValueError as exc:
            log.warning("objective not computable at step %s: %s", flat.get("step"), exc)
            value = math.nan
        flat[OBJECTIVE_KEY] = value
        if checkpoint is not None:
            flat["checkpoint_path"] = checkpoint.path
        self._training_actor_item_queue.put(flat)


def run_trial(config: dict[str, Any], *, plan: RunPlan, space: SearchSpace, res: TrialResources,
              objective: Objective, runs_url: str, local_root: str) -> None:
    """Tune's function trainable: one TorchTrainer run named by the trial id."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    arm = config.get("arm", SEARCH_ARM)
    if arm == SEARCH_ARM:
        weights, weighting = space.weights(config["loss_weights"]), None
    else:
        weights, weighting = {t: plan.cfg.weight(t) for t in plan.cfg.tasks}, arm
    cfg = trial_config(plan.cfg, weights, weighting, res)
    trial_plan = dataclasses.replace(plan, cfg=cfg, run_name=trial_id, storage_url=runs_url,
                                     local_dir=Path(local_root) / trial_id, resume=False, fault_at_step=None)
    callback = ObjectiveCallback(objective, cfg.tasks, plan.baselines, trial_plan.run_url)
    result = build_trainer(trial_plan, callbacks=[callback],
                           controller_failure_limit=TRIAL_CONTROLLER_FAILURES).fit()
    if result.error is not None:
        raise result.error


def _trial_id(trial) -> str:
    return trial.trial_id


class ResumableASHA(ASHAScheduler):
    """ASHA whose rungs survive ``Tuner.restore``.

    Tune restores the searcher but not the scheduler: a restored ASHA starts with empty rungs,
    so trials after a resume are compared only with each other and the finished trials no
    longer count. This one writes its rungs (JSON) to ``state_url`` after every decision and
    reads them back on first use after a restore.
    """

    def __init__(self, *, state_url: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.state_url = state_url
        self._loaded = False

    def _storage(self):
        from mult.data.storage import open_storage

        parent, _, name = self.state_url.rpartition("/")
        return open_storage(parent), name

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        storage, name = self._storage()
        if not storage.exists(name):
            return
        state = json.loads(storage.read_bytes(name))
        for bracket, rungs in zip(self._brackets, state["brackets"]):
            bracket._rungs = [(milestone, dict(recorded)) for milestone, recorded in rungs]
        for trial_id, index in state["trials"].items():
            self._trial_info.setdefault(trial_id, self._brackets[index])
        self._num_stopped = state["num_stopped"]
        log.info("ASHA rungs restored from %s (%d trials recorded)", self.state_url,
                 len({t for b in self._brackets for _, rec in b._rungs for t in rec}))

    def _save(self) -> None:
        storage, name = self._storage()
        state = {
            "brackets": [[[m, rec] for m, rec in b._rungs] for b in self._brackets],
            "trials": {t: self._brackets.index(b) for t, b in self._trial_info.items()},
            "num_stopped": self._num_stopped,
        }
        storage.write_bytes(name, json.dumps(state, default=float).encode())

    def on_trial_add(self, tune_controller, trial) -> None:
        self._load()
        if trial.trial_id not in self._trial_info:
            super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        self._load()
        action = super().on_trial_result(tune_controller, trial, result)
        self._save()
        return action


class _Watch:
    """What this driver saw of its trials: started, ended (completed, stopped by ASHA or
    errored), and whether a SIGINT interrupted the run.

    Tune pickles its callbacks into the experiment state and ``Tuner.restore`` brings back a
    copy, so the callback reports into this module-level record rather than into itself.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.interrupted = False
        self.started: set[str] = set()
        self.ended: set[str] = set()


WATCH = _Watch()

class WatchCallback(TuneCallback):
    """Feeds :data:`WATCH`. ``setup`` runs after Tune installed its SIGINT handler, so the
    handler installed here sees the signal first and then hands it on to Tune's."""

    def setup(self, **info: Any) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        previous = signal.getsignal(signal.SIGINT)

        def on_sigint(sig, frame):
            WATCH.interrupted = True
            if callable(previous):
                previous(sig, frame)

        signal.signal(signal.SIGINT, on_sigint)

    def on_trial_start(self, iteration: int, trials: list, trial, **info: Any) -> None:
        WATCH.started.add(trial.trial_id)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info: Any) -> None:
        WATCH.ended.add(trial.trial_id)

    def on_trial_error(self, iteration: int, trials: list, trial, **info: Any) -> None:
        WATCH.ended.add(trial.trial_id)


# =============================================================================================
# Driver.
# =============================================================================================
@dataclasses.dataclass
class Experiment:
    cfg: Config
    name: str
    url: str  # {root}/{name}
    plan: RunPlan
    space: SearchSpace
    objective: Objective
    resources: TrialResources
    resumed: bool

    @property
    def runs_url(self) -> str:
        return f"{self.url}/runs"


def _trainable(exp: Experiment):
    from ray import tune

    if exp.url.startswith("s3://"):
        root = Path(exp.cfg.metrics.local_dir or "~/.cache/mult/runs").expanduser().resolve()
        local_root = str(root / exp.name)
    else:
        local_root = exp.runs_url
    fn = tune.with_parameters(run_trial, plan=exp.plan, space=exp.space, res=exp.resources,
                              objective=exp.objective, runs_url=exp.runs_url, local_root=local_root)
    return tune.with_resources(fn, {"cpu": exp.resources.driver_cpus})


def _run_config(exp: Experiment, part: str):
    from ray import tune

    path, fs = _tune_path(exp.url)
    return tune.RunConfig(name=part, storage_path=path, storage_filesystem=fs, callbacks=[WatchCallback()],
                          failure_config=tune.FailureConfig(max_failures=0), verbose=1)


def _search_tuner(exp: Experiment, max_concurrent: int):
    from ray import tune

    cfg = exp.cfg
    seed = cfg.train.seed
    if cfg.tune.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(seed=seed)
    else:
        from ray.tune.search.basic_variant import BasicVariantGenerator

        search_alg = BasicVariantGenerator(random_state=seed)
    scheduler = ResumableASHA(
        state_url=f"{exp.url}/{ASHA_STATE_FILE}", time_attr="step", max_t=cfg.train.max_steps,
        grace_period=min(cfg.tune.grace_period * cfg.train.val_every, cfg.train.max_steps),
        reduction_factor=cfg.tune.reduction_factor,
    )
    space = {"loss_weights": {t: tune.loguniform(lo, hi) for t, (lo, hi) in exp.space.searched.items()}}
    return tune.Tuner(
        _trainable(exp), param_space=space,
        tune_config=tune.TuneConfig(
            metric=OBJECTIVE_KEY, mode=exp.objective.mode, search_alg=search_alg, scheduler=scheduler,
            num_samples=cfg.tune.num_samples, max_concurrent_trials=max_concurrent,
            trial_name_creator=_trial_id, trial_dirname_creator=_trial_id,
        ),
        run_config=_run_config(exp, "search"),
    )


def _arms_tuner(exp: Experiment, max_concurrent: int):
    from ray import tune

    return tune.Tuner(
        _trainable(exp), param_space={"arm": tune.grid_search(list(exp.cfg.tune.extra_arms))},
        tune_config=tune.TuneConfig(metric=OBJECTIVE_KEY, mode=exp.objective.mode, num_samples=1,
                                    max_concurrent_trials=max_concurrent,
                                    trial_name_creator=_trial_id, trial_dirname_creator=_trial_id),
        run_config=_run_config(exp, "arms"),
    )


def _restore_or_new(exp: Experiment, part: str, build, retry_errored: bool):
    from ray import tune

    if exp.resumed and _can_restore(exp.url, part):
        path, fs = _tune_path(f"{exp.url}/{part}")
        log.info("restoring %s/%s (finished trials are kept%s)", exp.url, part,
                 "; errored trials restart" if retry_errored else "")
        return tune.Tuner.restore(path, trainable=_trainable(exp), resume_unfinished=True,
                                  restart_errored=retry_errored, storage_filesystem=fs)
    return build()


def records_from_grid(grid, exp: Experiment, arm: str | None) -> list[TrialRecord]:
    """One :class:`TrialRecord` per trial of a finished (or interrupted) Tune run."""
    trials = {t.trial_id: t for t in getattr(getattr(grid, "_experiment_analysis", None), "trials", [])}
    records = []
    for result in grid:
        trial_id = Path(str(result.path)).name
        trial = trials.get(trial_id)
        config = trial.config if trial is not None else {}
        this_arm = config.get("arm", arm or SEARCH_ARM)
        if this_arm == SEARCH_ARM and "loss_weights" in config:
            weights = exp.space.weights(config["loss_weights"])
        else:
            weights = {t: exp.cfg.weight(t) for t in exp.cfg.tasks}
        history: list[tuple[int, float]] = []
        frame = result.metrics_dataframe
        if frame is not None and OBJECTIVE_KEY in frame and "step" in frame:
            history = [(int(s), float(v)) for s, v in zip(frame["step"], frame[OBJECTIVE_KEY])]
        metrics = result.metrics or {}
        status = trial.status if trial is not None else "UNKNOWN"
        if WATCH.interrupted and trial_id in WATCH.started and trial_id not in WATCH.ended:
            status = "INTERRUPTED"  # stopped by the SIGINT, not by ASHA: --resume continues it
        records.append(TrialRecord(
            trial_id=trial_id, arm=this_arm, status=status,
            weights=weights, step=int(metrics["step"]) if "step" in metrics else None,
            objective=float(metrics[OBJECTIVE_KEY]) if OBJECTIVE_KEY in metrics else None,
            metrics=val_metrics(metrics), history=history,
            error=f"{type(result.error).__name__}: {result.error}" if result.error is not None else None,
        ))
    return records


def setup(cfg: Config, *, resume: str | bool, smoke_test: bool) -> Experiment:
    """All driver-side checks and the experiment's identity; raises ConfigError / PreflightError."""
    from mult.data.storage import open_storage

    build_search_space(cfg)  # a bad space fails before anything else
    root = experiment_root(cfg)
    check_storage(root)
    name = choose_experiment(cfg, root, resume)
    url = f"{root}/{name}"
    storage = open_storage(url)
    if resume:
        import yaml

        saved = from_dict(yaml.safe_load(storage.read_bytes(CONFIG_FILE)))
        if to_dict(saved) != to_dict(cfg) and not smoke_test:
            log.warning("--resume: using the config saved with %s, not the one given now", name)
        cfg = saved
    elif smoke_test:
        cfg = tune_smoke_config(cfg)
    space = build_search_space(cfg)
    res = trial_resources(cfg)
    baselines_url, baselines = find_baselines(cfg, root)
    objective = choose_objective(baselines is not None)
    trials = derive(cfg, {"train.storage_path": f"{url}/runs", "train.baselines": None,
                          "scaling.num_workers": res.num_workers})
    plan = prepare(trials)  # storage, manifests; its run name is replaced per trial
    plan = dataclasses.replace(plan, baselines=baselines)
    if not resume:
        import yaml

        storage.write_bytes(CONFIG_FILE, yaml.safe_dump(to_dict(cfg), sort_keys=False).encode())
    log.info("objective: %s%s", objective.description, f" (baselines {baselines_url})" if baselines_url else "")
    if objective.mode == "min" and cfg.tune.grace_period < 2:
        log.warning("the fallback objective is 1.0 for every trial at its first validation; "
                    "tune.grace_period >= 2 gives ASHA something to compare")
    return Experiment(cfg, name, url, plan, space, objective, res, bool(resume))


def run(exp: Experiment, *, retry_errored: bool = False) -> tuple[list[TrialRecord], bool]:
    """Run (or resume) the search and the extra arms; returns (records, interrupted)."""
    # Trial drivers build their trainer's S3 filesystem from AWS_ENDPOINT_URL and friends, so
    # they need the driver's values; a new local instance gets the dashboard, without which a
    # stopped trial's workers keep their CPUs (STACK.md).
    init_ray(local_dashboard=True)
    max_concurrent = concurrency(exp.cfg, exp.resources)
    log.info("search %s -> %s: %d trials, %d at a time, %g CPUs each (driver %g + %d x %g)",
             exp.name, exp.url, exp.cfg.tune.num_samples, max_concurrent, exp.resources.cpus,
             exp.resources.driver_cpus, exp.resources.num_workers, exp.resources.cpus_per_worker)
    WATCH.reset()
    grid = _restore_or_new(exp, "search", lambda: _search_tuner(exp, max_concurrent), retry_errored).fit()
    records = records_from_grid(grid, exp, SEARCH_ARM)
    if exp.cfg.tune.extra_arms and not WATCH.interrupted:
        arms = _restore_or_new(exp, "arms", lambda: _arms_tuner(exp, max_concurrent), retry_errored).fit()
        records += records_from_grid(arms, exp, None)
    return records, WATCH.interrupted
