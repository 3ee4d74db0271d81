"""The pure-Python half of the loss-weight search (``pipelines.tune`` is the Ray half).

* :func:`build_search_space`: which task weights are searched, over which log-uniform ranges,
  and which one is held fixed as the reference; every problem is a :class:`ConfigError`.
* The objective. With single-task baselines it is **Delta-m** (percent, higher is better,
  :func:`mult.metrics.delta_m`). Without them it is the fallback
  ``mean_normalized_val_loss`` = mean over tasks of ``L_t / L_t(first validation)`` (lower is
  better). The weighted total loss is never used: it moves with the weights being searched.
* :class:`TrialRecord` rows -> ``trials.csv`` / ``trials.json``, ``best.yaml`` (an override
  file that ``load_config(path, ["@best.yaml"])`` and ``pipelines.train`` accept as it is),
  ``report.md`` and three plots (matplotlib, Agg backend).

Nothing here imports Ray.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from mult.config import Config, ConfigError, validate_tune
from mult.metrics import delta_m
from mult.tasks import get_task

log = logging.getLogger(__name__)

OBJECTIVE_KEY = "objective"  # the metric name Tune and ASHA see
SEARCH_ARM = "search"
LEARNED_ARMS = ("uncertainty", "dwa")
VAL_PREFIX = "val/"


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


def split_val_metrics(flat: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """``{"val/normal/loss": 0.3, ...}`` -> ``{"normal": {"loss": 0.3}}`` (other keys ignored)."""
    out: dict[str, dict[str, float]] = {}
    for key, value in flat.items():
        if not key.startswith(VAL_PREFIX) or key.count("/") != 2:
            continue
        _, task, metric = key.split("/")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out.setdefault(task, {})[metric] = float(value)
    return out


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


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def best_record(records: Sequence[TrialRecord], objective: Objective, arm: str = SEARCH_ARM) -> TrialRecord | None:
    """The best finished trial of ``arm``.

    Trials that ASHA stopped early are ranked too, by their last value; a stopped trial's value
    comes from fewer steps, so it rarely wins, but when it does it is the best evidence there is.
    """
    best = None
    for r in records:
        if r.arm != arm or r.status != "TERMINATED" or not _finite(r.objective):
            continue
        if best is None or objective.better(r.objective, best.objective):
            best = r
    return best


def _columns(records: Sequence[TrialRecord]) -> tuple[list[str], list[str]]:
    weights = sorted({t for r in records for t in r.weights})
    metrics = sorted({f"{t}/{m}" for r in records for t, ms in r.metrics.items() for m in ms})
    return weights, metrics


def write_tables(records: Sequence[TrialRecord], directory: str | Path, objective: Objective) -> list[Path]:
    """``trials.csv`` (one row per trial, flat) and ``trials.json`` (full records, histories)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights, metrics = _columns(records)
    header = ["trial_id", "arm", "status", "stopped_early", "step", "validations", objective.name,
              *(f"weight/{t}" for t in weights), *(f"val/{m}" for m in metrics), "error"]
    csv_path = directory / "trials.csv"
    with open(csv_path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for r in records:
            flat = {f"{t}/{m}": v for t, ms in r.metrics.items() for m, v in ms.items()}
            writer.writerow([r.trial_id, r.arm, r.status, r.stopped_early, r.step, len(r.history),
                             r.objective, *(r.weights.get(t) for t in weights),
                             *(flat.get(m) for m in metrics), r.error or ""])
    json_path = directory / "trials.json"
    payload = {"objective": asdict(objective), "trials": [asdict(r) for r in records]}
    json_path.write_text(json.dumps(payload, indent=2, default=_json_default, allow_nan=True))
    return [csv_path, json_path]


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars in Tune's results
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


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


def write_best_yaml(record: TrialRecord, path: str | Path, objective: Objective) -> Path:
    """``best.yaml``: use as ``python -m pipelines.train --config X.yaml @best.yaml``."""
    path = Path(path)
    header = (
        f"# Best loss weights of a pipelines.tune search: trial {record.trial_id}, "
        f"{objective.name} = {record.objective:.6g} ({objective.mode}) at step {record.step}.\n"
        f"# Use: python -m pipelines.train --config configs/<x>.yaml @{path.name}\n"
    )
    path.write_text(header + yaml.safe_dump(best_overrides(record), sort_keys=False))
    return path


def write_report(records: Sequence[TrialRecord], path: str | Path, objective: Objective) -> Path:
    """``report.md``: the objective, the best searched weights beside each learned-weighting arm."""
    path = Path(path)
    tasks = sorted({t for r in records for t in r.weights})
    rows = [r for r in (best_record(records, objective, SEARCH_ARM),) if r is not None]
    rows += [best for arm in LEARNED_ARMS if (best := best_record(records, objective, arm)) is not None]
    lines = [
        "# Loss-weight search", "",
        f"Objective: **{objective.name}** ({objective.description}).", "",
        f"Trials: {len(records)} ({sum(r.arm == SEARCH_ARM for r in records)} searched), "
        f"{sum(r.stopped_early for r in records)} stopped early by ASHA, "
        f"{sum(r.status == 'ERROR' for r in records)} errored.", "",
    ]
    if rows:
        primaries = [f"{t} {get_task(t).primary_metric.name}" for t in tasks]
        lines += [
            "| arm | trial | step | " + objective.name + " | " + " | ".join(f"w {t}" for t in tasks)
            + " | " + " | ".join(primaries) + " |",
            "|" + "---|" * (4 + 2 * len(tasks)),
        ]
        for r in rows:
            values = [_fmt(r.metrics.get(t, {}).get(get_task(t).primary_metric.name)) for t in tasks]
            weights = [_fmt(r.weights.get(t)) for t in tasks]
            label = "best searched weights" if r.arm == SEARCH_ARM else f"{r.arm} weighting"
            lines.append(f"| {label} | {r.trial_id} | {r.step} | {_fmt(r.objective)} | "
                         + " | ".join(weights) + " | " + " | ".join(values) + " |")
    else:
        lines.append("No trial finished with a finite objective.")
    path.write_text("\n".join(lines) + "\n")
    return path


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"


# --------------------------------------------------------------------------------------------
# Plots.
# --------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_objective_vs_weights(
    records: Sequence[TrialRecord], space: SearchSpace, objective: Objective, path: str | Path
) -> Path:
    """One panel per searched task: objective (y) against that task's weight (x, log scale)."""
    plt = _pyplot()
    tasks = list(space.searched)
    cols = min(3, len(tasks))
    rows = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    done = [r for r in records if r.arm == SEARCH_ARM and _finite(r.objective)]
    for ax, task in zip(axes.flat, tasks):
        for stopped, marker, label in ((False, "o", "ran to max_steps"), (True, "x", "stopped by ASHA")):
            pts = [(r.weights[task], r.objective) for r in done if r.stopped_early == stopped]
            if pts:
                ax.scatter(*zip(*pts), marker=marker, label=label)
        ax.set_xscale("log")
        ax.set_xlim(*space.searched[task])
        ax.set_xlabel(f"weight {task}")
        ax.set_ylabel(objective.name)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    if done:
        axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"{objective.name} ({'higher' if objective.mode == 'max' else 'lower'} is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)


