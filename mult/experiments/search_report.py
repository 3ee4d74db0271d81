"""The loss-weight search's outputs: ``trials.csv`` / ``trials.json``, ``best.yaml``, ``report.md``
and three plots.

``best.yaml`` is an override file that ``load_config(path, ["@best.yaml"])`` and
``pipelines.train`` accept as it is.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import yaml

from mult.experiments.search import (LEARNED_ARMS, SEARCH_ARM, Objective, SearchSpace, TrialRecord, finite,
                                     best_overrides, best_record, mark_stopped_early)
from mult.outputs import fmt, json_safe, pyplot, save_figure
from mult.tasks import get_task

log = logging.getLogger(__name__)


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
    json_path.write_text(json.dumps(json_safe(payload), indent=2))
    return [csv_path, json_path]


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
            values = [fmt(r.metrics.get(t, {}).get(get_task(t).primary_metric.name)) for t in tasks]
            weights = [fmt(r.weights.get(t)) for t in tasks]
            label = "best searched weights" if r.arm == SEARCH_ARM else f"{r.arm} weighting"
            lines.append(f"| {label} | {r.trial_id} | {r.step} | {fmt(r.objective)} | "
                         + " | ".join(weights) + " | " + " | ".join(values) + " |")
    else:
        lines.append("No trial finished with a finite objective.")
    path.write_text("\n".join(lines) + "\n")
    return path


# --------------------------------------------------------------------------------------------
def plot_objective_vs_weights(
    records: Sequence[TrialRecord], space: SearchSpace, objective: Objective, path: str | Path
) -> Path:
    """One panel per searched task: objective (y) against that task's weight (x, log scale)."""
    plt = pyplot()
    tasks = list(space.searched)
    cols = min(3, len(tasks))
    rows = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    done = [r for r in records if r.arm == SEARCH_ARM and finite(r.objective)]
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
    return save_figure(fig, path, dpi=90)


def plot_task_metrics(records: Sequence[TrialRecord], path: str | Path) -> Path:
    """One panel per task: its primary validation metric for every trial (bars)."""
    plt = pyplot()
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
    return save_figure(fig, path, dpi=90)


def plot_asha(records: Sequence[TrialRecord], objective: Objective, max_steps: int, path: str | Path) -> Path:
    """Objective against step for every trial; an X where ASHA stopped a trial."""
    plt = pyplot()
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
    return save_figure(fig, path, dpi=90)


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


def publish(records: list[TrialRecord], url: str, *, space: SearchSpace, objective: Objective,
            max_steps: int) -> list[str]:
    """:func:`write_outputs` into the experiment directory ``url`` (local or S3); returns what
    was written."""
    from mult.data.storage import open_storage

    if not url.startswith("s3://"):
        return [str(p) for p in write_outputs(records, url, space=space, objective=objective, max_steps=max_steps)]
    storage = open_storage(url)
    with tempfile.TemporaryDirectory(prefix="mult-tune-") as tmp:
        paths = write_outputs(records, tmp, space=space, objective=objective, max_steps=max_steps)
        urls = []
        for path in paths:
            rel = Path(path).relative_to(tmp).as_posix()
            storage.upload_file(path, rel)
            urls.append(f"{url}/{rel}")
    return urls
