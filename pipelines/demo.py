"""The whole chain on one machine: generate, shard, train, tune, retrain, evaluate, report.

    python -m pipelines.demo --out DIR [--storage s3|dir] [--smallest]

Starts an S3-compatible server (moto) and one Ray head on 127.0.0.1, runs every stage as its own
entry point exactly as under ``ray job submit``, and stops both at the end
(:mod:`mult.launch.demo`). Stage logs go to ``DIR/logs/``; the summary is ``DIR/report.md``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from mult.launch.demo import FULL, SMALLEST, StageError, run_demo
from mult.launch.local import REPO

log = logging.getLogger("mult.demo")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory (created)")
    parser.add_argument("--storage", choices=["s3", "dir"], default="s3",
                        help="s3: a local S3-compatible server started here (default); dir: a local directory")
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"), help="experiment YAML")
    parser.add_argument("--smallest", action="store_true",
                        help="the smallest setting (CI): fewer views and steps")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("botocore", "boto3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = get_args_parser().parse_args(argv)
    out = Path(args.out).resolve()
    if out.exists() and any(out.iterdir()):
        log.error("--out %s exists and is not empty; choose a new directory (nothing was overwritten)", out)
        return 2
    config = Path(args.config).resolve()
    if not config.is_file():
        log.error("--config %s does not exist", config)
        return 2
    start = time.monotonic()
    try:
        report = run_demo(out, args.storage, SMALLEST if args.smallest else FULL, config)
    except StageError as exc:
        log.error("%s", exc)
        return 1
    log.info("finished in %.1f min; report: %s", (time.monotonic() - start) / 60, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
