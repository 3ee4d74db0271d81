"""Generate a dataset in a real on-disk format, rendered from procedural 3D scenes.

    python -m pipelines.synth --format taskonomy --out data/taskonomy --scenes 4 --views 25 --size 512

Formats: every dataset of :data:`mult.data.datasets.DATASETS` (``taskonomy`` with
``--layout plain|omnidata``, ``replica`` in omnidata's layout, ``nyu`` as
``nyu_depth_v2_labeled.mat`` + ``splits.mat``, ``cocodoom`` as ``run*/map*/...``). The same
``--seed`` writes the same bytes. ``--no-auxiliary`` (taskonomy, replica) leaves out the
``mask_valid`` and ``point_info`` folders, as Taskonomy's own release does.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from mult.data.datasets import DATASET_NAMES, get_dataset

log = logging.getLogger("pipelines.synth")



def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", required=True, choices=DATASET_NAMES, help="dataset layout to write")
    parser.add_argument("--out", required=True, type=Path, help="output directory (created)")
    parser.add_argument("--scenes", type=_positive, default=4, help="buildings / scenes / runs")
    parser.add_argument("--views", type=_positive, default=8, help="views per scene")
    parser.add_argument("--size", type=_positive, default=512, help="image side in pixels (nyu, cocodoom: passed to their writers)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layout", choices=("plain", "omnidata"), default=None,
                        help="taskonomy only: with or without omnidata's taskonomy/ level (default: omnidata)")
    parser.add_argument("--no-auxiliary", dest="auxiliary", action="store_const", const=False, default=None,
                        help="taskonomy, replica: no mask_valid or point_info folders (Taskonomy's own release)")
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
    start = time.perf_counter()
    try:
        summary = get_dataset(args.format).generate(args.out, scenes=args.scenes, views=args.views, size=args.size,
                                                    seed=args.seed, layout=args.layout, workers=args.workers,
                                                    auxiliary=args.auxiliary)
    except ValueError as exc:  # an option this format's generator does not take, a bad size
        raise SystemExit(f"error: {exc}") from None
    elapsed = time.perf_counter() - start
    log.info("%s dataset written to %s in %.1f s (%d scenes x %d views, seed %d)",
             args.format, args.out, elapsed, args.scenes, args.views, args.seed)
    return summary if isinstance(summary, dict) else {"format": args.format, "root": str(args.out)}


if __name__ == "__main__":
    main()