def plot_task_metrics(records: Sequence[TrialRecord], path: str | Path) -> Path:
    """One panel per task: its primary validation metric for every trial (bars)."""
    plt = _pyplot()
    tasks = sorted({t for r in records for t in r.metrics})
    shown = [r for r in records if r.metrics]
    cols = max(1, min(3, len(tasks)))
    rows = max(1, math.ceil(len(tasks) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    labels = [f"{r.trial_id}\n{r.arm}" for r in shown]
    for ax, task in zip(axes.flat, tasks):
        metric = get_task(task).primary_metric
        values = [r.metrics.get(task, {}).get(metric.name, math.nan) for r in shown]
        colors = ["tab:gray" if r.stopped_early else "tab:blue" for r in shown]
        ax.bar(range(len(shown)), values, color=colors)
        ax.set_xticks(range(len(shown)), labels, rotation=60, fontsize=6)
        ax.set_title(f"{task}: {metric.name} ({'higher' if metric.higher_is_better else 'lower'} is better)",
                     fontsize=8)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    fig.suptitle("per-task validation metrics by trial (gray: stopped by ASHA)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)


def plot_asha(records: Sequence[TrialRecord], objective: Objective, max_steps: int, path: str | Path) -> Path:
    """Objective against step for every trial; an X where ASHA stopped a trial."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in records:
        if not r.history:
            continue
        steps, values = zip(*r.history)
        line = ax.plot(steps, values, marker=".", label=f"{r.trial_id} ({r.arm})")[0]
        if r.stopped_early:
            ax.plot(steps[-1], values[-1], marker="X", markersize=11, color=line.get_color())
            ax.annotate(f"stopped @{steps[-1]}", (steps[-1], values[-1]), fontsize=6,
                        textcoords="offset points", xytext=(4, 4))
    ax.axvline(max_steps, color="k", lw=0.5, ls=":")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(objective.name)
    ax.set_title("trials over time (X: stopped early by ASHA)", fontsize=9)
    if any(r.history for r in records):
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)


def write_outputs(
    records: Sequence[TrialRecord],
    directory: str | Path,
    *,
    space: SearchSpace,
    objective: Objective,
    max_steps: int,
) -> list[Path]:
    """Tables, ``best.yaml`` (when a searched trial finished), ``report.md`` and the plots."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    mark_stopped_early(records, max_steps)
    paths = write_tables(records, directory, objective)
    best = best_record(records, objective)
    if best is not None:
        paths.append(write_best_yaml(best, directory / "best.yaml", objective))
    else:
        log.warning("no searched trial finished with a finite %s; no best.yaml", objective.name)
    paths.append(write_report(records, directory / "report.md", objective))
    plots = directory / "plots"
    plots.mkdir(exist_ok=True)
    paths += [
        plot_objective_vs_weights(records, space, objective, plots / "objective_vs_weights.png"),
        plot_task_metrics(records, plots / "task_metrics.png"),
        plot_asha(records, objective, max_steps, plots / "asha.png"),
    ]
    return paths
