"""Convert a dataset tree to WebDataset shards, inspect shards, or verify them.

    python -m pipelines.shard --format taskonomy --source DIR --out s3://bucket/prefix \\
        [--tasks normal,depth_zbuffer,...] [--split train --split-file CSV] [--samples-per-shard 256] \\
        [--resize 256] [--max-bad N] [--max-bad-fraction 0.05]
    python -m pipelines.shard inspect URL [--key KEY]
    python -m pipelines.shard verify URL [--executor ray|local] [--json]

Conversion runs one Ray task per group (building, scene, run, map): ``ray.init()`` joins the
cluster at ``RAY_ADDRESS`` when set, else starts a local instance with 2 CPUs. It is resumable:
rerun the same command after a kill and only unfinished groups are redone. Corrupt and missing
files go to ``report.json`` next to the shards; the run fails (exit code 2, no manifest) only
past ``--max-bad`` files or ``--max-bad-fraction`` of the files. ``--tasks`` (default: every
task found in the tree) chooses what is converted: only a missing ``rgb`` or a missing file of
one of these tasks is a bad file; ``mask_valid`` and ``point_info`` are kept when present and
never missing. The manifest records each shard's tasks.

``inspect URL`` prints the manifest summary as JSON; ``--key KEY`` prints one JSON object with
per-domain statistics of that sample over valid pixels, in physical units (depth in metres,
normals as unit-vector components, segmentation as class ids).

``verify URL`` reads and decodes every sample (one Ray task per shard, the training loader's
decoding), checks each shard's sha256 and sample count against the manifest, and prints one row
per shard with its bad samples underneath (``--json``: the report as JSON). Exit code 1 on any
bad sample, hash mismatch, missing shard or storage error; 2 when there is no readable manifest.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Callable, Sequence

from mult.data.datasets import DATASET_NAMES

log = logging.getLogger("pipelines.shard")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--format", choices=DATASET_NAMES, help="source dataset format")
    parser.add_argument("--source", help="dataset root directory")
    parser.add_argument("--out", help="output: a local directory or s3://bucket/prefix")
    parser.add_argument("--tasks", type=_task_list, default=None, metavar="T1,T2,...",
                        help="tasks to convert (default: every task found in the tree)")
    parser.add_argument("--split", default=None, help="keep one split (train/val/test; format-specific)")
    parser.add_argument("--split-file", default=None, help="split table (Taskonomy CSV, NYU splits.mat, ...)")
    parser.add_argument("--samples-per-shard", type=int, default=256)
    parser.add_argument("--resize", type=int, default=None, metavar="S",
                        help="write S x S train-resolution shards (each task resized its own way)")
    parser.add_argument("--check", choices=["png", "decode"], default="png",
                        help="png: structure and CRC of every PNG (fast); decode: full decode of every view")
    parser.add_argument("--max-bad", type=int, default=None, help="fail past this many bad files")
    parser.add_argument("--max-bad-fraction", type=float, default=0.05,
                        help="fail past this fraction of bad files (default 0.05; negative disables)")
    parser.add_argument("--overwrite", action="store_true", help="delete everything at --out first")
    parser.add_argument("--executor", choices=["ray", "local"], default="ray",
                        help="ray: one Ray task per group (default); local: this process, in order")
    parser.add_argument("--cpus-per-task", type=float, default=1.0)
    parser.add_argument("--tmp-dir", default=None, help="where shards are built before upload")
    parser.add_argument("--smoke-test", action="store_true",
                        help="convert the first group only, locally, to --out (a quick check of a tree)")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def get_inspect_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipelines.shard inspect",
                                     description="Print a shard manifest summary, or one sample's statistics.")
    parser.add_argument("url", help="shard directory or s3://bucket/prefix")
    parser.add_argument("--key", default=None, help="a sample key: print its per-domain statistics")
    return parser


def get_verify_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipelines.shard verify",
                                     description="Read, hash and decode every shard of a dataset; "
                                                 "exit 1 if anything is wrong.")
    parser.add_argument("url", help="shard directory or s3://bucket/prefix")
    parser.add_argument("--executor", choices=["ray", "local"], default="ray",
                        help="ray: one Ray task per shard (default); local: this process, in order")
    parser.add_argument("--cpus-per-task", type=float, default=1.0)
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    return parser


def _task_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]  # ShardSettings checks the names


def _local_map(fn: Callable[[str], dict], groups: Sequence[str]) -> list[dict]:
    from tqdm import tqdm

    return [fn(g) for g in tqdm(groups, unit="group", desc="shard", file=sys.stderr)]


# ---------------------------------------------------------------------------------------------
# Entry point.
# ---------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the command; returns the manifest (conversion), what was printed (inspect) or the
    verification report (verify)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if argv and argv[0] == "verify":
        return verify(get_verify_parser().parse_args(argv[1:]))
    if argv and argv[0] == "inspect":
        from mult.data.samples import manifest_summary, sample_stats

        args = get_inspect_parser().parse_args(argv[1:])
        out = sample_stats(args.url, args.key) if args.key else manifest_summary(args.url)
        print(json.dumps(out, indent=None if args.key else 1))
        return out

    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.verbose:
        logging.getLogger("mult").setLevel(logging.DEBUG)
    missing = [flag for flag, value in (("--format", args.format), ("--source", args.source), ("--out", args.out))
               if value is None]
    if missing:
        parser.error(f"conversion needs {', '.join(missing)} (or use the 'inspect URL' subcommand)")
    if args.samples_per_shard < 1:
        parser.error(f"--samples-per-shard must be >= 1, got {args.samples_per_shard}")
    from mult.data.shards import ShardSettings, convert, convert_group, finalize, prepare, source_path

    try:
        settings = ShardSettings(format=args.format, source=source_path(args.source), split=args.split,
                                 split_file=source_path(args.split_file) if args.split_file else None,
                                 samples_per_shard=args.samples_per_shard, resize=args.resize, check=args.check,
                                 tasks=args.tasks)
    except ValueError as exc:  # unknown tasks, a resize too small: the message names the choices
        parser.error(str(exc))
    max_fraction = None if args.max_bad_fraction is not None and args.max_bad_fraction < 0 else args.max_bad_fraction
    if args.smoke_test:
        groups, _ = prepare(settings, args.out, overwrite=args.overwrite)
        convert_group(settings, args.out, groups[0], tmp_dir=args.tmp_dir)
        manifest = finalize(settings, args.out, groups[:1], max_bad=args.max_bad, max_bad_fraction=max_fraction)
    else:
        if args.executor == "ray":
            from mult.launch.shard import ray_map

            mapper = ray_map(args.cpus_per_task)
        else:
            mapper = _local_map
        manifest = convert(settings, args.out, map_groups=mapper, max_bad=args.max_bad,
                           max_bad_fraction=max_fraction, overwrite=args.overwrite, tmp_dir=args.tmp_dir)
    log.info("%d samples in %d shards (%.1f MB) at %s; %d bad file(s), see report.json",
             manifest["num_samples"], manifest["num_shards"], manifest["bytes"] / 1e6, args.out,
             manifest["bad_count"])
    return manifest


def verify(args: argparse.Namespace) -> dict[str, Any]:
    """``verify URL``: print the report (a table, or JSON) and return it."""
    from mult.data.verify import format_report, verify_dataset

    mapper = None
    if args.executor == "ray":
        from mult.data.verify import failed_row
        from mult.launch.shard import ray_map

        mapper = ray_map(args.cpus_per_task, desc="verify", on_error=failed_row)
    report = verify_dataset(args.url, map_shards=mapper)
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return report


def _cli() -> None:
    from mult.data.shards import ConversionError
    from mult.data.verify import VerifyError

    argv = sys.argv[1:]
    try:
        out = main(argv)
    except (ConversionError, VerifyError) as exc:
        log.error("%s", exc)
        sys.exit(2)
    if argv[:1] == ["verify"] and not out["ok"]:
        sys.exit(1)


if __name__ == "__main__":
    _cli()
