"""Learning benchmark: does MulT learn beyond a constant prediction, next to a U-Net that does?

    python -m bench.learn --out DIR [--config configs/cpu-small.yaml] [--steps 1000] [--seeds 0,1]
        [--batch-size 8] [--eval-every 250] [--log-every 25] [--train-buildings 100] [--views 16]
        [--val-buildings 6] [--models reference,official,encoder,none,unet] [--workdir DIR]
        [--device cpu] [--constant-samples 512] [--train-seed 11] [--val-seed 99]
        [key=value config overrides ...]
    python -m bench.learn --out DIR --smoke-test   # every model, tiny data, 4 steps: what the test runs

Run from the repository root in the project's environment; no network. Writes ``DIR/learn.json``
(everything), ``DIR/learn.md`` (the tables) and ``DIR/learn.png`` (the curves; when matplotlib
is installed).

Data: the project's generator and converter, as subprocesses (``python -m pipelines.synth
--format taskonomy``, ``python -m pipelines.shard --executor local``): a training set of
``--train-buildings`` x ``--views`` views (generator seed ``--train-seed``) and a validation set
of ``--val-buildings`` other buildings (``--val-seed``; a building in both is an error), at the
config's ``model.img_size``, under ``--workdir`` (default ``DIR/data``), reused when its manifest
exists.

Models, all trained and scored with the same loader, losses, metrics and step:

* MulT in each shared-attention mode (:func:`mult.model.build_model` on the config with
  ``model.shared_attention`` set);
* ``unet``: the conv U-Net :class:`UNet` below (24-48-96, about 0.26 M parameters), a network
  known to learn on this data, as a reference;
* the constant predictor (:func:`mult.experiments.constant.fit_constant` on up to
  ``--constant-samples`` training views): the floor. It has no parameters and is not trained;
  nothing about it depends on the seed, so it is evaluated once and listed under every seed.

A seed sets the initial weights (``torch.manual_seed(seed)`` before each model is built) and the
order of the training data (the loader's seed). The models of one seed train side by side, one
step each in turn, so they see the same batches in the same order and a drifting load on a shared
machine slows them all alike. A step is :func:`mult.training.step.train_step` on one batch of
``--batch-size``: the config's loss combiner, AdamW from ``build_optimizer`` with the warm-up +
cosine schedule over ``--steps``, the config's gradient clipping and flips; a fresh training
loader each epoch (training views // batch size steps). Validation is
:func:`mult.training.step.evaluate` with a :class:`mult.metrics.MetricSuite` over the whole
validation set (decoded once, kept in memory) every ``--eval-every`` steps and after the last.

Reported per model and seed: the training curve (per-task loss averaged over windows of
``--log-every`` steps), the validation curve, the final validation metrics and the seconds per
training step (compute, the loader's wait apart; median over steps). Over seeds: mean, std, min
and max of every final metric; per task the ratios of final validation loss, each MulT mode over
the constant and over the U-Net, and the U-Net over the constant (below 1: lower loss than the
divisor), with their per-seed range; for classification tasks, whether the prediction is constant
(its primary metric equal to the constant's, the fraction of distinct argmax maps over the
validation images, and how many labelled pixels take the constant's class).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[1]
UNET = "unet"
CONSTANT = "constant"
SAMPLES_PER_SHARD = 16
log = logging.getLogger("bench.learn")

# flag -> (full run, --smoke-test); an explicit flag wins over either
DEFAULTS: dict[str, tuple[Any, Any]] = {
    "steps": (1000, 4), "seeds": ("0,1", "0"), "batch_size": (8, 4), "eval_every": (250, 2), "log_every": (25, 2),
    "train_buildings": (100, 2), "views": (16, 4), "val_buildings": (6, 1), "constant_samples": (512, 64),
}


def _modes() -> tuple[str, ...]:
    from mult.config import SHARED_ATTENTION_MODES

    return SHARED_ATTENTION_MODES


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.learn", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for learn.json, learn.md and learn.png")
    p.add_argument("--config", default=str(REPO / "configs" / "cpu-small.yaml"))
    p.add_argument("--steps", type=int, default=None, help="training steps per model and seed (1000; smoke 4)")
    p.add_argument("--seeds", default=None, help="comma-separated integers (0,1; smoke 0)")
    p.add_argument("--batch-size", type=int, default=None, help="samples per step and per eval batch (8; smoke 4)")
    p.add_argument("--eval-every", type=int, default=None, help="steps between validations (250; smoke 2)")
    p.add_argument("--log-every", type=int, default=None, help="steps per training-curve window (25; smoke 2)")
    p.add_argument("--train-buildings", type=int, default=None, help="training buildings (100; smoke 2)")
    p.add_argument("--views", type=int, default=None, help="views per building, both splits (16; smoke 4)")
    p.add_argument("--val-buildings", type=int, default=None, help="validation buildings, --views each (6; smoke 1)")
    p.add_argument("--models", default=f"{','.join(_modes())},{UNET}",
                   help=f"comma-separated subset of {','.join(_modes())},{UNET}; the constant is always scored")
    p.add_argument("--constant-samples", type=int, default=None,
                   help="training views the constant predictor is fitted on (512; smoke 64)")
    p.add_argument("--train-seed", type=int, default=11, help="generator seed of the training buildings")
    p.add_argument("--val-seed", type=int, default=99, help="generator seed of the validation buildings")
    p.add_argument("--workdir", default=None, help="generated shards (default OUT/data); reused when present")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--smoke-test", action="store_true", help="tiny data, 4 steps, one seed, every model")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value")
    return p


def settle(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Fill the defaults (full or smoke) and check every flag; a bad one exits naming it."""
    for name, (full, smoke) in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, smoke if args.smoke_test else full)
    for name in ("steps", "batch_size", "eval_every", "log_every", "train_buildings", "views", "val_buildings",
                 "constant_samples"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    try:
        args.seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if not args.seeds or len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds needs at least one seed and no repeats, got {args.seeds}")
    allowed = [*_modes(), UNET]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in allowed]
    if unknown:
        extra = " (the constant predictor is always scored)" if CONSTANT in unknown else ""
        parser.error(f"--models: unknown {unknown}; choose from {','.join(allowed)}{extra}")
    if not models or len(set(models)) != len(models):
        parser.error(f"--models needs at least one model and no repeats, got {models}")
    args.models = models
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        parser.error(f"config overrides must be key=value, got {bad}")
    try:
        torch.device(args.device)
    except RuntimeError as exc:
        parser.error(f"--device: {exc}")
    return args


