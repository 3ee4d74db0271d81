"""What an ablation's runs say: Delta-m per mode, the task-affinity table, the number-of-tasks
curve, as tables (Markdown, JSON) and plots.

Delta-m of a run is computed against the baselines **of the same seed**
(:func:`mult.metrics.delta_m`, positive = better than single-task), then averaged over seeds;
the std (sample std, ddof=1) therefore carries the seed noise of both the multitask run and its
baselines.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
from pathlib import Path
from typing import Any, Mapping, Sequence

from mult.experiments.ablation import (BASELINE_MODE, MODES, Ablation, RunResult, RunSpec, num_task_subsets,
                                       task_pairs)
from mult.experiments.constant import LABEL
from mult.metrics import delta_m, relative_change
from mult.outputs import json_safe, pyplot, save_figure
from mult.tasks import get_task

log = logging.getLogger(__name__)


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
    metric = get_task(task).primary_metric
    b = base.get(seed, {}).get(task, {}).get(metric.name)
    return math.nan if result is None or b is None else relative_change(_primary(result, task), b, metric.higher_is_better)


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
    floor = summary.get("constant")
    if floor:
        raw_rows.append([f"{LABEL} (the floor)"] + [f"{floor[t][m]:.3f}" if m in floor.get(t, {}) else "n/a"
                                                   for t, m in zip(tasks, primary)])
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
def _mean_err(stat: Mapping[str, Any]) -> tuple[float, float]:
    std = stat.get("std", math.nan)
    return stat.get("mean", math.nan), (std if math.isfinite(std) else 0.0)


def _delta_m_figure(points: Sequence[tuple[Any, Mapping[str, Any]]], title: str, bars: bool):
    """Delta-m (mean ± 1 std over seeds) at each point: bars (categories) or a line (numbers)."""
    fig, ax = pyplot().subplots(figsize=(4.5, 3.2))
    xs = [x for x, _ in points]
    values = [_mean_err(stat) for _, stat in points]
    means, errs = [v for v, _ in values], [e for _, e in values]
    if bars:
        ax.bar(xs, means, yerr=errs, capsize=4, color="#4c72b0")
    else:
        ax.errorbar(xs, means, yerr=errs, marker="o", capsize=4)
        ax.set_xticks(xs)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_ylabel("Delta-m vs single-task (%)")
    ax.set_title(title)
    return fig, ax


def plot_modes(summary: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Bar chart: Delta-m per mode with ±1 std error bars."""
    points = [(m, s["delta_m"]) for m, s in summary["modes"].items()]
    fig, _ = _delta_m_figure(points, f"Shared attention ({_seeds(len(summary['seeds']))})", bars=True)
    return save_figure(fig, path, dpi=120)


def plot_affinity(aff: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Heat map of the affinity table (diverging, centred on 0)."""
    import numpy as np

    tasks = aff["tasks"]
    grid = np.full((len(tasks), len(tasks)), np.nan)
    for i, t in enumerate(tasks):
        for j, p in enumerate(tasks):
            if p != t and p in aff["table"][t]:
                grid[i, j] = aff["table"][t][p]["mean"]
    finite = grid[np.isfinite(grid)]
    lim = float(np.max(np.abs(finite))) if finite.size else 1.0
    fig, ax = pyplot().subplots(figsize=(1.2 * len(tasks) + 2.5, 1.0 * len(tasks) + 1.5))
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
    return save_figure(fig, path, dpi=120)


def plot_num_tasks(curve: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Delta-m against the number of tasks, ±1 std error bars."""
    points = [(r["k"], r["delta_m"]) for r in curve["rows"]]
    fig, ax = _delta_m_figure(points, f"Number of tasks ({_seeds(len(curve['seeds']))})", bars=False)
    ax.set_xlabel("number of tasks")
    return save_figure(fig, path, dpi=120)


def write_reports(abl: Ablation, results: Results, constant: Mapping[str, Mapping[str, float]] | None = None
                  ) -> dict[str, Any]:
    """Tables, JSON and plots for each study of this invocation; returns the combined summary.
    ``constant``: the constant predictor's validation metrics (the floor row of the modes table)."""
    cfg, out = abl.cfg, abl.out
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "tasks": list(cfg.tasks), "seeds": abl.seeds, "studies": abl.studies,
        "settings": _settings(abl), "runs": {spec.run_id: results[spec].to_dict() for spec in abl.runs if spec in results},
        "missing_runs": [spec.run_id for spec in abl.runs if spec not in results],
    }
    sections = [_header(abl, results)]
    baselines = summarize_baselines(results, cfg.tasks, abl.seeds)
    summary["baselines"] = baselines
    means = {t: {m: s["mean"] for m, s in ms.items() if math.isfinite(s["mean"])} for t, ms in baselines.items()}
    (out / "baselines.json").write_text(json.dumps(means, indent=1, sort_keys=True))
    for study in abl.studies:
        if study == "modes":
            data = summarize_modes(results, cfg.tasks, abl.seeds, abl.modes)
            if constant:
                data["constant"] = {t: dict(m) for t, m in constant.items()}
            text = markdown_modes(data)
            plot_modes(data, out / "modes.png")
            name = "modes"
        elif study == "pairwise":
            data = affinity_table(results, cfg.tasks, abl.seeds, abl.study_mode)
            text = markdown_affinity(data)
            plot_affinity(data, out / "pairwise.png")
            name = "pairwise"
        else:
            data = num_tasks_curve(results, cfg.tasks, abl.seeds, abl.study_mode)
            text = markdown_num_tasks(data)
            plot_num_tasks(data, out / "num_tasks.png")
            name = "num_tasks"
        summary[name] = data
        (out / f"{name}.json").write_text(json.dumps(json_safe(data), indent=1))
        (out / f"{name}.md").write_text(text + "\n")
        sections.append(text)
    (out / "report.md").write_text("\n\n".join(sections) + "\n")
    (out / "results.json").write_text(json.dumps(json_safe(summary), indent=1))
    return summary


def _settings(abl: Ablation) -> dict[str, Any]:
    c = abl.cfg
    return {
        "data_train": c.data.train, "data_val": c.data.val, "train_samples": abl.data_samples,
        "image_size": c.model.img_size, "max_steps": c.train.max_steps,
        "global_batch_size": c.train.global_batch_size, "lr": c.optim.lr, "encoder": c.model.encoder,
        "embed_dim": c.model.embed_dim, "eval_batches": c.train.val_batches,
        "study_mode": abl.study_mode, "modes": abl.modes,
    }


def _header(abl: Ablation, results: Results) -> str:
    s = _settings(abl)
    seconds = sum(r.seconds for r in results.values() if math.isfinite(r.seconds))
    missing = [spec.run_id for spec in abl.runs if spec not in results]
    lines = [
        f"Ablation on {', '.join(abl.cfg.tasks)}; seeds {', '.join(map(str, abl.seeds))}; "
        f"{s['max_steps']} steps of {s['global_batch_size']} samples at {s['image_size']} px "
        f"({s['train_samples']} training samples, data.train={s['data_train']}); "
        f"{len(abl.runs)} runs, {seconds / 60:.1f} run-minutes in total.",
    ]
    if missing:
        lines.append(f"**Missing runs** (failed or not yet trained; their cells are n/a or averaged over fewer "
                     f"seeds): {', '.join(missing)}.")
    return "\n\n".join(lines)
