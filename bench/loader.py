"""Loader benchmark: samples/s per core, side by side, on generated Taskonomy-format data.

    python -m bench.loader [--views 16] [--size 512] [--image-size 256] [--samples 64]

Variants, all decoding the same views to the same 256 px targets in ONE process (one core):

  a  shard reader, shards in a local directory
  b  shard reader, shards on a local S3 server (moto's server, started here)
  c  per-file loader: one GET per PNG against the same server (how Taskonomy is often streamed)
  d  decode only: the same member bytes already in memory (the limit for a and b)
  e  shard reader on ``--resize 256`` shards, local

Goals: a >= 0.9 d, b >= 0.9 a, e >= 3 a; b/c is reported. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from mult.launch.local import MotoServer
from mult.tasks import TASK_NAMES

log = logging.getLogger("bench.loader")
SET = "taskonomy"  # the format benchmarked: the training set's


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--views", type=int, default=16, help="generated views (2 buildings)")
    p.add_argument("--size", type=int, default=512, help="generated image size")
    p.add_argument("--image-size", type=int, default=256, help="loader output size")
    p.add_argument("--samples", type=int, default=64, help="samples timed per variant and repeat")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--samples-per-shard", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3, help="best of this many timed runs per variant")
    p.add_argument("--data", default=None, help="reuse a generated Taskonomy tree instead of generating")
    p.add_argument("--workdir", default=None, help="where to put data and shards (default: a temp dir)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--smoke-test", action="store_true", help="tiny sizes, one repeat")
    return p


# ---------------------------------------------------------------------------------------------
# Setup.
# ---------------------------------------------------------------------------------------------
def generate(out: Path, views: int, size: int) -> Path:
    cmd = [sys.executable, "-m", "pipelines.synth", "--format", SET, "--out", str(out),
           "--scenes", "2", "--views", str(max(views // 2, 1)), "--size", str(size), "--seed", "0"]
    subprocess.run(cmd, check=True, capture_output=True)
    return out


def upload_dir(local: Path, url: str) -> None:
    from mult.data.storage import open_storage

    store = open_storage(url)
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        store.upload_file(path, path.relative_to(local).as_posix())


# ---------------------------------------------------------------------------------------------
# Variants: each returns an iterator of batches.
# ---------------------------------------------------------------------------------------------
def shard_batches(url: str, args: argparse.Namespace, steps: int) -> Iterator[dict]:
    from mult.data.loader import make_loader

    return iter(make_loader(url, tasks=list(TASK_NAMES), image_size=args.image_size, batch_size=args.batch_size,
                            mode="train", steps_per_epoch=steps, num_workers=0, shuffle_buffer=8))


def per_file_batches(tree: Path, url: str, args: argparse.Namespace, steps: int) -> Iterator[dict]:
    """One GET per PNG (the view's files listed up front, as a file index would)."""
    from mult.data.datasets import get_dataset
    from mult.data.s3 import s3_client

    reader = get_dataset(SET).load_reader()(str(tree))
    index = [(v.key, {d: Path(m.path).relative_to(tree).as_posix() for d, m in v.members.items() if m.ext == "png"})
             for g in reader.groups() for v in reader.views(g)]
    bucket, _, prefix = url[len("s3://"):].partition("/")
    client = s3_client()

    def fetch(files: dict[str, str]) -> dict[str, bytes]:
        return {d: client.get_object(Bucket=bucket, Key=f"{prefix}/{rel}")["Body"].read() for d, rel in files.items()}

    return _decoded_batches(index, fetch, args, steps)


def decode_only_batches(members: list[tuple[str, dict]], args: argparse.Namespace, steps: int) -> Iterator[dict]:
    return _decoded_batches(members, lambda m: m, args, steps)


def _decoded_batches(views: list[tuple[str, Any]], fetch: Callable[[Any], dict[str, bytes]],
                     args: argparse.Namespace, steps: int) -> Iterator[dict]:
    """Batches of ``views`` (cycled) whose member bytes ``fetch`` returns, decoded as the loader does."""
    from mult.data.samples import collate, decode_members

    manifest = {"format": SET, "encoding": "original", "tasks": list(TASK_NAMES)}
    n = 0
    for _ in range(steps):
        batch = []
        for _ in range(args.batch_size):
            key, source = views[n % len(views)]
            n += 1
            batch.append(decode_members(fetch(source), key, manifest, list(TASK_NAMES), args.image_size))
        yield collate(batch)


def load_all_members(shard_dir: Path) -> list[tuple[str, dict]]:
    from mult.data.samples import split_members

    out: dict[str, dict] = {}
    for path in sorted(shard_dir.glob("*.tar")):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                key, _, suffix = m.name.partition(".")
                out.setdefault(key, {})[suffix] = tar.extractfile(m).read()
    return [(k, split_members(v)) for k, v in out.items()]


def timed(make: Callable[[int], Iterator[dict]], args: argparse.Namespace) -> dict[str, float]:
    """Best of ``repeats`` runs of ``samples`` samples: wall and process-CPU rates."""
    steps = max(args.samples // args.batch_size, 1)
    for _ in make(1):  # warm up: imports, connections, first shard
        pass
    best: dict[str, float] = {}
    for _ in range(args.repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        n = sum(len(b["key"]) for b in make(steps))
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        rate = {"samples_per_s": n / wall, "samples_per_cpu_s": n / max(cpu, 1e-9), "samples": n}
        if rate["samples_per_s"] > best.get("samples_per_s", 0):
            best = rate
    return best


# ---------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.smoke_test:
        args.views, args.size, args.image_size, args.samples, args.repeats = 4, 64, 32, 8, 1
    import cv2
    import torch

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    from mult.data import shards as sh

    with contextlib.ExitStack() as stack:
        work = Path(args.workdir or stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-loader-")))
        work.mkdir(parents=True, exist_ok=True)
        tree = Path(args.data) if args.data else generate(work / "tree", args.views, args.size)
        full, small = work / "shards", work / "shards-256"
        resize = args.image_size
        if not (full / sh.MANIFEST_NAME).exists():
            sh.convert(sh.ShardSettings(SET, str(tree), samples_per_shard=args.samples_per_shard), str(full))
        if not (small / sh.MANIFEST_NAME).exists():
            sh.convert(sh.ShardSettings(SET, str(tree), samples_per_shard=args.samples_per_shard,
                                        resize=resize), str(small))
        manifest = json.loads((full / sh.MANIFEST_NAME).read_text())
        bytes_per_view = manifest["bytes"] / manifest["num_samples"]
        small_manifest = json.loads((small / sh.MANIFEST_NAME).read_text())
        members = load_all_members(full)

        moto = stack.enter_context(MotoServer(log_dir=work))
        stack.enter_context(moto.environment())
        endpoint = moto.endpoint
        moto.make_bucket("bench")
        upload_dir(full, "s3://bench/shards")
        upload_dir(tree, "s3://bench/tree")
        log.info("data: %d views, %.0f KB per view in shards; S3 at %s", manifest["num_samples"],
                 bytes_per_view / 1e3, endpoint)

        results = {
            "a_local_shards": timed(lambda s: shard_batches(str(full), args, s), args),
            "b_s3_shards": timed(lambda s: shard_batches("s3://bench/shards", args, s), args),
            "c_s3_per_file": timed(lambda s: per_file_batches(tree, "s3://bench/tree", args, s), args),
            "d_decode_only": timed(lambda s: decode_only_batches(members, args, s), args),
            "e_local_resized": timed(lambda s: shard_batches(str(small), args, s), args),
        }
    r = {k: v["samples_per_s"] for k, v in results.items()}
    ratios = {
        "a/d": r["a_local_shards"] / r["d_decode_only"],
        "b/a": r["b_s3_shards"] / r["a_local_shards"],
        "e/a": r["e_local_resized"] / r["a_local_shards"],
        "b/c": r["b_s3_shards"] / r["c_s3_per_file"],
    }
    goals = {"a/d": 0.9, "b/a": 0.9, "e/a": 3.0}
    out = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.python_version()}",
        "views": manifest["num_samples"], "size": args.size, "image_size": args.image_size,
        "batch_size": args.batch_size, "samples_timed": args.samples, "repeats": args.repeats,
        "bytes_per_view": bytes_per_view, "bytes_per_view_resized": small_manifest["bytes"] / small_manifest["num_samples"],
        "results": results, "ratios": ratios,
        "goals_met": {k: ratios[k] >= v for k, v in goals.items()},
    }
    print(f"{'variant':<18}{'samples/s':>11}{'samples/cpu-s':>15}")
    for name, v in results.items():
        print(f"{name:<18}{v['samples_per_s']:>11.1f}{v['samples_per_cpu_s']:>15.1f}")
    for name, value in ratios.items():
        goal = f"  (goal >= {goals[name]}: {'met' if value >= goals[name] else 'NOT met'})" if name in goals else ""
        print(f"{name:<6}{value:>7.2f}{goal}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