# ---------------------------------------------------------------------------------------------
# Data: the project's generator and shard converter, as subprocesses.
# ---------------------------------------------------------------------------------------------
def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")


def make_split(workdir: Path, *, buildings: int, views: int, seed: int, size: int) -> str:
    """Generate and shard ``buildings`` x ``views`` Taskonomy views; returns the shard directory.
    Reused when its manifest exists (the same seed writes the same bytes)."""
    from mult.data.shards import MANIFEST_NAME

    name = f"taskonomy-{size}px-{buildings}x{views}-seed{seed}"
    shards, tree = workdir / name, workdir / f"{name}-tree"
    if (shards / MANIFEST_NAME).exists():
        log.info("data: reusing %s", shards)
        return str(shards)
    start = time.perf_counter()
    shutil.rmtree(tree, ignore_errors=True)
    _run([sys.executable, "-m", "pipelines.synth", "--format", "taskonomy", "--out", str(tree),
          "--scenes", str(buildings), "--views", str(views), "--seed", str(seed), "--size", str(size),
          "--workers", "1"])
    _run([sys.executable, "-m", "pipelines.shard", "--format", "taskonomy", "--source", str(tree),
          "--out", str(shards), "--samples-per-shard", str(SAMPLES_PER_SHARD), "--executor", "local"])
    shutil.rmtree(tree, ignore_errors=True)
    log.info("data: %d x %d views at %s in %.0f s", buildings, views, shards, time.perf_counter() - start)
    return str(shards)


def split_summary(url: str, buildings: int, views: int, seed: int) -> dict[str, Any]:
    from mult.data.samples import read_manifest

    manifest = read_manifest(url)
    return {"url": url, "buildings": buildings, "views_per_building": views, "generator_seed": seed,
            "samples": int(manifest["num_samples"]), "shards": len(manifest["shards"]),
            "groups": sorted({s.get("group", s["name"]) for s in manifest["shards"]})}


