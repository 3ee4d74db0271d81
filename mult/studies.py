"""Ablation studies: which runs to train, and what their metrics say (pure Python, no Ray).

Three studies, all measured against single-task baselines trained with the same data, steps
and seeds (see ``pipelines.ablate`` for how the runs execute):

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

Delta-m of a run is computed against the baselines **of the same seed** (:func:`mult.metrics.delta_m`,
positive = better than single-task), then averaged over seeds; the std (sample std, ddof=1)
therefore carries the seed noise of both the multitask run and its baselines.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from mult.config import Config, from_dict, to_dict
from mult.tasks import get_task

log = logging.getLogger(__name__)

MODES: tuple[str, ...] = ("reference", "encoder", "none")
STUDIES: tuple[str, ...] = ("modes", "pairwise", "num-tasks")
BASELINE_MODE = "none"
RESULT_VERSION = 1

# Config fields that do not change what a run computes: excluded from its fingerprint, so a
# result stays valid when only the launcher, logging or storage differ.
_FINGERPRINT_IGNORED = {
    "train": ("storage_path", "run_name", "baselines", "max_failures", "log_every", "checkpoint_every",
              "keep_checkpoints", "val_every"),
    "data": ("num_workers",),
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


def plan_modes(tasks: Sequence[str], seeds: Sequence[int], modes: Sequence[str] = MODES) -> list[RunSpec]:
    """All configured tasks, once per mode and seed (baselines not included)."""
    _check_tasks(tasks, seeds)
    if len(tasks) < 2:
        raise StudyError(f"the modes study needs at least 2 tasks, got {list(tasks)}")
    if not modes:
        raise StudyError(f"the modes study needs at least one mode; choose from {list(MODES)}")
    for mode in modes:
        _check_mode(mode)
    return [RunSpec(tuple(tasks), m, s) for s in seeds for m in modes]


def task_pairs(tasks: Sequence[str]) -> list[tuple[str, str]]:
    """Every unordered pair, each in configured order: ``len(tasks) * (len(tasks) - 1) / 2``."""
    return list(itertools.combinations(tasks, 2))


def plan_pairwise(tasks: Sequence[str], seeds: Sequence[int], mode: str = "reference") -> list[RunSpec]:
    """One run per unordered task pair and seed (baselines not included)."""
    _check_tasks(tasks, seeds)
    _check_mode(mode)
    if len(tasks) < 2:
        raise StudyError(f"the pairwise study needs at least 2 tasks, got {list(tasks)}")
    return [RunSpec(pair, mode, s) for s in seeds for pair in task_pairs(tasks)]


def num_task_subsets(tasks: Sequence[str], min_tasks: int = 2) -> list[tuple[str, ...]]:
    """The nested prefixes ``tasks[:k]`` for ``k = min_tasks .. len(tasks)`` (the subset rule)."""
    if min_tasks < 1:
        raise StudyError(f"min_tasks must be >= 1, got {min_tasks}")
    return [tuple(tasks[:k]) for k in range(min_tasks, len(tasks) + 1)]


def plan_num_tasks(tasks: Sequence[str], seeds: Sequence[int], mode: str = "reference") -> list[RunSpec]:
    """One run per prefix size k = 2..N and seed (baselines not included)."""
    _check_tasks(tasks, seeds)
    _check_mode(mode)
    if len(tasks) < 2:
        raise StudyError(f"the num-tasks study needs at least 2 tasks, got {list(tasks)}")
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
    data = copy.deepcopy(to_dict(base))
    data["tasks"] = list(spec.tasks)
    data["loss_weights"] = {t: w for t, w in base.loss_weights.items() if t in spec.tasks}
    data["model"]["shared_attention"] = spec.mode
    data["model"]["reference_task"] = reference_for(spec.tasks, base.model.reference_task)
    data["train"]["seed"] = spec.seed
    return from_dict(data)


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
    """``{"val/<task>/<metric>": v, ...}`` (the training loop's report) -> ``{task: {metric: v}}``.

    Raises :class:`StudyError` when a task's primary metric is missing (no validation ran).
    """
    out: dict[str, dict[str, float]] = {}
    for key, value in report.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == "val" and parts[1] in tasks:
            out.setdefault(parts[1], {})[parts[2]] = float(value)
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
# Aggregation.
# ============================================================================================
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (ddof=1) of the finite ``values``; NaN where undefined."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    mean = statistics.fmean(finite)
    return mean, (statistics.stdev(finite) if len(finite) > 1 else math.nan)


def _stat(values: Sequence[float]) -> dict[str, Any]:
    mean, std = mean_std(values)
    return {"mean": mean, "std": std, "n": sum(1 for v in values if math.isfinite(v)), "values": list(values)}


def relative_change(task: str, value: float, baseline: float) -> float:
    """Percent change of ``task``'s primary metric vs its baseline; positive = better.

    ``100 * (value - baseline) / baseline``, sign flipped when lower is better (as in Delta-m).
    """
    metric = get_task(task).primary_metric
    if baseline == 0 or not math.isfinite(baseline) or not math.isfinite(value):
        return math.nan
    sign = 1.0 if metric.higher_is_better else -1.0
    return 100.0 * sign * (value - baseline) / baseline


Results = Mapping[RunSpec, RunResult]


def baselines_by_seed(results: Results, tasks: Sequence[str], seeds: Sequence[int]) -> dict[int, dict[str, dict[str, float]]]:
    """``{seed: {task: metrics}}`` from the single-task runs present in ``results``."""
    out: dict[int, dict[str, dict[str, float]]] = {}
    for seed in seeds:
        for task in tasks:
            result = results.get(RunSpec((task,), BASELINE_MODE, seed))
            if result is not None and task in result.metrics:
                out.setdefault(seed, {})[task] = result.metrics[task]
    return out


def run_delta_m(result: RunResult, baselines: Mapping[str, Mapping[str, float]]) -> float:
    """Delta-m (percent, positive = better) of one run vs same-seed baselines; NaN if one is missing."""
    from mult.metrics import delta_m

    try:
        return delta_m(result.metrics, baselines, list(result.spec.tasks))
    except ValueError as exc:
        log.warning("no Delta-m for %s: %s", result.spec.run_id, exc)
        return math.nan


def _primary(result: RunResult | None, task: str) -> float:
    if result is None:
        return math.nan
    return result.metrics.get(task, {}).get(get_task(task).primary_metric.name, math.nan)


def _rel(result: RunResult | None, task: str, base: Mapping[int, Mapping[str, Mapping[str, float]]], seed: int) -> float:
    b = base.get(seed, {}).get(task, {}).get(get_task(task).primary_metric.name)
    return math.nan if result is None or b is None else relative_change(task, _primary(result, task), b)


def _all_metrics(runs: Sequence[RunResult | None], task: str) -> dict[str, dict[str, Any]]:
    names = [m.name for m in get_task(task).metrics]
    return {m: _stat([r.metrics.get(task, {}).get(m, math.nan) if r else math.nan for r in runs]) for m in names}


def summarize_set(
    results: Results, tasks: Sequence[str], mode: str, seeds: Sequence[int],
    base: Mapping[int, Mapping[str, Mapping[str, float]]],
) -> dict[str, Any]:
    """Delta-m and per-task numbers of the runs ``(tasks, mode, seed)`` over ``seeds``."""
    runs = [results.get(RunSpec(tuple(tasks), mode, s)) for s in seeds]
    dms = [run_delta_m(r, base.get(s, {})) if r is not None else math.nan for r, s in zip(runs, seeds)]
    return {
        "tasks": list(tasks), "mode": mode,
        "delta_m": _stat(dms),
        "relative": {t: _stat([_rel(r, t, base, s) for r, s in zip(runs, seeds)]) for t in tasks},
        "metrics": {t: _all_metrics(runs, t) for t in tasks},
        "reference_task": next((r.reference_task for r in runs if r is not None), None),
    }


def summarize_baselines(results: Results, tasks: Sequence[str], seeds: Sequence[int]) -> dict[str, Any]:
    """Each task's single-task metrics, mean +- std over seeds."""
    return {t: _all_metrics([results.get(RunSpec((t,), BASELINE_MODE, s)) for s in seeds], t) for t in tasks}


def summarize_modes(results: Results, tasks: Sequence[str], seeds: Sequence[int], modes: Sequence[str] = MODES) -> dict[str, Any]:
    """``{"baselines": ..., "modes": {mode: summarize_set(...)}}`` for the modes study."""
    base = baselines_by_seed(results, tasks, seeds)
    return {
        "tasks": list(tasks), "seeds": list(seeds),
        "baselines": summarize_baselines(results, tasks, seeds),
        "modes": {m: summarize_set(results, tasks, m, seeds, base) for m in modes},
    }


def affinity_table(results: Results, tasks: Sequence[str], seeds: Sequence[int], mode: str = "reference") -> dict[str, Any]:
    """Task affinity: ``table[tested][partner]`` = stats of the tested task's relative change.

    The entry is the percent change of ``tested``'s primary metric in the pair run
    ``{tested, partner}`` against ``tested``'s single-task baseline of the same seed (positive =
    the partner helps). The diagonal is absent. Also gives each pair's Delta-m.
    """
    base = baselines_by_seed(results, tasks, seeds)
    table: dict[str, dict[str, Any]] = {t: {} for t in tasks}
    pairs: dict[str, Any] = {}
    for pair in task_pairs(tasks):
        summary = summarize_set(results, pair, mode, seeds, base)
        a, b = pair
        table[a][b] = summary["relative"][a]
        table[b][a] = summary["relative"][b]
        pairs["+".join(pair)] = summary["delta_m"]
    return {"tasks": list(tasks), "seeds": list(seeds), "mode": mode, "table": table, "pair_delta_m": pairs}


def num_tasks_curve(results: Results, tasks: Sequence[str], seeds: Sequence[int], mode: str = "reference") -> dict[str, Any]:
    """One row per prefix size k: Delta-m over the k tasks, and each task's relative change."""
    base = baselines_by_seed(results, tasks, seeds)
    rows = []
    for subset in num_task_subsets(tasks):
        summary = summarize_set(results, subset, mode, seeds, base)
        rows.append({"k": len(subset), "tasks": list(subset), "delta_m": summary["delta_m"],
                     "relative": summary["relative"], "reference_task": summary["reference_task"]})
    return {"tasks": list(tasks), "seeds": list(seeds), "mode": mode, "rows": rows}


# ============================================================================================
# Markdown.
# ============================================================================================
def fmt(stat: Mapping[str, Any] | None, digits: int = 2, signed: bool = False) -> str:
    """``"mean ± std"`` (``n/a`` where undefined)."""
    if stat is None or not math.isfinite(stat.get("mean", math.nan)):
        return "n/a"
    spec = f"{'+' if signed else ''}.{digits}f"
    std = stat.get("std", math.nan)
    text = format(round(stat["mean"], digits) + 0.0, spec)  # + 0.0: no "-0.00" from rounding noise
    return f"{text} ± {std:.{digits}f}" if math.isfinite(std) else text


def _seeds(n: int) -> str:
    return f"{n} seed" if n == 1 else f"{n} seeds"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _metric_label(task: str) -> str:
    m = get_task(task).primary_metric
    return f"{task} {m.name} {'↑' if m.higher_is_better else '↓'}"


def markdown_modes(summary: Mapping[str, Any]) -> str:
    """Two tables: Delta-m and per-task relative change per mode; raw primary metrics per mode."""
    tasks = summary["tasks"]
    n = len(summary["seeds"])
    rel_rows = [[mode, fmt(s["delta_m"], signed=True)] + [fmt(s["relative"][t], signed=True) for t in tasks]
                for mode, s in summary["modes"].items()]
    primary = [get_task(t).primary_metric.name for t in tasks]
    raw_rows = [["single-task (none)"] + [fmt(summary["baselines"][t][m], 3) for t, m in zip(tasks, primary)]]
    raw_rows += [[mode] + [fmt(s["metrics"][t][m], 3) for t, m in zip(tasks, primary)]
                 for mode, s in summary["modes"].items()]
    refs = {m: s.get("reference_task") for m, s in summary["modes"].items() if m == "reference"}
    ref_note = f" `reference` mode used `{refs['reference']}` as the reference task." if refs.get("reference") else ""
    return "\n\n".join([
        f"**Shared-attention modes** on {', '.join(tasks)}: Delta-m and per-task relative change of the "
        f"primary metric vs single-task baselines (percent, positive = better; mean ± std over {_seeds(n)})."
        + ref_note,
        _table(["mode", "Delta-m %"] + [f"{t} Δ%" for t in tasks], rel_rows),
        f"Primary metrics (mean ± std over {_seeds(n)}):",
        _table(["model"] + [_metric_label(t) for t in tasks], raw_rows),
    ])


def markdown_affinity(aff: Mapping[str, Any]) -> str:
    """The task-affinity table (rows: tested task, columns: partner) and each pair's Delta-m."""
    tasks = aff["tasks"]
    n = len(aff["seeds"])
    rows = [[t] + ["—" if p == t else fmt(aff["table"][t].get(p), signed=True) for p in tasks] for t in tasks]
    pair_rows = [[pair.replace("+", " + "), fmt(stat, signed=True)] for pair, stat in aff["pair_delta_m"].items()]
    return "\n\n".join([
        f"**Task affinity** (pairs trained with `{aff['mode']}` shared attention): rows = tested task, "
        "columns = partner; entry = relative change (percent, positive = better) of the tested task's "
        f"primary metric vs its single-task baseline, mean ± std over {_seeds(n)}.",
        _table(["tested \\ partner"] + tasks, rows),
        "Delta-m of each pair:",
        _table(["pair", "Delta-m %"], pair_rows),
    ])


def markdown_num_tasks(curve: Mapping[str, Any]) -> str:
    """Delta-m per number of tasks, with each task's relative change."""
    tasks = curve["tasks"]
    n = len(curve["seeds"])
    rows = [[str(r["k"]), "+".join(r["tasks"][-1:]), fmt(r["delta_m"], signed=True)]
            + [fmt(r["relative"][t], signed=True) if t in r["relative"] else "" for t in tasks]
            for r in curve["rows"]]
    return "\n\n".join([
        f"**Number of tasks** (`{curve['mode']}` shared attention; subset k = the first k of "
        f"{', '.join(tasks)}): Delta-m over the k tasks and each task's relative change vs its "
        f"single-task baseline (percent, positive = better; mean ± std over {_seeds(n)}).",
        _table(["k", "added", "Delta-m %"] + [f"{t} Δ%" for t in tasks], rows),
    ])


# ============================================================================================
# Plots (matplotlib, imported on use).
# ============================================================================================
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _mean_err(stat: Mapping[str, Any]) -> tuple[float, float]:
    std = stat.get("std", math.nan)
    return stat.get("mean", math.nan), (std if math.isfinite(std) else 0.0)


def plot_modes(summary: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Bar chart: Delta-m per mode with ±1 std error bars."""
    plt = _pyplot()
    modes = list(summary["modes"])
    values = [_mean_err(summary["modes"][m]["delta_m"]) for m in modes]
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.bar(modes, [v for v, _ in values], yerr=[e for _, e in values], capsize=4, color="#4c72b0")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_ylabel("Delta-m vs single-task (%)")
    ax.set_title(f"Shared attention ({_seeds(len(summary['seeds']))})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_affinity(aff: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Heat map of the affinity table (diverging, centred on 0)."""
    import numpy as np

    plt = _pyplot()
    tasks = aff["tasks"]
    grid = np.full((len(tasks), len(tasks)), np.nan)
    for i, t in enumerate(tasks):
        for j, p in enumerate(tasks):
            if p != t and p in aff["table"][t]:
                grid[i, j] = aff["table"][t][p]["mean"]
    finite = grid[np.isfinite(grid)]
    lim = float(np.max(np.abs(finite))) if finite.size else 1.0
    fig, ax = plt.subplots(figsize=(1.2 * len(tasks) + 2.5, 1.0 * len(tasks) + 1.5))
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="RdBu", vmin=-lim or -1, vmax=lim or 1)
    ax.set_xticks(range(len(tasks)), tasks, rotation=40, ha="right")
    ax.set_yticks(range(len(tasks)), tasks)
    ax.set_xlabel("partner task")
    ax.set_ylabel("tested task")
    for i in range(len(tasks)):
        for j in range(len(tasks)):
            if np.isfinite(grid[i, j]):
                dark = abs(grid[i, j]) > 0.6 * lim  # white text on the saturated cells
                ax.text(j, i, f"{grid[i, j]:+.1f}", ha="center", va="center", fontsize=8,
                        color="white" if dark else "black")
    fig.colorbar(image, ax=ax, label="% change vs single-task")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_num_tasks(curve: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Delta-m against the number of tasks, ±1 std error bars."""
    plt = _pyplot()
    ks = [r["k"] for r in curve["rows"]]
    values = [_mean_err(r["delta_m"]) for r in curve["rows"]]
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.errorbar(ks, [v for v, _ in values], yerr=[e for _, e in values], marker="o", capsize=4)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(ks)
    ax.set_xlabel("number of tasks")
    ax.set_ylabel("Delta-m vs single-task (%)")
    ax.set_title(f"Number of tasks ({_seeds(len(curve['seeds']))})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def json_safe(obj: Any) -> Any:
    """NaN/inf -> None, recursively (strict JSON for other tools)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return json_safe(dataclasses.asdict(obj))
    return obj
