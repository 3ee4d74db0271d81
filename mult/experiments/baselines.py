"""Single-task baselines for Delta-m: each task trained alone, its last validation kept.

Each task gets one training run with ``tasks=[task]``, ``model.shared_attention=none``,
``loss.weighting=fixed`` and every other setting (steps, data, model size, validation batches)
as in the config, so the numbers compare with a search's trials one to one: both come from the
run's last validation on the same validation shards (``data.val``, ``train.val_batches``).

The result, ``{task: {metric: value}}``, is what :func:`mult.training.plan.load_baselines` reads. It
is rewritten after every task, so an interrupted command keeps what it finished; tasks already
in the file are skipped unless ``force``. The runs behind the numbers are listed in
``baselines_runs.json`` beside it.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any, Callable, Sequence

from mult.config import Config, ConfigError, derive
from mult.training.loop import val_metrics

log = logging.getLogger(__name__)

RUNS_FILE = "baselines_runs.json"

# Trains one config to the end; returns (its last report, the run's URL).
TrainFn = Callable[[Config], "tuple[dict[str, Any], str]"]


def single_task_config(cfg: Config, task: str) -> Config:
    """``cfg`` restricted to ``task``: no shared attention, fixed weight 1."""
    return derive(cfg, {
        "tasks": [task], "loss_weights": {task: 1.0}, "loss.weighting": "fixed",
        "model.shared_attention": "none", "model.reference_task": task,
        "train.run_name": f"{cfg.train.run_name}-baseline-{task}", "train.baselines": None,
    })


def split_url(url: str) -> tuple[str, str]:
    """``dir/name.json`` (or ``s3://bucket/prefix/name.json``) -> (``dir``, ``name.json``)."""
    parent, _, name = url.rstrip("/").rpartition("/")
    if not parent or not name:
        raise ConfigError(f"{url!r}: expected a file path or s3://bucket/prefix/file.json")
    return parent, name


def _read_json(url: str) -> dict[str, Any]:
    from mult.data.storage import open_storage

    parent, name = split_url(url)
    storage = open_storage(parent)
    return json.loads(storage.read_bytes(name)) if storage.exists(name) else {}


def _write_json(url: str, data: dict[str, Any]) -> None:
    from mult.data.storage import open_storage

    parent, name = split_url(url)
    open_storage(parent).write_bytes(name, json.dumps(data, indent=2, sort_keys=True).encode())


def train_baseline(cfg: Config, task: str, train: TrainFn) -> tuple[dict[str, float], dict[str, Any]]:
    """One single-task run; returns its last validation's finite metrics and a description of the run."""
    report, run_url = train(single_task_config(cfg, task))
    values = val_metrics(report).get(task)
    if not values:
        raise RuntimeError(f"baseline run {run_url} reported no validation metrics for {task}")
    finite = {m: v for m, v in values.items() if math.isfinite(v)}
    return finite, {"run": run_url, "step": report.get("step"), "dropped_non_finite": sorted(set(values) - set(finite))}


def run_baselines(cfg: Config, tasks: Sequence[str], out_url: str, train: TrainFn, *,
                  force: bool = False) -> dict[str, dict[str, float]]:
    """Train the baselines of ``tasks`` that ``out_url`` lacks (all with ``force``); returns the file."""
    baselines = _read_json(out_url)
    runs_url = f"{split_url(out_url)[0]}/{RUNS_FILE}"
    runs = _read_json(runs_url)
    for task in tasks:
        if task in baselines and not force:
            log.info("baseline for %s already in %s; skipping (use --force to retrain)", task, out_url)
            continue
        log.info("training the single-task baseline for %s", task)
        baselines[task], runs[task] = train_baseline(cfg, task, train)
        _write_json(out_url, baselines)
        _write_json(runs_url, runs)
        log.info("baseline %s: %s", task, ", ".join(f"{m}={v:.4g}" for m, v in sorted(baselines[task].items())))
    return baselines