# ---------------------------------------------------------------------------------------------
# Models: the conv U-Net reference (a yardstick for MulT, not a model the pipeline trains: it
# lives here, not in the product package; like MulT, ``forward`` returns ``{task: [B, C_task,
# H, W]}`` in target units, segmentation as logits, so the same losses, metrics and step apply).
# ---------------------------------------------------------------------------------------------
def conv_block(in_ch: int, out_ch: int) -> nn.Sequential:
    """Two 3x3 conv + BatchNorm + ReLU (no conv bias: the norm has one)."""
    layers: list[nn.Module] = []
    for c_in in (in_ch, out_ch):
        layers += [nn.Conv2d(c_in, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class UNet(nn.Module):
    """U-Net over ``len(widths)`` levels (default 24-48-96: about 0.26 M parameters, six tasks).

    Down: a :func:`conv_block` per level, 2x2 max-pool between levels. Up: a 2x2 stride-2
    transposed conv, concatenation with the skip of the same level, a :func:`conv_block`. One
    1x1 conv to the sum of the tasks' channels, split per task.

    ``forward(images [B, 3, H, W])`` with H and W divisible by ``2 ** (len(widths) - 1)``
    returns ``{task: [B, C_task, H, W]}``.
    """

    def __init__(self, tasks: Sequence[str], widths: Sequence[int] = (24, 48, 96), in_channels: int = 3) -> None:
        super().__init__()
        from mult.tasks import get_task

        if len(widths) < 2 or any(w < 1 for w in widths):
            raise ValueError(f"widths: need at least two positive level widths, got {list(widths)}")
        self.tasks = [get_task(t).name for t in tasks]
        if not self.tasks:
            raise ValueError("UNet needs at least one task")
        self.channels = [get_task(t).channels for t in self.tasks]
        self.down = nn.ModuleList(conv_block(c_in, c_out) for c_in, c_out in zip((in_channels, *widths), widths))
        self.pool = nn.MaxPool2d(2)
        deep_to_shallow = list(widths[::-1])
        self.up = nn.ModuleList(nn.ConvTranspose2d(c_in, c_out, 2, stride=2)
                                for c_in, c_out in zip(deep_to_shallow, deep_to_shallow[1:]))
        self.merge = nn.ModuleList(conv_block(2 * c, c) for c in deep_to_shallow[1:])
        self.head = nn.Conv2d(widths[0], sum(self.channels), 1)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        factor = 2 ** (len(self.down) - 1)
        if images.ndim != 4 or images.shape[-1] % factor or images.shape[-2] % factor:
            raise ValueError(f"UNet expects images [B, C, H, W] with H, W divisible by {factor}, "
                             f"got {tuple(images.shape)}")
        skips = []
        x = images
        for index, block in enumerate(self.down):
            x = block(x if index == 0 else self.pool(x))
            skips.append(x)
        for up, merge, skip in zip(self.up, self.merge, reversed(skips[:-1])):
            x = merge(torch.cat([up(x), skip], dim=1))
        return dict(zip(self.tasks, self.head(x).split(self.channels, dim=1)))


def build(name: str, config: str, overrides: Sequence[str], seed: int) -> nn.Module:
    """MulT in mode ``name``, or the U-Net; weights drawn from ``seed`` whatever was built before."""
    from mult.config import load_config
    from mult.model import build_model

    torch.manual_seed(seed)
    if name == UNET:
        return UNet(load_config(config, list(overrides)).tasks)
    return build_model(load_config(config, [*overrides, f"model.shared_attention={name}"]))


class Run:
    """One model of one seed in training: its optimiser, data position and curves."""

    def __init__(self, name: str, model: nn.Module, cfg: Any, *, seed: int, train_url: str, batch_size: int,
                 epoch_steps: int, steps: int, log_every: int, device: torch.device) -> None:
        from mult.training.optim import build_optimizer, build_scheduler
        from mult.weighting import build_loss_combiner

        self.name, self.cfg, self.seed, self.device = name, cfg, seed, device
        self.model = model.to(device)
        self.combiner = build_loss_combiner(cfg).to(device)
        self.optimizer = build_optimizer(self.model, cfg.optim, self.combiner)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, steps)
        self.train_url, self.batch_size, self.epoch_steps = train_url, batch_size, epoch_steps
        self.steps, self.log_every = steps, log_every
        self.epoch, self.left, self.batches = -1, 0, None
        self.epoch_sums: dict[str, list[float]] = {}
        self.window: dict[str, list[float]] = {}
        self.train_curve: list[dict[str, Any]] = []
        self.val_curve: list[dict[str, Any]] = []
        self.step_s: list[float] = []
        self.data_s: list[float] = []
        self.argmax: dict[str, dict[str, float]] = {}  # filled by the last validation
        self.step = 0

    def _next_epoch(self) -> None:
        from mult.data.loader import make_loader
        from mult.training.step import TimedIterator

        if self.epoch >= 0 and self.epoch_sums:  # as the training loop does (DWA needs it)
            self.combiner.end_epoch({t: s / n for t, (s, n) in self.epoch_sums.items()})
        self.epoch += 1
        self.epoch_sums = {}
        cfg = self.cfg
        loader = make_loader(self.train_url, tasks=cfg.tasks, image_size=cfg.model.img_size,
                             batch_size=self.batch_size, mode="train", steps_per_epoch=self.epoch_steps,
                             seed=self.seed, epoch=self.epoch, shuffle_buffer=cfg.data.shuffle_buffer,
                             hflip=cfg.data.hflip, num_workers=0)
        self.batches, self.left = TimedIterator(loader), self.epoch_steps

    def train_one(self) -> None:
        from mult.training.step import train_step

        if self.left == 0:
            self._next_epoch()
        cfg = self.cfg
        wait0 = self.batches.wait_seconds
        start = time.perf_counter()
        result = train_step(self.model, self.combiner, self.optimizer, self.scheduler, self.batches,
                            tasks=cfg.tasks, accumulation=1, grad_clip=cfg.optim.grad_clip, device=self.device,
                            precision=cfg.train.precision, normalize=cfg.loss.normalize)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        wait = self.batches.wait_seconds - wait0
        self.step_s.append(time.perf_counter() - start - wait)
        self.data_s.append(wait)
        self.left -= 1
        self.step += 1
        for key, value in (("total", result.loss), *result.task_losses.items()):
            self.window.setdefault(key, []).append(value)
        for task, value in result.task_losses.items():
            pair = self.epoch_sums.setdefault(task, [0.0, 0])
            pair[0] += value
            pair[1] += 1
        if self.step % self.log_every == 0 or self.step == self.steps:
            self.train_curve.append({
                "step": self.step, "loss": statistics.fmean(self.window.pop("total")),
                "tasks": {t: statistics.fmean(v) for t, v in self.window.items()}, "lr": result.lr,
            })
            self.window = {}

    def summary(self) -> dict[str, Any]:
        return {"train_curve": self.train_curve, "val_curve": self.val_curve,
                "step_s_median": statistics.median(self.step_s), "step_s_mean": statistics.fmean(self.step_s),
                "data_s_mean": statistics.fmean(self.data_s)}


# ---------------------------------------------------------------------------------------------
# Evaluation.
# ---------------------------------------------------------------------------------------------
class ArgmaxStats:
    """For each classification task over the validation images: how many distinct argmax maps
    (a constant prediction has one), and the share of labelled pixels whose argmax is the
    constant predictor's class there."""

    def __init__(self, tasks: Sequence[str], constant_ids: Mapping[str, Tensor] | None) -> None:
        from mult.tasks import get_task

        self.specs = {t: get_task(t) for t in tasks if get_task(t).kind == "classification"}
        self.constant_ids = constant_ids or {}
        self.maps: dict[str, set[str]] = {t: set() for t in self.specs}
        self.agree: dict[str, list[int]] = {t: [0, 0] for t in self.specs}
        self.images = 0

    def __call__(self, batch: Mapping[str, Any], preds: Mapping[str, Tensor]) -> None:
        self.images += int(batch["rgb"].shape[0])
        for task, spec in self.specs.items():
            if task not in batch["targets"]:
                continue
            ids = preds[task].argmax(dim=1).cpu()
            self.maps[task].update(hashlib.sha1(m.numpy().tobytes()).hexdigest() for m in ids)
            if task in self.constant_ids:
                labelled = batch["valid"][task].cpu()
                if spec.ignore_index is not None:
                    labelled = labelled & (batch["targets"][task].cpu() != spec.ignore_index)
                same = ids == self.constant_ids[task].unsqueeze(0)
                self.agree[task][0] += int((same & labelled).sum())
                self.agree[task][1] += int(labelled.sum())

    def result(self) -> dict[str, dict[str, float]]:
        out = {}
        for task in self.specs:
            hit, total = self.agree[task]
            out[task] = {"distinct_maps": len(self.maps[task]), "images": self.images,
                         "distinct_fraction": len(self.maps[task]) / max(self.images, 1),
                         "agree_with_constant": hit / total if total else math.nan}
        return out


def evaluate_model(model: nn.Module, val_batches: list, cfg: Any, device: torch.device,
                   argmax: ArgmaxStats | None = None) -> dict[str, dict[str, float]]:
    """The metric suite over the whole validation set: ``{task: {metric: value}}``, ``loss`` included."""
    from mult.metrics import MetricSuite
    from mult.training.step import evaluate

    suite = MetricSuite(cfg.tasks)
    evaluate(model, val_batches, suite, tasks=cfg.tasks, device=device, precision=cfg.train.precision,
             normalize=cfg.loss.normalize, on_batch=argmax)
    return suite.compute()


def constant_ids(constant: nn.Module, tasks: Sequence[str], size: int) -> dict[str, Tensor]:
    """The constant predictor's class map ``[H, W]`` per classification task."""
    from mult.tasks import get_task

    with torch.no_grad():
        out = constant(torch.zeros(1, 3, size, size))
    return {t: out[t][0].argmax(dim=0) for t in tasks if get_task(t).kind == "classification"}


def train_seed(args: argparse.Namespace, cfg: Any, seed: int, train_url: str, val_batches: list,
               const_ids: Mapping[str, Tensor]) -> dict[str, dict[str, Any]]:
    """Every model of ``args.models`` for one seed, steps interleaved; returns each run's record."""
    from mult.data.samples import read_manifest
    from mult.model import count_parameters

    epoch_steps = max(1, int(read_manifest(train_url)["num_samples"]) // args.batch_size)
    runs = [Run(name, build(name, args.config, args.overrides, seed), cfg, seed=seed, train_url=train_url,
                batch_size=args.batch_size, epoch_steps=epoch_steps, steps=args.steps, log_every=args.log_every,
                device=torch.device(args.device)) for name in args.models]
    evals = sorted({*range(args.eval_every, args.steps + 1, args.eval_every), args.steps})
    for step in range(1, args.steps + 1):
        for run in runs:
            run.train_one()
        if step in evals:
            for run in runs:
                argmax = ArgmaxStats(cfg.tasks, const_ids) if step == args.steps else None
                metrics = evaluate_model(run.model, val_batches, cfg, run.device, argmax)
                run.val_curve.append({"step": step, "metrics": metrics})
                if argmax is not None:
                    run.argmax = argmax.result()
            log.info("seed %d step %d val loss: %s", seed, step, "; ".join(
                f"{r.name} " + " ".join(f"{m['loss']:.3g}" for m in r.val_curve[-1]["metrics"].values())
                for r in runs))
    return {r.name: {**r.summary(), "final": r.val_curve[-1]["metrics"], "argmax": r.argmax,
                     "parameters": count_parameters(r.model)} for r in runs}


# ---------------------------------------------------------------------------------------------
# Summaries over seeds.
# ---------------------------------------------------------------------------------------------
def spread(per_seed: Mapping[str, float]) -> dict[str, Any]:
    values = list(per_seed.values())
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "per_seed": dict(per_seed)}


def summarize_model(runs: Mapping[str, Mapping[str, Any]], tasks: Sequence[str]) -> dict[str, Any]:
    """Mean, std, min, max over seeds of every final metric, and of the step time."""
    final: dict[str, dict[str, Any]] = {}
    for task in tasks:
        metrics = next(iter(runs.values()))["final"].get(task, {})
        final[task] = {m: spread({s: r["final"][task][m] for s, r in runs.items()}) for m in metrics}
    out: dict[str, Any] = {"final": final}
    steps = {s: r["step_s_median"] for s, r in runs.items() if r.get("step_s_median") is not None}
    if steps:
        out["step_s"] = spread(steps)
        out["data_s"] = spread({s: r["data_s_mean"] for s, r in runs.items()})
    return out


def ratios(models: Mapping[str, Mapping[str, Any]], tasks: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per task: final val loss of each MulT mode over the constant's and the U-Net's, and the
    U-Net's over the constant's: the ratio of the means, and the range of the per-seed ratios."""
    modes = [m for m in models if m in _modes()]
    pairs = [(m, CONSTANT) for m in modes]
    if UNET in models:
        pairs += [(m, UNET) for m in modes] + [(UNET, CONSTANT)]
    out: dict[str, dict[str, Any]] = {}
    for task in tasks:
        out[task] = {}
        for top, bottom in pairs:
            a, b = models[top]["final"][task]["loss"], models[bottom]["final"][task]["loss"]
            per_seed = {s: a["per_seed"][s] / b["per_seed"][s] for s in a["per_seed"]}
            out[task][f"{top}/{bottom}"] = {"ratio": a["mean"] / b["mean"], "per_seed": per_seed,
                                            "min": min(per_seed.values()), "max": max(per_seed.values())}
    return out


def classification_check(models: Mapping[str, Mapping[str, Any]], tasks: Sequence[str]) -> dict[str, Any]:
    """Per classification task and model: is the prediction the constant's?"""
    from mult.tasks import get_task

    out: dict[str, Any] = {}
    for task in tasks:
        spec = get_task(task)
        if spec.kind != "classification":
            continue
        primary = spec.primary_metric.name
        floor = models[CONSTANT]["final"][task][primary]["mean"]
        out[task] = {"metric": primary}
        for name, model in models.items():
            runs = model["runs"].values()
            stats = [r["argmax"][task] for r in runs]
            values = model["final"][task][primary]["per_seed"].values()
            out[task][name] = {
                primary: model["final"][task][primary]["mean"],
                "equals_constant": all(abs(v - floor) <= 1e-9 for v in values),
                "distinct_fraction": statistics.fmean(s["distinct_fraction"] for s in stats),
                "constant_maps": all(s["distinct_maps"] == 1 for s in stats),
                "agree_with_constant": statistics.fmean(s["agree_with_constant"] for s in stats),
            }
    return out


# ---------------------------------------------------------------------------------------------
# Markdown and plot.
# ---------------------------------------------------------------------------------------------
def _cell(stat: Mapping[str, float], spec: str = ".4g") -> str:
    from mult.outputs import fmt

    if stat["min"] == stat["max"]:
        return fmt(stat["mean"], spec)
    low, high = fmt(stat["min"], spec), fmt(stat["max"], spec)
    return f"{fmt(stat['mean'], spec)} ± {fmt(stat['std'], '.2g')} [{low}, {high}]"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows)]


