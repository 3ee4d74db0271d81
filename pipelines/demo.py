"""The whole chain on one machine: generate, shard, train, tune, retrain, evaluate, report.

    python -m pipelines.demo --out DIR [--storage s3|dir] [--smallest]

Everything a cluster would provide is started here and stopped at the end: an S3-compatible
server on 127.0.0.1 (moto's standalone server; ``--storage dir`` uses a local directory
instead) and one Ray head (2 CPUs, with the dashboard that ``ray job submit`` and Tune need).
Each stage then runs as its own entry point, ``python -m pipelines.<stage>``, exactly as under
``ray job submit``, connected to that head through ``RAY_ADDRESS``. Stage logs go to
``DIR/logs/``; the summary is ``DIR/report.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pipelines.services import MotoServer, RayHead, exported

log = logging.getLogger("mult.demo")

REPO = Path(__file__).resolve().parents[1]
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


FULL = Sizes(render=128, taskonomy_buildings=7, taskonomy_views=16, transfer_views=8,
             train_steps=200, tune_trials=4, tune_steps=24)
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


def _data_plan(sizes: Sizes, data: Path) -> list[tuple[str, list[str]]]:
    """(format, ``pipelines.synth`` arguments) for the four datasets. CocoDoom needs 4 maps so
    that its run and map splits are all non-empty."""
    scenes_views_seed = {
        "taskonomy": (sizes.taskonomy_buildings, sizes.taskonomy_views, 1),
        "replica": (2, sizes.transfer_views, 2),
        "nyu": (2, sizes.transfer_views, 3),
        "cocodoom": (4, sizes.transfer_views, 4),
    }
    return [
        (fmt, ["--format", fmt, "--out", str(data / fmt), "--scenes", str(scenes), "--views", str(views),
               "--seed", str(seed), "--size", str(sizes.render)])
        for fmt, (scenes, views, seed) in scenes_views_seed.items()
    ]


# (format, split given to the sharder or None for all, shard name)
SHARD_PLAN = (
    ("taskonomy", "train", "taskonomy/train"),
    ("taskonomy", "val", "taskonomy/val"),
    ("taskonomy", "test", "taskonomy/test"),
    ("replica", None, "replica/test"),
    ("nyu", "test", "nyu/test"),
    ("cocodoom", "run-full-test", "cocodoom/test"),
)


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
            env.update(head.env)
        run = Runner(out, env)
        shards = f"{root}/shards"
        runs = f"{root}/runs"
        stages = 7

        log.info("[1/%d] generating Taskonomy, Replica, NYUv2 and CocoDoom-format data", stages)
        for fmt, args in _data_plan(sizes, data):
            run(f"synth-{fmt}", "pipelines.synth", *args)

        log.info("[2/%d] sharding into %s (Ray tasks)", stages, shards)
        for fmt, split, name in SHARD_PLAN:
            split_args = ["--split", split] if split else []
            run(f"shard-{name.replace('/', '-')}", "pipelines.shard", "--format", fmt,
                "--source", str(data / fmt), "--out", f"{shards}/{name}", *split_args,
                "--samples-per-shard", "8")

        common = [
            f"data.train={shards}/taskonomy/train", f"data.val={shards}/taskonomy/val",
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

        log.info("[6/%d] evaluating domain transfer (Taskonomy test, Replica, NYUv2, CocoDoom)", stages)
        data_args = [f"{fmt}={shards}/{fmt}/test" for fmt in ("taskonomy", "replica", "nyu", "cocodoom")]
        run("evaluate", "pipelines.evaluate", "--checkpoint", best_run, "--data", *data_args,
            "--out", str(out / "eval"), "--blur", "2.0", "--grid-samples", "3")

        log.info("[7/%d] writing the report", stages)
        report = write_report(out, sizes, storage, root, run.timings)
    return report


def write_report(out: Path, sizes: Sizes, storage: str, root: str, timings: list[tuple[str, float]]) -> Path:
    """``DIR/report.md``: what ran, with the training, search and evaluation results."""
    lines = ["# MulT demo report", ""]
    lines += [
        f"Storage: `{root}` ({'local S3-compatible server' if storage == 's3' else 'local directory'}); "
        f"views rendered at {sizes.render} px; Taskonomy: {sizes.taskonomy_buildings} buildings x "
        f"{sizes.taskonomy_views} views; training {sizes.train_steps} steps; Tune {sizes.tune_trials} "
        f"trials x {sizes.tune_steps} steps.",
        "",
        "Everything here is generated data and a tiny model: the numbers show the pipeline works "
        "end to end, not how MulT performs on real Taskonomy.",
        "",
        "## Stages",
        "",
        "| stage | seconds |",
        "|---|---:|",
        *[f"| {name} | {secs:.0f} |" for name, secs in timings],
        "",
    ]
    for stage, title in (("train", "Training (default weights)"), ("retrain", "Retraining with the best weights")):
        summary_path = out / stage / "summary.json"
        if not summary_path.exists():
            continue
        summary = json.loads(summary_path.read_text())
        lines += [f"## {title}", "", f"Run: `{summary['run_url']}`", ""]
        metrics = summary.get("metrics", {})
        keys = [k for k in sorted(metrics) if k.startswith(("loss/", "val/")) or k in ("step", "val_objective")]
        if keys:
            lines += ["| metric | value |", "|---|---:|"]
            lines += [f"| {k} | {metrics[k]:.4g} |" if isinstance(metrics[k], float) else f"| {k} | {metrics[k]} |" for k in keys]
            lines.append("")
        curve = Path(summary.get("local_dir", "")) / "loss_curve.png"
        if curve.exists():
            dest = out / stage / "loss_curve.png"
            shutil.copyfile(curve, dest)
            lines += [f"![loss curve]({dest.relative_to(out)})", ""]
    tune_dir = out / "tune"
    if (tune_dir / "report.md").exists():
        lines += ["## Loss-weight search", "",
                  "Best weights (an override file for `pipelines.train`): `tune/best.yaml`; all trials: `tune/trials.csv`.", ""]
        tune_md = (tune_dir / "report.md").read_text().splitlines()
        if tune_md and tune_md[0].startswith("# "):
            tune_md = tune_md[1:]  # its title repeats this section's heading
        lines += _demote("\n".join(tune_md), levels=2)
        lines += [f"![{p.stem}](tune/plots/{p.name})" for p in sorted((tune_dir / "plots").glob("*.png"))]
        lines.append("")
    eval_dir = out / "eval"
    if (eval_dir / "report.md").exists():
        lines += ["## Domain transfer", ""]
        lines += _demote((eval_dir / "report.md").read_text(), levels=2)
        grids = sorted((eval_dir / "grids").glob("*.png"))
        if grids:
            lines += ["### Predictions", "", "Each grid: input | prediction | target, one row per sample.", ""]
            lines += [f"**{p.stem}**\n\n![{p.stem}](eval/grids/{p.name})\n" for p in grids]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _demote(markdown: str, levels: int = 1) -> list[str]:
    """Nest another report under a heading of this one: its headings go ``levels`` down."""
    out = ["#" * levels + line if line.startswith("#") else line for line in markdown.splitlines()]
    out.append("")
    return out


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
    sizes = SMALLEST if args.smallest else FULL
    start = time.monotonic()
    try:
        report = run_demo(out, args.storage, sizes, config)
    except StageError as exc:
        log.error("%s", exc)
        return 1
    log.info("finished in %.1f min; report: %s", (time.monotonic() - start) / 60, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
