"""The training stage: MulT under Ray Train (DDP), checkpoints in the run's storage, metrics out.

    python -m pipelines.train --config configs/cpu-small.yaml [key=value ...] [--smoke-test]
    python -m pipelines.train --config configs/cpu-small.yaml --resume [RUN_NAME]

Runs the same locally (a local Ray, or ``RAY_ADDRESS``) and under
``ray job submit --working-dir . -- python -m pipelines.train ...``. The config, storage and
data are checked before any worker starts (exit 2 with the reason; :mod:`mult.training.plan`);
the loop is :mod:`mult.training.loop`, run by :mod:`mult.launch.trainer`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

from mult.config import ConfigError, add_config_arguments, load_config
from mult.training.plan import SMOKE_MAX_STEPS, PreflightError, check_storage, prepare, resolve_storage, smoke_config

log = logging.getLogger("mult.train")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, "train.max_steps=10")
    parser.add_argument("--smoke-test", action="store_true",
                        help=f"at most {SMOKE_MAX_STEPS} steps; generates and shards tiny data if none is configured")
    parser.add_argument("--resume", nargs="?", const=True, default=False, metavar="RUN_NAME",
                        help="continue the latest run of train.run_name (or RUN_NAME) from its last checkpoint")
    parser.add_argument("--summary", default=None, metavar="PATH",
                        help="write a JSON summary (run name, run URL, final metrics, checkpoint) here")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = get_args_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.smoke_test:
            check_storage(resolve_storage(cfg.train.storage_path))
            cfg = smoke_config(cfg)
        plan = prepare(cfg, resume=args.resume)
    except (ConfigError, PreflightError) as exc:
        log.error("%s", exc)
        return 2
    from mult.launch.trainer import fit

    try:
        result = fit(plan)
    except PreflightError as exc:
        log.error("%s", exc)
        return 2
    if result.error is not None:
        log.error("run %s failed: %s", plan.run_name, result.error)
        return 1
    metrics = result.metrics or {}
    checkpoint = result.checkpoint.path if result.checkpoint else None
    log.info("run %s finished at step %s: loss %.4g, val_objective %.4g; checkpoint %s",
             plan.run_name, metrics.get("step"), metrics.get("loss/total", math.nan),
             metrics.get("val_objective", math.nan), checkpoint)
    if args.summary:
        summary = {
            "run_name": plan.run_name, "run_url": plan.run_url, "local_dir": str(plan.local_dir),
            "checkpoint": checkpoint,
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))},
        }
        Path(args.summary).parent.mkdir(parents=True, exist_ok=True)
        Path(args.summary).write_text(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