def render(report: Mapping[str, Any]) -> str:
    from mult.outputs import fmt
    from mult.tasks import get_task

    s, d, tasks, models = report["settings"], report["data"], report["tasks"], report["models"]
    machine = report["machine"]
    n = len(s["seeds"])
    lines = [
        f"# Learning benchmark{' (smoke test, not a benchmark)' if s['smoke_test'] else ''}", "",
        f"`{report['command']}`", "",
        f"- {report['date']}, {machine['platform']}, {machine['cpus']} CPUs, "
        f"{machine['torch_threads']} torch thread(s), device {s['device']}, load average "
        f"{machine['load_average_1min_start']:.1f} at the start, {machine['load_average_1min_end']:.1f} at the end; "
        f"{report['elapsed_s']:.0f} s",
        "- " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        f"- config {' '.join([report['config'], *report['overrides']])}; tasks {', '.join(tasks)}; "
        f"{report['img_size']} px",
        f"- data: train {d['train']['samples']} views of {d['train']['buildings']} buildings (generator seed "
        f"{d['train']['generator_seed']}), validation {d['val']['samples']} views of {d['val']['buildings']} "
        f"other building(s) (seed {d['val']['generator_seed']}); {len(d['shared_buildings'])} building(s) in both",
        f"- {s['steps']} steps of batch {s['batch_size']} per model and seed ({s['epoch_steps']} steps an epoch), "
        f"seeds {', '.join(map(str, s['seeds']))}; validation every {s['eval_every']} steps and at the end; "
        f"optimiser {report['optim']}; constant fitted on {s['constant_fitted_on']} training views",
        "",
        "Cells: mean over seeds ± std [min, max] (one number when every seed gives the same).",
        "", "## Models", "",
    ]
    lines += _table(["model", "parameters (M)", "s/step (compute, median)", "s/step waiting for data"],
                    [[name, f"{m['parameters'] / 1e6:.3f}",
                      _cell(m["step_s"], ".3f") if "step_s" in m else "not trained",
                      _cell(m["data_s"], ".3f") if "data_s" in m else "–"] for name, m in models.items()])
    lines += ["", f"## Final validation loss ({n} seed(s))", ""]
    lines += _table(["model", *tasks], [[name, *(_cell(m["final"][t]["loss"]) for t in tasks)]
                                        for name, m in models.items()])
    primary = {t: get_task(t).primary_metric for t in tasks}
    lines += ["", "## Final primary metric", ""]
    lines += _table(["model", *(f"{t} {p.name} {'↑' if p.higher_is_better else '↓'}" for t, p in primary.items())],
                    [[name, *(_cell(m["final"][t][primary[t].name]) for t in tasks)] for name, m in models.items()])
    lines += ["", "## Ratios of final validation loss", "",
              "Ratio of the mean losses" + (" [per-seed min, max]" if n > 1 else "")
              + "; below 1: lower loss than the divisor. `*`: below 1 on every seed.", ""]
    pairs = list(next(iter(report["ratios"].values())))
    rows = []
    for pair in pairs:
        row = [pair.replace("/", " / ")]
        for t in tasks:
            r = report["ratios"][t][pair]
            cell = fmt(r["ratio"], ".3f") + ("*" if r["max"] < 1 else "")
            if n > 1:
                cell += f" [{fmt(r['min'], '.3f')}, {fmt(r['max'], '.3f')}]"
            row.append(cell)
        rows.append(row)
    lines += _table(["ratio", *tasks], rows)
    for task, check in report["classification"].items():
        metric = check["metric"]
        lines += ["", f"## {task}: is the prediction constant?", "",
                  f"Equal {metric}: the same as the constant predictor's on every seed. Distinct maps: distinct "
                  "argmax maps over the validation images (a constant prediction: 1 / images). Agreement: "
                  "labelled pixels whose argmax is the constant predictor's class.", ""]
        lines += _table(["model", metric, f"equal {metric}", "distinct maps / images", "agreement with constant"],
                        [[name, fmt(c[metric], ".4g"), "yes" if c["equals_constant"] else "no",
                          f"{c['distinct_fraction']:.3f}" + (" (constant)" if c["constant_maps"] else ""),
                          f"{c['agree_with_constant']:.1%}"]
                         for name, c in check.items() if name != "metric"])
    lines += ["", "Curves: learn.json (`models.<name>.runs.<seed>.train_curve`, `.val_curve`)"
              + (" and learn.png." if report.get("plot") else ".")]
    return "\n".join(lines) + "\n"


