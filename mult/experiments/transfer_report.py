"""Evaluation outputs: ``results.json`` and a Markdown report with baselines.

The results are plain data (what :func:`mult.experiments.transfer.build_results` assembles)::

    {
      "checkpoint": str, "model_tasks": [task, ...],
      "sets": [                      # one entry per evaluated row of the report
        {"label": "nyu+ft", "name": "nyu", "url": str, "num_samples": int, "bad_samples": int,
         "tasks": [task, ...], "skipped": {task: reason},
         "metrics": {task: {metric: float}}, "alignment": str,
         "finetune": null | {...}, "corruption": null | {...}}
      ],
      "label_map": str | null,       # Markdown of the NYU40 -> Taskonomy table, when used
    }

Baselines are single-task results in the same ``{task: {metric: value}}`` layout, given per
set name; the change against them is :func:`mult.metrics.relative_change` (positive = better,
the convention of MulT's tables).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

from mult.metrics import Baselines, delta_m, relative_change
from mult.outputs import fmt, json_safe
from mult.tasks import TASKS, get_task


def higher_is_better(task: str, metric: str) -> bool:
    return get_task(task).metric(metric).higher_is_better


def attach_baselines(results: dict[str, Any], baselines: Mapping[str, Baselines]) -> None:
    """Add ``baselines`` and ``relative_change`` (``{task: {metric: %}}``) to each set entry
    whose ``name`` has baselines; metrics without a baseline are left out."""
    for entry in results["sets"]:
        base = baselines.get(entry["name"])
        if not base:
            continue
        entry["baselines"] = {t: dict(m) for t, m in base.items() if t in entry["metrics"]}
        try:
            entry["delta_m"] = delta_m(entry["metrics"], base, list(entry["metrics"]))
        except ValueError as exc:  # a baseline or metric is missing: no Delta-m for this set
            entry["delta_m"] = None
            entry["delta_m_note"] = str(exc)
        entry["relative_change"] = {
            task: {
                metric: relative_change(value, base[task][metric], higher_is_better(task, metric))
                for metric, value in metrics.items()
                if metric in base.get(task, {})
            }
            for task, metrics in entry["metrics"].items()
        }


def write_results(results: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(results), indent=2, sort_keys=False) + "\n")
    return path


def markdown_table(results: Mapping[str, Any]) -> str:
    """Sets x tasks x metrics, one row per metric; baseline and change columns when present."""
    with_base = any("baselines" in e for e in results["sets"])
    head = "| set | task | metric | value |"
    head += " single-task baseline | change vs baseline |" if with_base else ""
    rule = "|---|---|---|---:|" + ("---:|---:|" if with_base else "")
    lines = [head, rule]
    for entry in results["sets"]:
        base = entry.get("baselines", {})
        change = entry.get("relative_change", {})
        for task, metrics in entry["metrics"].items():
            for metric, value in metrics.items():
                arrow = "↑" if higher_is_better(task, metric) else "↓"
                row = f"| {entry['label']} | {task} | {metric} {arrow} | {fmt(value)} |"
                if with_base:
                    b = base.get(task, {}).get(metric)
                    c = change.get(task, {}).get(metric)
                    row += f" {fmt(b)} | {'–' if c is None or not math.isfinite(c) else f'{c:+.2f}%'} |"
                lines.append(row)
    return "\n".join(lines)


def summary_table(results: Mapping[str, Any]) -> str:
    """Sets x tasks, one cell per task: its primary metric (the first one the set reports,
    e.g. ``si_abs_rel`` where metric depth is not reported); ``–`` where not evaluated."""
    tasks = [t for t in TASKS if any(t in e["metrics"] for e in results["sets"])]
    cells = {t: [m.name for m in TASKS[t].metrics] for t in tasks}
    lines = ["| set | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
    for entry in results["sets"]:
        row = []
        for t in tasks:
            metrics = entry["metrics"].get(t, {})
            name = next((m for m in cells[t] if m in metrics), None)
            arrow = "" if name is None else ("↑" if higher_is_better(t, name) else "↓")
            row.append("–" if name is None else f"{fmt(metrics[name])} ({name} {arrow})")
        lines.append(f"| {entry['label']} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def markdown_report(results: Mapping[str, Any]) -> str:
    """The whole report: metrics table, per-set notes (tasks skipped, unit alignment), and the
    NYU label mapping when it was used."""
    parts = [
        "# MulT evaluation",
        "",
        f"Checkpoint: `{results.get('checkpoint', '?')}`; tasks it predicts: "
        f"{', '.join(results.get('model_tasks', []))}.",
        "",
        *(["**Partial run** (--max-batches / --smoke-test): not the full test splits.", ""]
          if results.get("partial") else []),
        "↑ higher is better, ↓ lower is better. The change vs baseline is in percent, "
        "positive = better than the single-task baseline.",
        "",
        *(["Rows ending in *constant predictor* are the floor: the same set scored by a prediction that "
           "ignores the image (per task, the per-pixel median of the training targets; for "
           "segmentation, the per-pixel class frequencies), fitted on the checkpoint's training shards.", ""]
          if any(e.get("floor") for e in results["sets"]) else []),
        "## Summary (each task's primary metric)",
        "",
        summary_table(results),
        "",
        "## All metrics",
        "",
        markdown_table(results),
        "",
        "## Sets",
        "",
    ]
    for entry in results["sets"]:
        if entry.get("floor"):
            continue
        parts.append(f"### {entry['label']}")
        parts.append("")
        parts.append(f"- data: `{entry['url']}` ({entry.get('num_samples', '?')} test samples)")
        if entry.get("bad_samples"):
            parts.append(f"- {entry['bad_samples']} sample(s) skipped as undecodable (see the loader log)")
        parts.append(f"- tasks evaluated: {', '.join(entry['tasks']) or 'none'}")
        for task, reason in entry.get("skipped", {}).items():
            parts.append(f"- skipped {task}: {reason}")
        if entry.get("delta_m") is not None:
            parts.append(f"- Delta-m vs single-task baselines (primary metrics): {entry['delta_m']:+.2f}%")
        elif entry.get("delta_m_note"):
            parts.append(f"- no Delta-m: {entry['delta_m_note']}")
        if entry.get("alignment"):
            parts.append(f"- unit alignment: {entry['alignment']}")
        if entry.get("finetune"):
            ft = entry["finetune"]
            parts.append(f"- fine-tuned first on `{ft['url']}` for {ft['steps']} steps (lr {ft['lr']})")
        if entry.get("corruption"):
            c = entry["corruption"]
            parts.append(f"- corruption: {c['type']} (sigma {c['sigma']} px at the model's resolution)")
        parts.append("")
    if results.get("label_map"):
        parts += ["## NYU40 -> Taskonomy classes", "", results["label_map"], ""]
    return "\n".join(parts)


def write_report(results: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``results.json`` and ``report.md`` under ``out_dir``; return both paths."""
    out_dir = Path(out_dir)
    json_path = write_results(results, out_dir / "results.json")
    md_path = out_dir / "report.md"
    md_path.write_text(markdown_report(results))
    return json_path, md_path
