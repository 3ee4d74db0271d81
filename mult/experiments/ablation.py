"""Ablation studies: which runs to train, one run, and what their metrics say (no Ray).

Three studies, all measured against single-task baselines trained with the same data, steps
and seeds (:mod:`mult.launch.ablation` executes the runs on Ray, :func:`execute_run` is one
run; :mod:`mult.experiments.ablation_report` writes the tables):

* ``modes``: MulT on all configured tasks in each shared-attention mode (``reference``,
  ``encoder``, ``none``). Reports Delta-m per mode (mean +- std over seeds) and each task's
  primary metric: the quantitative answer to "does shared attention help?".
* ``pairwise``: MulT on every unordered pair of tasks. The **task-affinity table** has a row
  per tested task and a column per partner task; an entry is the relative change (percent,
  positive = better) of the tested task's primary metric in the pair run against that task's
  single-task baseline, averaged over seeds.
* ``num-tasks``: MulT on 2, 3, ..., N tasks. **Subset rule**: the first k tasks of the
  configured task list (``tasks``), so subsets are nested and each step adds exactly one task;
  order the list to choose what is added when (put the reference task first so that it is in
  every subset). Reports Delta-m per k over the k tasks in the subset.

A run is identified by its task tuple (in configured order, which also fixes the model's
construction order), its shared-attention mode and its seed, so runs that two studies share
(the pair of the first two tasks is also the num-tasks k=2 run; the all-task ``reference`` run
is also k=N) are trained once. Single-task baselines use ``shared_attention=none``: one task
has no one to share an attention map with.

``reference`` mode needs a reference task among the run's tasks: ``model.reference_task`` when
the run has it (``normal`` by default), otherwise the run's first task (logged, and recorded in
the run's result).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from mult.config import SHARED_ATTENTION_MODES, Config, ConfigError, derive, from_dict, to_dict
from mult.tasks import get_task
from mult.training.loop import val_metrics

log = logging.getLogger(__name__)

MODES: tuple[str, ...] = SHARED_ATTENTION_MODES
STUDIES: tuple[str, ...] = ("modes", "pairwise", "num-tasks")
BASELINE_MODE = "none"
RESULT_VERSION = 1

# Config fields that do not change what a run computes: excluded from its fingerprint, so a
# result stays valid when only the launcher, logging or storage differ.
_FINGERPRINT_IGNORED = {
    "train": ("storage_path", "run_name", "baselines", "max_failures", "log_every", "checkpoint_every",
              "keep_checkpoints", "val_every"),
    "data": ("num_workers", "storage_retry_s", "storage_timeout_s"),
    "model": ("activation_checkpointing", "compile"),
}
_FINGERPRINT_IGNORED_SECTIONS = ("scaling", "tune", "metrics")


class StudyError(ValueError):
    """A study cannot be planned or aggregated; the message says what and what is allowed."""


# ============================================================================================
# Planning.
# ============================================================================================
@dataclass(frozen=True)
class RunSpec:
    """One training: ``tasks`` (configured order), shared-attention ``mode``, ``seed``."""

    tasks: tuple[str, ...]
    mode: str
    seed: int

    @property
    def run_id(self) -> str:
        return f"{'+'.join(self.tasks)}-{self.mode}-seed{self.seed}"

    @property
    def is_baseline(self) -> bool:
        return len(self.tasks) == 1


def reference_for(tasks: Sequence[str], preferred: str) -> str:
    """The reference task of a run: ``preferred`` when the run has it, else the run's first task."""
    return preferred if preferred in tasks else tasks[0]


def _check_tasks(tasks: Sequence[str], seeds: Sequence[int]) -> None:
    for task in tasks:
        get_task(task)  # raises with the valid names
    if len(set(tasks)) != len(tasks):
        raise StudyError(f"tasks: duplicates in {list(tasks)}")
    if not seeds:
        raise StudyError("seeds: at least one seed is required")
    if len(set(seeds)) != len(seeds):
        raise StudyError(f"seeds: duplicates in {list(seeds)}")


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise StudyError(f"shared-attention mode {mode!r} is not allowed; choose from {list(MODES)}")


def baseline_runs(tasks: Sequence[str], seeds: Sequence[int]) -> list[RunSpec]:
    """One single-task run per task and seed, ``shared_attention=none``."""
    _check_tasks(tasks, seeds)
    return [RunSpec((t,), BASELINE_MODE, s) for s in seeds for t in tasks]