def plot(report: Mapping[str, Any], path: Path) -> Path | None:
    """Per task: the mean over seeds of each model's training (thin) and validation (dots)
    curves, the constant's validation loss as a dashed line."""
    try:
        from mult.outputs import pyplot, save_figure

        plt = pyplot()
    except ImportError:
        log.info("matplotlib is not installed: no plot")
        return None
    tasks, models = report["tasks"], report["models"]
    cols = min(3, len(tasks))
    rows = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, task in zip(axes.flat, tasks):
        for index, (name, model) in enumerate((n, m) for n, m in models.items() if n != CONSTANT):
            color = colors[index % len(colors)]
            runs = list(model["runs"].values())
            train = [statistics.fmean(r["train_curve"][i]["tasks"][task] for r in runs)
                     for i in range(len(runs[0]["train_curve"]))]
            val = [statistics.fmean(r["val_curve"][i]["metrics"][task]["loss"] for r in runs)
                   for i in range(len(runs[0]["val_curve"]))]
            ax.plot([p["step"] for p in runs[0]["train_curve"]], train, color=color, alpha=0.4, linewidth=1)
            ax.plot([p["step"] for p in runs[0]["val_curve"]], val, color=color, marker="o", label=name)
        ax.axhline(models[CONSTANT]["final"][task]["loss"]["mean"], color="black", linestyle="--", label=CONSTANT)
        ax.set_title(task)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("train (thin) and validation (dots) loss, mean over seeds")
    return save_figure(fig, path, dpi=110)


