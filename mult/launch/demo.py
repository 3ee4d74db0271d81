"""The whole chain on one machine: generate, shard, train, tune, retrain, evaluate, report.

Everything a cluster would provide is started here and stopped at the end: an S3-compatible
server on 127.0.0.1 (moto's standalone server; ``storage="dir"`` uses a local directory
instead) and one Ray head (2 CPUs, with the dashboard that ``ray job submit`` and Tune need,
token authentication on with a token made for that head).
Each stage then runs as its own entry point, ``python -m pipelines.<stage>``, exactly as under
``ray job submit``, connected to that head through ``RAY_ADDRESS``. Stage logs go to
``out/logs/``; the summary is ``out/report.md`` (:mod:`mult.experiments.demo_report`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from mult.data.datasets import DATASETS, TRAINING_SET
from mult.experiments.demo_report import write_report
from mult.launch.local import REPO, MotoServer, RayHead, exported

log = logging.getLogger(__name__)

BUCKET = "mult-demo"


@dataclass(frozen=True)
class Sizes:
    """How much data and compute the demo uses."""

    render: int  # rendered view size (pixels); the model trains at the config's 64 px
    taskonomy_buildings: int  # split about 70/15/15 into train/val/test by building
    taskonomy_views: int  # per building
    transfer_views: int  # per scene, for Replica / NYU / CocoDoom
    train_steps: int
    tune_trials: int
    tune_steps: int


# 40 buildings (about 28 for training): with the 5 training buildings of earlier versions not even
# a conv net generalised depth or normals to an unseen building (BENCHMARKS.md, Learning).
FULL = Sizes(render=128, taskonomy_buildings=40, taskonomy_views=16, transfer_views=8,
             train_steps=400, tune_trials=4, tune_steps=24)
SMALLEST = Sizes(render=64, taskonomy_buildings=4, taskonomy_views=6, transfer_views=4,
                 train_steps=8, tune_trials=4, tune_steps=8)


class StageError(RuntimeError):
    """A stage's process failed; the message names the stage and its log."""


class Runner:
    """Runs stage entry points as subprocesses with the demo's environment, one log each."""

    def __init__(self, out: Path, env: dict[str, str]):
        self.out = out
        self.env = env
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.timings: list[tuple[str, float]] = []

    def __call__(self, name: str, module: str, *args: str) -> None:
        cmd = [sys.executable, "-m", module, *args]
        log_path = self.logs / f"{name}.log"
        log.info("  %s  (log: %s)", " ".join(["python", "-m", module, *args]), log_path.relative_to(self.out))
        start = time.monotonic()
        with open(log_path, "w") as fh:
            proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, **self.env}, stdout=fh,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        elapsed = time.monotonic() - start
        self.timings.append((name, elapsed))
        if proc.returncode != 0:
            tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-30:])
            raise StageError(f"stage {name!r} failed (exit {proc.returncode}); last lines of {log_path}:\n{tail}")
        log.info("  done in %.0f s", elapsed)


def data_plan(sizes: Sizes, data: Path) -> list[tuple[str, list[str]]]:
    """(dataset, ``pipelines.synth`` arguments) for every dataset of the table: the training
    set at the demo's size, each transfer set with the fewest scenes its splits need."""
    plan = []
    for seed, (name, spec) in enumerate(DATASETS.items(), start=1):
        train = name == TRAINING_SET
        scenes = sizes.taskonomy_buildings if train else spec.min_scenes
        views = sizes.taskonomy_views if train else sizes.transfer_views
        plan.append((name, ["--format", name, "--out", str(data / name), "--scenes", str(scenes),
                            "--views", str(views), "--seed", str(seed), "--size", str(sizes.render)]))
    return plan


def shard_plan() -> list[tuple[str, str | None, str]]:
    """(dataset, split given to the sharder or None for all, shard name): the training set's
    train/val/test splits and every other set's test split."""
    plan: list[tuple[str, str | None, str]] = [(TRAINING_SET, s, f"{TRAINING_SET}/{s}") for s in ("train", "val", "test")]
    plan += [(name, spec.test_split, f"{name}/test") for name, spec in DATASETS.items() if name != TRAINING_SET]
    return plan


def _read_bytes(url: str) -> bytes:
    from mult.data.storage import open_storage

    parent, _, name = url.rstrip("/").rpartition("/")
    return open_storage(parent).read_bytes(name)


def _find_tune_outputs(tune_root: str) -> str:
    """The experiment directory (under ``tune_root``) that holds ``best.yaml``."""
    from mult.data.storage import open_storage

    store = open_storage(tune_root)
    hits = sorted(k for k in store.list("") if k.endswith("/best.yaml") and k.count("/") == 1)
    if not hits:
        raise StageError(f"the tune stage wrote no best.yaml under {tune_root}")
    return f"{tune_root.rstrip('/')}/{hits[-1].rsplit('/', 1)[0]}"


