"""Generate a dataset in a real on-disk format, rendered from procedural 3D scenes.

    python -m pipelines.synth --format taskonomy --out data/taskonomy --scenes 4 --views 25 --size 512

Formats: ``taskonomy`` (``--layout plain|omnidata``), ``replica`` (omnidata layout), ``nyu``
(``nyu_depth_v2_labeled.mat`` + ``splits.mat``), ``cocodoom`` (``run*/map*/...``). The same
``--seed`` writes the same bytes.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

log = logging.getLogger("pipelines.synth")

FORMATS = ("taskonomy", "replica", "nyu", "cocodoom")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", required=True, choices=FORMATS, help="dataset layout to write")
    parser.add_argument("--out", required=True, type=Path, help="output directory (created)")
    parser.add_argument("--scenes", type=_positive, default=4, help="buildings / scenes / runs")
    parser.add_argument("--views", type=_positive, default=8, help="views per scene")
    parser.add_argument("--size", type=_positive, default=512, help="image side in pixels (nyu, cocodoom: passed to their writers)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layout", choices=("plain", "omnidata"), default="omnidata",
                        help="taskonomy only: with or without omnidata's taskonomy/ level")
    parser.add_argument("--workers", type=_positive, default=None,
                        help="taskonomy, replica: render processes (default: one per core)")
    parser.add_argument("--smoke-test", action="store_true",
                        help="tiny run: 2 scenes x 2 views at 64 px")
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def main(argv: list[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.smoke_test:
        args.scenes, args.views, args.size = 2, 2, 64
    if args.layout != "omnidata" and args.format != "taskonomy":
        raise SystemExit(f"--layout {args.layout} applies to --format taskonomy only")
    common = {"scenes": args.scenes, "views": args.views, "seed": args.seed}
    start = time.perf_counter()
    if args.format == "taskonomy":
        from mult.data.synth.taskonomy import write_taskonomy

        summary = write_taskonomy(args.out, size=args.size, layout=args.layout, workers=args.workers, **common)
    elif args.format == "replica":
        from mult.data.synth.taskonomy import write_replica

        summary = write_replica(args.out, size=args.size, workers=args.workers, **common)
    elif args.format == "nyu":
        from mult.data.synth.nyu import write_nyu

        summary = write_nyu(args.out, size=args.size, **common)
    else:
        from mult.data.synth.cocodoom import write_cocodoom

        summary = write_cocodoom(args.out, size=args.size, **common)
    elapsed = time.perf_counter() - start
    log.info("%s dataset written to %s in %.1f s (%d scenes x %d views, seed %d)",
             args.format, args.out, elapsed, args.scenes, args.views, args.seed)
    return summary if isinstance(summary, dict) else {"format": args.format, "root": str(args.out)}


if __name__ == "__main__":
    main()