# ---------------------------------------------------------------------------------------------
# Main.
# ---------------------------------------------------------------------------------------------
def _versions() -> dict[str, str]:
    import numpy
    import timm

    return {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "numpy": numpy.__version__}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = get_args_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = settle(parser, parser.parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from mult.config import ConfigError, load_config, to_dict
    from mult.data.loader import make_loader
    from mult.experiments.constant import fit_constant

    try:
        cfg = load_config(args.config, list(args.overrides))
    except (ConfigError, FileNotFoundError) as exc:
        parser.error(str(exc))
    start, load_start = time.perf_counter(), os.getloadavg()[0]
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(args.workdir).resolve() if args.workdir else out / "data"
    workdir.mkdir(parents=True, exist_ok=True)
    size, device = cfg.model.img_size, torch.device(args.device)

    data = {}
    for split, buildings, seed in (("train", args.train_buildings, args.train_seed),
                                   ("val", args.val_buildings, args.val_seed)):
        url = make_split(workdir, buildings=buildings, views=args.views, seed=seed, size=size)
        data[split] = split_summary(url, buildings, args.views, seed)
    train_url, val_url = data["train"]["url"], data["val"]["url"]
    data["shared_buildings"] = sorted(set(data["train"]["groups"]) & set(data["val"]["groups"]))
    if data["shared_buildings"]:  # the generator names buildings from its seed; names can repeat across seeds
        raise SystemExit(f"error: validation buildings {data['shared_buildings']} are also in the training set; "
                         "choose another --val-seed")

    common = dict(tasks=cfg.tasks, image_size=size, batch_size=args.batch_size, mode="eval", num_workers=0)
    val_batches = list(make_loader(val_url, **common))
    constant = fit_constant(make_loader(train_url, **common), cfg.tasks, max_samples=args.constant_samples)
    const_ids = constant_ids(constant, cfg.tasks, size)
    argmax = ArgmaxStats(cfg.tasks, const_ids)
    floor = {"train_curve": [], "val_curve": [], "final": evaluate_model(constant.to(device), val_batches, cfg,
                                                                           device, argmax)}
    floor["argmax"] = argmax.result()

    runs: dict[str, dict[str, Any]] = {name: {} for name in args.models}
    parameters: dict[str, int] = {}
    for seed in args.seeds:
        log.info("seed %d: training %s for %d steps", seed, ", ".join(args.models), args.steps)
        for name, record in train_seed(args, cfg, seed, train_url, val_batches, const_ids).items():
            parameters[name] = record.pop("parameters")
            runs[name][str(seed)] = record
    runs[CONSTANT] = {str(seed): floor for seed in args.seeds}  # evaluated once: nothing depends on the seed
    models: dict[str, Any] = {}
    for name, by_seed in runs.items():
        kind = "unet" if name == UNET else CONSTANT if name == CONSTANT else "mult"
        models[name] = {"kind": kind, "parameters": parameters.get(name, 0), "trained": name != CONSTANT,
                        **summarize_model(by_seed, cfg.tasks), "runs": by_seed}
    models[CONSTANT]["note"] = "fitted once on the training split; no parameters, not trained, seed-independent"

    report: dict[str, Any] = {
        "command": "python -m bench.learn " + shlex.join(argv),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "load_average_1min_start": load_start, "load_average_1min_end": os.getloadavg()[0]},
        "versions": _versions(),
        "config": os.path.relpath(args.config, REPO), "overrides": list(args.overrides),
        "resolved_config": to_dict(cfg), "tasks": list(cfg.tasks), "img_size": size,
        "optim": f"AdamW lr {cfg.optim.lr:g} wd {cfg.optim.weight_decay:g}, {cfg.optim.warmup_steps} warm-up steps "
                 f"+ cosine to {cfg.optim.min_lr_ratio:g}x, clip {cfg.optim.grad_clip:g}",
        "settings": {"steps": args.steps, "seeds": args.seeds, "batch_size": args.batch_size,
                     "eval_every": args.eval_every, "log_every": args.log_every, "device": args.device,
                     "smoke_test": args.smoke_test, "models": args.models, "constant_fitted_on": constant.samples,
                     "epoch_steps": max(1, data["train"]["samples"] // args.batch_size)},
        "data": data,
        "models": models,
        "ratios": ratios(models, cfg.tasks),
        "classification": classification_check(models, cfg.tasks),
        "elapsed_s": time.perf_counter() - start,
    }
    figure = plot(report, out / "learn.png")
    report["plot"] = str(figure) if figure else None
    write_report(report, out)
    return report


def write_report(report: Mapping[str, Any], out: Path) -> None:
    from mult.outputs import json_safe

    (out / "learn.json").write_text(json.dumps(json_safe(report), indent=1, allow_nan=False))
    text = render(report)
    (out / "learn.md").write_text(text)
    sys.stdout.write(text)
    log.info("wrote %s and %s", out / "learn.json", out / "learn.md")


if __name__ == "__main__":
    main()