def _check_study(study: str, tasks: Sequence[str], seeds: Sequence[int], modes: Sequence[str]) -> None:
    _check_tasks(tasks, seeds)
    if len(tasks) < 2:
        raise StudyError(f"the {study} study needs at least 2 tasks, got {list(tasks)}")
    for mode in modes:
        _check_mode(mode)


def plan_modes(tasks: Sequence[str], seeds: Sequence[int], modes: Sequence[str] = MODES) -> list[RunSpec]:
    """All configured tasks, once per mode and seed (baselines not included)."""
    _check_study("modes", tasks, seeds, modes)
    if not modes:
        raise StudyError(f"the modes study needs at least one mode; choose from {list(MODES)}")
    return [RunSpec(tuple(tasks), m, s) for s in seeds for m in modes]


def task_pairs(tasks: Sequence[str]) -> list[tuple[str, str]]:
    """Every unordered pair, each in configured order: ``len(tasks) * (len(tasks) - 1) / 2``."""
    return list(itertools.combinations(tasks, 2))


def plan_pairwise(tasks: Sequence[str], seeds: Sequence[int], mode: str = "reference") -> list[RunSpec]:
    """One run per unordered task pair and seed (baselines not included)."""
    _check_study("pairwise", tasks, seeds, [mode])
    return [RunSpec(pair, mode, s) for s in seeds for pair in task_pairs(tasks)]


def num_task_subsets(tasks: Sequence[str], min_tasks: int = 2) -> list[tuple[str, ...]]:
    """The nested prefixes ``tasks[:k]`` for ``k = min_tasks .. len(tasks)`` (the subset rule)."""
    if min_tasks < 1:
        raise StudyError(f"min_tasks must be >= 1, got {min_tasks}")
    return [tuple(tasks[:k]) for k in range(min_tasks, len(tasks) + 1)]


def plan_num_tasks(tasks: Sequence[str], seeds: Sequence[int], mode: str = "reference") -> list[RunSpec]:
    """One run per prefix size k = 2..N and seed (baselines not included)."""
    _check_study("num-tasks", tasks, seeds, [mode])
    return [RunSpec(subset, mode, s) for s in seeds for subset in num_task_subsets(tasks)]


def parse_studies(text: str) -> list[str]:
    """``"all"`` or one study name -> the list of studies."""
    if text == "all":
        return list(STUDIES)
    if text not in STUDIES:
        raise StudyError(f"study {text!r} is not allowed; choose from {[*STUDIES, 'all']}")
    return [text]


def plan_runs(
    studies: Sequence[str],
    tasks: Sequence[str],
    seeds: Sequence[int],
    *,
    modes: Sequence[str] = MODES,
    study_mode: str = "reference",
) -> list[RunSpec]:
    """Baselines first, then each study's runs; a run two studies share appears once."""
    runs = baseline_runs(tasks, seeds)
    for study in studies:
        if study == "modes":
            runs += plan_modes(tasks, seeds, modes)
        elif study == "pairwise":
            runs += plan_pairwise(tasks, seeds, study_mode)
        elif study == "num-tasks":
            runs += plan_num_tasks(tasks, seeds, study_mode)
        else:
            raise StudyError(f"study {study!r} is not allowed; choose from {list(STUDIES)}")
    return list(dict.fromkeys(runs))


def run_config(base: Config, spec: RunSpec) -> Config:
    """The config of one run: ``base`` narrowed to the run's tasks, mode, reference and seed.

    Loss weights of tasks outside the run are dropped; ``reference_task`` follows
    :func:`reference_for` (for ``none``/``encoder`` it is unused but kept consistent).
    """
    return derive(base, {
        "tasks": list(spec.tasks),
        "loss_weights": {t: w for t, w in base.loss_weights.items() if t in spec.tasks},
        "model.shared_attention": spec.mode,
        "model.reference_task": reference_for(spec.tasks, base.model.reference_task),
        "train.seed": spec.seed,
    })


