"""The loss-weight search: Ray Tune over ``loss_weights``, each trial a small Ray Train run.

    python -m pipelines.tune --config configs/cpu-small.yaml [key=value ...] [--smoke-test]
    python -m pipelines.tune --config configs/cpu-small.yaml --resume [NAME] [--retry-errored]

Runs the same locally and under ``ray job submit --working-dir . -- python -m pipelines.tune ...``.
What is searched, how trials run and resume, and the outputs: :mod:`mult.launch.tune`.
"""

from __future__ import annotations

import argparse
import logging
import sys

from mult.config import ConfigError, add_config_arguments, load_config
from mult.experiments.search_report import publish
from mult.launch.tune import EXIT_INTERRUPTED, run, setup
from mult.training.plan import PreflightError

log = logging.getLogger("mult.tune")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, "tune.num_samples=8")
    parser.add_argument("--smoke-test", action="store_true",
                        help="at most 4 trials of 8 steps, on generated data unless data.train is set")
    parser.add_argument("--resume", nargs="?", const=True, default=False, metavar="NAME",
                        help="continue the latest interrupted search of train.run_name (or NAME)")
    parser.add_argument("--retry-errored", action="store_true",
                        help="with --resume: run errored trials again (they continue from their checkpoint)")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = get_args_parser().parse_intermixed_args(argv)  # overrides may follow the flags
    if isinstance(args.resume, str) and "=" in args.resume:  # "--resume key=value": not a name
        args.overrides.append(args.resume)
        args.resume = True
    if args.retry_errored and not args.resume:
        log.error("--retry-errored only applies with --resume")
        return 2
    try:
        cfg = load_config(args.config, args.overrides)
        exp = setup(cfg, resume=args.resume, smoke_test=args.smoke_test)
    except (ConfigError, PreflightError) as exc:
        log.error("%s", exc)
        return 2
    records, interrupted = run(exp, retry_errored=args.retry_errored)
    outputs = publish(records, exp.url, space=exp.space, objective=exp.objective, max_steps=exp.cfg.train.max_steps)
    log.info("%d trials (%d stopped early by ASHA, %d errored); outputs: %s", len(records),
             sum(r.stopped_early for r in records), sum(r.status == "ERROR" for r in records), ", ".join(outputs))
    if interrupted:
        log.warning("search interrupted; continue it with: python -m pipelines.tune --config %s --resume %s",
                    args.config, exp.name)
        return EXIT_INTERRUPTED
    if records and all(r.status == "ERROR" for r in records):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