def run_demo(out: Path, storage: str, sizes: Sizes, config: Path) -> Path:
    """Run every stage; returns the path of the report."""
    (out / "logs").mkdir(parents=True, exist_ok=True)
    data = out / "data"
    with contextlib.ExitStack() as stack:
        env: dict[str, str] = {"PYTHONUNBUFFERED": "1"}
        if storage == "s3":
            log.info("[setup] starting an S3-compatible server (moto) on 127.0.0.1")
            moto = stack.enter_context(MotoServer(log_dir=out / "logs"))
            env.update(moto.env)
            stack.enter_context(moto.environment())  # this process reads the results too
            root = moto.make_bucket(BUCKET)
        else:
            root = str((out / "store").resolve())
        if os.environ.get("RAY_ADDRESS"):
            # A running cluster (or a test session's head): use it rather than start a second
            # Ray on this host. Each stage forwards the S3 endpoint to its workers itself.
            log.info("[setup] using the Ray cluster at RAY_ADDRESS=%s", os.environ["RAY_ADDRESS"])
        else:
            log.info("[setup] starting a Ray head (2 CPUs, dashboard on 127.0.0.1)")
            with exported(env):  # the head and its workers inherit the S3 settings
                head = stack.enter_context(RayHead(num_cpus=2))
            env.update(head.env)  # the head's address and token file, for every stage
            stack.enter_context(head.client_environment())  # and no RAY_AUTH_TOKEN from outside
        run = Runner(out, env)
        shards = f"{root}/shards"
        runs = f"{root}/runs"
        stages = 7

        log.info("[1/%d] generating %s data in their real formats", stages, ", ".join(DATASETS))
        for fmt, args in data_plan(sizes, data):
            run(f"synth-{fmt}", "pipelines.synth", *args)

        log.info("[2/%d] sharding into %s (Ray tasks)", stages, shards)
        for fmt, split, name in shard_plan():
            split_args = ["--split", split] if split else []
            run(f"shard-{name.replace('/', '-')}", "pipelines.shard", "--format", fmt,
                "--source", str(data / fmt), "--out", f"{shards}/{name}", *split_args,
                "--samples-per-shard", "8")

        common = [
            f"data.train={shards}/{TRAINING_SET}/train", f"data.val={shards}/{TRAINING_SET}/val",
            f"train.storage_path={runs}", f"metrics.local_dir={out / 'telemetry'}",
        ]
        log.info("[3/%d] training MulT with Ray Train on 2 CPU workers", stages)
        run("train", "pipelines.train", "--config", str(config), *common,
            f"train.max_steps={sizes.train_steps}", "train.run_name=demo",
            "--summary", str(out / "train" / "summary.json"))

        log.info("[4/%d] searching the loss weights with Ray Tune (%d trials, ASHA)", stages, sizes.tune_trials)
        tune_root = f"{root}/tune"
        run("tune", "pipelines.tune", "--config", str(config), *common,
            f"train.max_steps={sizes.tune_steps}", f"train.val_every={max(2, sizes.tune_steps // 4)}",
            f"train.checkpoint_every={max(2, sizes.tune_steps // 4)}",
            f"tune.num_samples={sizes.tune_trials}", f"tune.experiment_path={tune_root}",
            "train.run_name=demo-tune")
        experiment = _find_tune_outputs(tune_root)
        best_yaml = out / "tune" / "best.yaml"
        best_yaml.parent.mkdir(parents=True, exist_ok=True)
        best_yaml.write_bytes(_read_bytes(f"{experiment}/best.yaml"))
        for name in ("report.md", "trials.csv", "plots/objective_vs_weights.png", "plots/task_metrics.png",
                     "plots/asha.png"):
            dest = out / "tune" / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(_read_bytes(f"{experiment}/{name}"))

        log.info("[5/%d] retraining with the best weights (%s)", stages, best_yaml.relative_to(out))
        run("retrain", "pipelines.train", "--config", str(config), *common, f"@{best_yaml}",
            f"train.max_steps={sizes.train_steps}", "train.run_name=demo-best",
            "--summary", str(out / "retrain" / "summary.json"))
        best_run = json.loads((out / "retrain" / "summary.json").read_text())["run_url"]

        log.info("[6/%d] evaluating domain transfer (%s)", stages, ", ".join(DATASETS))
        data_args = [f"{fmt}={shards}/{fmt}/test" for fmt in DATASETS]
        run("evaluate", "pipelines.evaluate", "--checkpoint", best_run, "--data", *data_args,
            "--out", str(out / "eval"), "--blur", "2.0", "--grid-samples", "3")

        log.info("[7/%d] writing the report", stages)
        report = write_report(out, sizes, storage, root, run.timings)
    return report