def fingerprint(cfg: Config) -> str:
    """A short hash of everything in ``cfg`` that changes what a run computes."""
    data = to_dict(cfg)
    for section in _FINGERPRINT_IGNORED_SECTIONS:
        data.pop(section, None)
    for section, keys in _FINGERPRINT_IGNORED.items():
        for key in keys:
            data[section].pop(key, None)
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ============================================================================================
# Results on disk (resumable).
# ============================================================================================
@dataclass
class RunResult:
    """What one finished run produced: final validation metrics ``{task: {metric: value}}``."""

    spec: RunSpec
    metrics: dict[str, dict[str, float]]
    fingerprint: str
    reference_task: str | None = None  # set in ``reference`` mode
    seconds: float = math.nan
    steps: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": RESULT_VERSION, "run_id": self.spec.run_id, "tasks": list(self.spec.tasks),
            "mode": self.spec.mode, "seed": self.spec.seed, "metrics": self.metrics,
            "fingerprint": self.fingerprint, "reference_task": self.reference_task,
            "seconds": self.seconds, "steps": self.steps, "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RunResult":
        spec = RunSpec(tuple(d["tasks"]), str(d["mode"]), int(d["seed"]))
        metrics = {t: {m: float(v) for m, v in ms.items()} for t, ms in d["metrics"].items()}
        return cls(spec, metrics, str(d["fingerprint"]), d.get("reference_task"),
                   float(d.get("seconds", math.nan)), int(d.get("steps", 0)), dict(d.get("extra", {})))


def metrics_from_report(report: Mapping[str, Any], tasks: Sequence[str]) -> dict[str, dict[str, float]]:
    """The training loop's last report -> ``{task: {metric: v}}`` for ``tasks``.

    Raises :class:`StudyError` when a task's primary metric is missing (no validation ran).
    """
    out = {t: ms for t, ms in val_metrics(report).items() if t in tasks}
    missing = [f"{t}.{get_task(t).primary_metric.name}" for t in tasks
               if get_task(t).primary_metric.name not in out.get(t, {})]
    if missing:
        raise StudyError(f"the run reported no validation value for {', '.join(missing)} "
                         "(is data.val set?)")
    return out


class ResultStore:
    """One JSON per finished run under ``{out}/runs/``, written atomically.

    A run counts as finished only when its file parses and its fingerprint matches the
    current config of that run; a run whose settings changed is trained again (and its file
    replaced).
    """

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.dir = Path(out_dir) / "runs"

    def path(self, spec: RunSpec) -> Path:
        return self.dir / f"{spec.run_id}.json"

    def load(self, spec: RunSpec, expected_fingerprint: str) -> RunResult | None:
        """The stored result of ``spec`` if finished with the same settings, else ``None``."""
        path = self.path(spec)
        if not path.is_file():
            return None
        try:
            result = RunResult.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable result %s (%s); the run will be trained again", path, exc)
            return None
        if result.spec != spec:
            log.warning("result %s describes another run (%s); the run will be trained again",
                        path, result.spec.run_id)
            return None
        if result.fingerprint != expected_fingerprint:
            log.warning("result %s was trained with other settings (fingerprint %s, now %s); "
                        "the run will be trained again", path, result.fingerprint, expected_fingerprint)
            return None
        return result

    def save(self, result: RunResult) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.path(result.spec)
        tmp = path.with_suffix(f".json.tmp{os.getpid()}")
        tmp.write_text(json.dumps(result.to_dict(), indent=1, sort_keys=True, allow_nan=True))
        os.replace(tmp, path)  # atomic: a crash never leaves a half-written result
        return path


def split_finished(
    runs: Iterable[RunSpec], store: ResultStore, fingerprints: Mapping[RunSpec, str]
) -> tuple[dict[RunSpec, RunResult], list[RunSpec]]:
    """``(finished results, runs still to train)``, in plan order."""
    done: dict[RunSpec, RunResult] = {}
    pending: list[RunSpec] = []
    for spec in runs:
        result = store.load(spec, fingerprints[spec])
        if result is None:
            pending.append(spec)
        else:
            done[spec] = result
    return done, pending


