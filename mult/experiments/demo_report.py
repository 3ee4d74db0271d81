"""The demo's report: what ran, with the training, search and evaluation results."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from mult.data.datasets import TRAINING_SET
from mult.experiments.constant import LABEL
from mult.outputs import fmt
from mult.tasks import get_task


def write_report(out: Path, sizes: Any, storage: str, root: str, timings: list[tuple[str, float]]) -> Path:
    """``DIR/report.md``: what ran, with the training, search and evaluation results."""
    lines = ["# MulT demo report", ""]
    lines += [
        f"Storage: `{root}` ({'local S3-compatible server' if storage == 's3' else 'local directory'}); "
        f"views rendered at {sizes.render} px; Taskonomy: {sizes.taskonomy_buildings} buildings x "
        f"{sizes.taskonomy_views} views; training {sizes.train_steps} steps; Tune {sizes.tune_trials} "
        f"trials x {sizes.tune_steps} steps.",
        "",
        "Everything here is generated data and a tiny model: the numbers show the pipeline works "
        "end to end, not how MulT performs on real Taskonomy.",
        "",
        "## Stages",
        "",
        "| stage | seconds |",
        "|---|---:|",
        *[f"| {name} | {secs:.0f} |" for name, secs in timings],
        "",
    ]
    for stage, title in (("train", "Training (default weights)"), ("retrain", "Retraining with the best weights")):
        summary_path = out / stage / "summary.json"
        if not summary_path.exists():
            continue
        summary = json.loads(summary_path.read_text())
        lines += [f"## {title}", "", f"Run: `{summary['run_url']}`", ""]
        metrics = summary.get("metrics", {})
        keys = [k for k in sorted(metrics) if k.startswith(("loss/", "val/")) or k in ("step", "val_objective")]
        if keys:
            lines += ["| metric | value |", "|---|---:|"]
            lines += [f"| {k} | {metrics[k]:.4g} |" if isinstance(metrics[k], float) else f"| {k} | {metrics[k]} |" for k in keys]
            lines.append("")
        curve = Path(summary.get("local_dir", "")) / "loss_curve.png"
        if curve.exists():
            dest = out / stage / "loss_curve.png"
            shutil.copyfile(curve, dest)
            lines += [f"![loss curve]({dest.relative_to(out)})", ""]
    tune_dir = out / "tune"
    if (tune_dir / "report.md").exists():
        lines += ["## Loss-weight search", "",
                  "Best weights (an override file for `pipelines.train`): `tune/best.yaml`; all trials: `tune/trials.csv`.", ""]
        tune_md = (tune_dir / "report.md").read_text().splitlines()
        if tune_md and tune_md[0].startswith("# "):
            tune_md = tune_md[1:]  # its title repeats this section's heading
        lines += _demote("\n".join(tune_md), levels=2)
        lines += [f"![{p.stem}](tune/plots/{p.name})" for p in sorted((tune_dir / "plots").glob("*.png"))]
        lines.append("")
    eval_dir = out / "eval"
    if (eval_dir / "results.json").exists():
        lines += floor_table(json.loads((eval_dir / "results.json").read_text()))
    if (eval_dir / "report.md").exists():
        lines += ["## Domain transfer", ""]
        lines += _demote((eval_dir / "report.md").read_text(), levels=2)
        grids = sorted((eval_dir / "grids").glob("*.png"))
        if grids:
            lines += ["### Predictions", "", "Each grid: input | prediction | target, one row per sample.", ""]
            lines += [f"**{p.stem}**\n\n![{p.stem}](eval/grids/{p.name})\n" for p in grids]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def floor_table(results: dict[str, Any], set_name: str = TRAINING_SET) -> list[str]:
    """The model against the constant predictor on ``set_name``'s test split: per task, both
    losses, their ratio (below 1: the model beats a prediction that ignores the image) and
    both primary metrics. Empty when the evaluation has no constant-predictor row."""
    rows = [e for e in results.get("sets", []) if e.get("name") == set_name
            and not (e.get("finetune") or e.get("corruption"))]
    model = next((e for e in rows if not e.get("floor")), None)
    floor = next((e for e in rows if e.get("floor")), None)
    if model is None or floor is None:
        return []
    lines = [f"## The model against the floor ({set_name} test)", "",
             f"The {LABEL} predicts the same map for every image (per-pixel median of the training "
             "targets; segmentation: per-pixel class frequencies). Loss ratio = model / constant: "
             "below 1 the model has learned something about the image.", "",
             "| task | loss: model | loss: constant | ratio | primary metric | model | constant |",
             "|---|---:|---:|---:|---|---:|---:|"]
    for task, metrics in model["metrics"].items():
        base = floor["metrics"].get(task, {})
        primary = get_task(task).primary_metric
        name = next((m.name for m in get_task(task).metrics if m.name in metrics), primary.name)
        loss, floor_loss = metrics.get("loss"), base.get("loss")
        ratio = loss / floor_loss if loss is not None and floor_loss else None
        arrow = "↑" if get_task(task).metric(name).higher_is_better else "↓"
        lines.append(f"| {task} | {fmt(loss)} | {fmt(floor_loss)} | {fmt(ratio)} | {name} {arrow} | "
                     f"{fmt(metrics.get(name))} | {fmt(base.get(name))} |")
    lines.append("")
    return lines


def _demote(markdown: str, levels: int = 1) -> list[str]:
    """Nest another report under a heading of this one: its headings go ``levels`` down."""
    out = ["#" * levels + line if line.startswith("#") else line for line in markdown.splitlines()]
    out.append("")
    return out
