"""Single-task baselines for Delta-m: train each task alone once, keep its validation metrics.

    python -m pipelines.baselines --config configs/cpu-small.yaml [key=value ...] [--smoke-test]
                                  [--tasks normal,depth_zbuffer] [--out URL] [--force]

Each task gets one ``pipelines.train`` run (run name ``{train.run_name}-baseline-{task}-...``);
what is trained and kept: :mod:`mult.experiments.baselines`. The result goes to ``--out``
(default ``{tune experiment root}/baselines.json``, where ``pipelines.tune`` looks for it).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from mult.config import Config, ConfigError, add_config_arguments, load_config
from mult.experiments.baselines import run_baselines, split_url
from mult.experiments.search import BASELINES_FILE, experiment_root
from mult.tasks import TASK_NAMES
from mult.training.plan import PreflightError, check_storage, prepare, resolve_storage, smoke_config

log = logging.getLogger("mult.baselines")


def train(cfg: Config) -> tuple[dict[str, Any], str]:
    """One ``pipelines.train`` run of ``cfg`` under Ray Train; its last report and its URL."""
    from mult.launch.trainer import fit

    plan = prepare(cfg)
    result = fit(plan)
    if result.error is not None:
        raise RuntimeError(f"baseline run {plan.run_name} failed: {result.error}")
    return dict(result.metrics or {}), plan.run_url


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, "train.max_steps=1000")
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
            cfg = smoke_config(cfg)
        if cfg.data.val is None:
            raise ConfigError("data.val: baselines are measured on the validation shards; none configured")
        out = args.out or f"{experiment_root(cfg)}/{BASELINES_FILE}"
        if "://" not in out:
            out = resolve_storage(out)
        check_storage(split_url(out)[0])
    except (ConfigError, PreflightError) as exc:
        log.error("%s", exc)
        return 2
    baselines = run_baselines(cfg, tasks, out, train, force=args.force)
    log.info("baselines for %s written to %s", ", ".join(sorted(baselines)), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