# ============================================================================================
# One run, and the whole ablation's plan.
# ============================================================================================
def execute_run(config: dict[str, Any], cpus: float = 1.0) -> dict[str, Any]:
    """Train one run in this process (the training loop on one rank, :class:`LocalSession`).

    Returns ``{"report": last reported metrics, "seconds": wall time}``; the last report holds
    the final validation (``val/<task>/<metric>``) since the last step always validates.
    """
    import torch

    from mult.training.loop import LoopOptions, train_loop
    from mult.training.session import LocalSession

    cfg = from_dict(config)
    torch.set_num_threads(max(1, int(cpus)))
    device = torch.device("cuda" if cfg.scaling.use_gpu and torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mult-ablate-") as tmp:
        report = train_loop(cfg, LocalSession(device), LoopOptions(Path(tmp), telemetry=False))
    return {"report": report, "seconds": time.perf_counter() - start}


@dataclass
class Ablation:
    """What the driver settled before any run starts."""

    cfg: Config  # the base config (all tasks), already adjusted for the ablation
    out: Path
    studies: list[str]
    seeds: list[int]
    modes: list[str]
    study_mode: str
    runs: list[RunSpec]
    configs: dict[RunSpec, Config]
    data_samples: int


def prepare_ablation(cfg: Config, *, out: str | Path, studies: Sequence[str], seeds: Sequence[int],
                     modes: Sequence[str], study_mode: str, eval_batches: int | None,
                     one_rank: bool, driver_cpus: float = 0.0, gpus: bool = False) -> Ablation:
    """Check data, storage and options; plan the runs. Raises ConfigError / StudyError / PreflightError.

    ``one_rank``: each run trains on one rank (the Ray-task and local launchers) and reaches the
    global batch by accumulation; otherwise each run is a DDP TorchTrainer whose driver takes
    ``driver_cpus`` out of its workers' share.
    """
    from mult.training.plan import prepare

    out = Path(out).expanduser().resolve()
    changes: dict[str, Any] = {
        # one evaluation, after the last step; no mid-run checkpoints to pay for
        "train.val_every": cfg.train.max_steps, "train.checkpoint_every": cfg.train.max_steps,
        "train.log_every": min(cfg.train.log_every, cfg.train.max_steps), "train.val_batches": eval_batches,
        "train.baselines": None, "train.storage_path": str(out / "train-runs"), "train.run_name": "ablate",
        "metrics.prometheus_port": None, "metrics.pushgateway": None,
    }
    if one_rank:
        changes.update({"scaling.num_workers": 1, "scaling.use_gpu": gpus})
    else:  # the run's driver task and its workers together ask num_workers x cpus_per_worker
        s = cfg.scaling
        changes["scaling.cpus_per_worker"] = max(0.01, s.cpus_per_worker - driver_cpus / s.num_workers)
    cfg = derive(cfg, changes)
    prepare(cfg)  # data readable and has the tasks, storage writable
    if cfg.data.val is None:
        raise ConfigError("data.val: the ablation evaluates every run on data.val; set data.val=URL")
    runs = plan_runs(studies, cfg.tasks, seeds, modes=modes, study_mode=study_mode)
    configs = {spec: run_config(cfg, spec) for spec in runs}
    for spec in runs:
        if spec.mode == "reference" and cfg.model.reference_task not in spec.tasks and spec.seed == seeds[0]:
            log.info("run %s lacks %s: its reference task is its first task, %s",
                     "+".join(spec.tasks), cfg.model.reference_task, spec.tasks[0])
    from mult.data.samples import read_manifest

    samples = int(read_manifest(cfg.data.train)["num_samples"])
    return Ablation(cfg, out, list(studies), list(seeds), list(modes), study_mode, runs, configs, samples)


def ablation_smoke_config(cfg: Config, out: Path) -> Config:
    """A seconds-long ablation: the training smoke settings, data generated under ``out``."""
    from mult.training.plan import smoke_config

    # the generated data lands in {out}/smoke-data; one process per run: no loader processes
    return smoke_config(derive(cfg, {"train.storage_path": str(out), "data.num_workers": 0}))


def run_result(spec: RunSpec, cfg: Config, outcome: Mapping[str, Any]) -> RunResult:
    """A finished run's outcome (``execute_run`` or a TorchTrainer's) -> its :class:`RunResult`."""
    report = outcome["report"]
    extra: dict[str, Any] = {k: float(v) for k, v in report.items()
                             if k.startswith("loss/") and isinstance(v, (int, float))}
    if "train_run" in outcome:
        extra["train_run"] = outcome["train_run"]
    return RunResult(
        spec, metrics_from_report(report, list(spec.tasks)), fingerprint(cfg),
        reference_task=cfg.model.reference_task if spec.mode == "reference" else None,
        seconds=float(outcome.get("seconds", math.nan)), steps=int(report.get("step", 0)), extra=extra,
    )
