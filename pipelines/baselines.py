"""Single-task baselines for Delta-m: train each task alone once, keep its validation metrics.

    python -m pipelines.baselines --config configs/cpu-small.yaml [key=value ...] [--smoke-test]
                                  [--tasks normal,depth_zbuffer] [--out URL] [--force]

Each task gets one ``pipelines.train`` run (the same Ray Train stage, run name
``{train.run_name}-baseline-{task}-...``) with ``tasks=[task]``, ``model.shared_attention=none``,
``loss.weighting=fixed`` and every other setting (steps, data, model size, validation batches)
as in the config, so the numbers compare with a search's trials one to one: both come from the
run's last validation on the same validation shards (``data.val``, ``train.val_batches``).

The result, ``{task: {metric: value}}``, goes to ``--out`` (default
``{tune experiment root}/baselines.json``, where ``pipelines.tune`` looks for it) and is what
:func:`mult.metrics.load_baselines` reads. It is rewritten after every task, so an interrupted
command keeps what it finished; tasks already in the file are skipped unless ``--force``. The
runs behind the numbers are listed in ``baselines_runs.json`` beside it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from typing import Any

from mult.config import Config, ConfigError, from_dict, load_config, to_dict
from mult.search import split_val_metrics
from mult.tasks import TASK_NAMES
from pipelines.train import PreflightError, apply_smoke_test, check_storage, fit, prepare, resolve_storage
from pipelines.tune import BASELINES_FILE, experiment_root

log = logging.getLogger("mult.baselines")

RUNS_FILE = "baselines_runs.json"


def single_task_config(cfg: Config, task: str) -> Config:
    """``cfg`` restricted to ``task``: no shared attention, fixed weight 1."""
    data = to_dict(cfg)
    data["tasks"] = [task]
    data["loss_weights"] = {task: 1.0}
    data["loss"]["weighting"] = "fixed"
    data["model"]["shared_attention"] = "none"
    data["model"]["reference_task"] = task
    data["train"]["run_name"] = f"{cfg.train.run_name}-baseline-{task}"
    data["train"]["baselines"] = None
    return from_dict(data)


def _split(url: str) -> tuple[str, str]:
    parent, _, name = url.rstrip("/").rpartition("/")
    if not parent or not name:
        raise ConfigError(f"--out {url!r}: expected a file path or s3://bucket/prefix/file.json")
    return parent, name


def _read_json(url: str) -> dict[str, Any]:
    from mult.data.storage import open_storage

    parent, name = _split(url)
    storage = open_storage(parent)
    return json.loads(storage.read_bytes(name)) if storage.exists(name) else {}


def _write_json(url: str, data: dict[str, Any]) -> None:
    from mult.data.storage import open_storage

    parent, name = _split(url)
    open_storage(parent).write_bytes(name, json.dumps(data, indent=2, sort_keys=True).encode())


def train_baseline(cfg: Config, task: str) -> tuple[dict[str, float], dict[str, Any]]:
    """One single-task run; returns its last validation's metrics and a description of the run."""
    plan = prepare(single_task_config(cfg, task))
    result = fit(plan)
    if result.error is not None:
        raise RuntimeError(f"baseline run {plan.run_name} for {task} failed: {result.error}")
    metrics = result.metrics or {}
    values = split_val_metrics(metrics).get(task)
    if not values:
        raise RuntimeError(f"baseline run {plan.run_name} reported no validation metrics for {task}")
    finite = {m: v for m, v in values.items() if math.isfinite(v)}
    run = {"run": plan.run_url, "step": metrics.get("step"), "dropped_non_finite": sorted(set(values) - set(finite))}
    return finite, run


def run_baselines(cfg: Config, tasks: list[str], out_url: str, *, force: bool = False) -> dict[str, dict[str, float]]:
    """Train the baselines of ``tasks`` that ``out_url`` lacks (all with ``force``); returns the file."""
    baselines = _read_json(out_url)
    runs_url = f"{_split(out_url)[0]}/{RUNS_FILE}"
    runs = _read_json(runs_url)
    for task in tasks:
        if task in baselines and not force:
            log.info("baseline for %s already in %s; skipping (use --force to retrain)", task, out_url)
            continue
        log.info("training the single-task baseline for %s", task)
        baselines[task], runs[task] = train_baseline(cfg, task)
        _write_json(out_url, baselines)
        _write_json(runs_url, runs)
        log.info("baseline %s: %s", task, ", ".join(f"{m}={v:.4g}" for m, v in sorted(baselines[task].items())))
    return baselines


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="experiment YAML (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=1000")
    parser.add_argument("--tasks", default=None,
                        help="comma-separated subset of the config's tasks (default: all of them)")
    parser.add_argument("--out", default=None,
                        help=f"where to write the JSON (default: {{tune experiment root}}/{BASELINES_FILE})")
    parser.add_argument("--force", action="store_true", help="retrain tasks already in the output file")
    parser.add_argument("--smoke-test", action="store_true", help="a few steps per task on generated data")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = get_args_parser().parse_intermixed_args(argv)  # overrides may follow the flags
    try:
        cfg = load_config(args.config, args.overrides)
        tasks = cfg.tasks if args.tasks is None else [t.strip() for t in args.tasks.split(",") if t.strip()]
        bad = [t for t in tasks if t not in cfg.tasks]
        if bad or not tasks:
            raise ConfigError(f"--tasks: {bad or 'empty'} not among the config's tasks ({', '.join(cfg.tasks)}); "
                              f"known tasks: {', '.join(TASK_NAMES)}")
        if args.smoke_test:
            check_storage(resolve_storage(cfg.train.storage_path))
            cfg = apply_smoke_test(cfg)
        if cfg.data.val is None:
            raise ConfigError("data.val: baselines are measured on the validation shards; none configured")
        out = args.out or f"{experiment_root(cfg)}/{BASELINES_FILE}"
        if "://" not in out:
            out = resolve_storage(out)
        check_storage(_split(out)[0])
    except (ConfigError, PreflightError) as exc:
        log.error("%s", exc)
        return 2
    baselines = run_baselines(cfg, tasks, out, force=args.force)
    log.info("baselines for %s written to %s", ", ".join(sorted(baselines)), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
