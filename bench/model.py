"""Model benchmark: the shared-attention modes side by side, and the paper model's training step.

    python bench/model.py [--quick] [--config configs/cpu-small.yaml] [--batch-size 8]
                          [--device cpu|cuda] [--json out.json] [key=value overrides ...]

For each mode (``none``, ``reference``, ``official``, ``encoder``) on the same config:

- train-step throughput (forward, backward, AdamW step; samples/s). The three models live in
  one process and their steps are interleaved round-robin, so drifting load on a shared
  machine hits every mode alike; the median and the fastest step are reported;
- memory of a train step: the bytes autograd saves for backward in one forward (activations,
  counted once per storage through ``saved_tensors_hooks``; exact and immune to other jobs on
  the machine) plus the training state (weights, gradients, AdamW's two moments). On CUDA also
  the peak ``max_memory_allocated`` of two train steps, each mode in its own fresh process.
  (A CPU process's peak RSS is no measure here: importing torch and timm already peaks above
  the tiny model's step, and the allocator keeps freed memory.);
- FLOPs per train step from ``torch.utils.flop_counter.FlopCounterMode``, and the achieved FLOP/s
  as a fraction of a large-matmul rate measured in the same run, same dtype and threads.

Ratios are to ``none``. Unless ``--quick``/``--no-paper``, also ``configs/paper.yaml``'s model
(Swin-L, six tasks, 256 px, window 7; random weights, since only the cost is measured) in every
mode, each in a fresh process on the CPU at batch 1: one full training step as the training stage
runs it (:func:`mult.training.step.train_step`: forward, the six task losses, backward, AdamW),
seconds per step over ``--paper-steps`` steps after one warm-up, peak RSS, parameters, and the
FLOPs of forward + backward.

The loss is the mean square of every output: the benchmark measures the model, not the losses.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
MODES = ("none", "reference", "official", "encoder")
log = logging.getLogger("bench.model")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "cpu-small.yaml"))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=20, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per mode")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--matmul-size", type=int, default=2048)
    p.add_argument("--paper-config", default=str(ROOT / "configs" / "paper.yaml"))
    p.add_argument("--no-paper", action="store_true", help="skip the paper model's training steps")
    p.add_argument("--paper-steps", type=int, default=2, help="timed training steps of the paper model per mode")
    p.add_argument("--quick", action="store_true", help="few steps, small matmul, no paper model")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--worker", choices=["memory", "paper"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=MODES, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="config overrides, key=value")
    return p


# ---------------------------------------------------------------------------------------------
# Pieces.
# ---------------------------------------------------------------------------------------------
def _build(config: str, overrides: Sequence[str], mode: str | None, device: str):
    from mult import load_config
    from mult.model import build_model

    extra = [f"model.shared_attention={mode}"] if mode else []
    cfg = load_config(config, [*overrides, *extra])
    return build_model(cfg).to(device), cfg


def _autocast(device: str, cfg) -> contextlib.AbstractContextManager:
    """The training step's own precision rule (mult.training.step.autocast)."""
    from mult.training.step import autocast

    return autocast(torch.device(device), cfg.train.precision)


def _train_step(model, opt, images: torch.Tensor, autocast: contextlib.AbstractContextManager) -> None:
    with autocast:
        out = model(images)
    loss = sum(y.float().square().mean() for y in out.values())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def matmul_rate(n: int, device: str, dtype: torch.dtype, repeats: int = 5) -> float:
    """Best FLOP/s of an ``n x n`` matmul (``2 n^3`` FLOPs) over ``repeats`` runs."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def step_flops(model, images: torch.Tensor, autocast) -> int:
    """FLOPs of one forward + backward (the optimizer step is not counted)."""
    with FlopCounterMode(display=False) as counter:
        with autocast:
            out = model(images)
        sum(y.float().square().mean() for y in out.values()).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def saved_activation_bytes(model, images: torch.Tensor, autocast) -> int:
    """Bytes autograd keeps for backward after one forward: every distinct storage that a
    backward node saved, parameters excluded (they are counted in the training state)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with autocast:
            out = model(images)
    del out
    return sum(storages.values())


def train_state_bytes(model) -> int:
    """Weights + gradients + AdamW's two moments, all in the weights' dtype."""
    return sum(4 * p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------
# Workers (fresh processes, so peaks are per mode).
# ---------------------------------------------------------------------------------------------
def memory_worker(args: argparse.Namespace) -> dict[str, Any]:
    """CUDA only: peak allocated memory over two train steps of one mode, in a fresh process."""
    torch.manual_seed(0)
    model, cfg = _build(args.config, args.overrides, args.mode, args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(args.batch_size, 3, model.img_size, model.img_size, device=args.device)
    autocast = _autocast(args.device, cfg)
    torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        _train_step(model, opt, images, autocast)
    torch.cuda.synchronize()
    return {"mode": args.mode, "cuda_peak_bytes": torch.cuda.max_memory_allocated()}


def paper_worker(args: argparse.Namespace) -> dict[str, Any]:
    """The paper model's training step in one mode, on the CPU, in this (fresh) process."""
    from itertools import repeat

    from mult.data.smoke import random_batch
    from mult.model import count_parameters
    from mult.training.optim import build_optimizer
    from mult.training.step import train_step
    from mult.weighting import build_loss_combiner

    t0 = time.perf_counter()
    model, cfg = _build(args.paper_config, ["model.pretrained=false"], args.mode, "cpu")
    build_s = time.perf_counter() - t0
    combiner = build_loss_combiner(cfg)
    optimizer = build_optimizer(model, cfg.optim, combiner)
    batch = random_batch(cfg.tasks, 1, model.img_size)
    device = torch.device("cpu")

    def step() -> float:
        t0 = time.perf_counter()
        train_step(model, combiner, optimizer, None, repeat(batch), tasks=cfg.tasks, accumulation=1,
                   grad_clip=cfg.optim.grad_clip, device=device, precision=cfg.train.precision)
        return time.perf_counter() - t0

    flops = step_flops(model, batch["rgb"], contextlib.nullcontext())
    warmup_s = step()
    times = [step() for _ in range(args.paper_steps)]
    return {
        "mode": args.mode, "encoder": cfg.model.encoder, "tasks": cfg.tasks, "img_size": model.img_size,
        "window_size": cfg.model.window_size, "resolutions": model.encoder.resolutions,
        "parameters": count_parameters(model) + count_parameters(combiner),
        "encoder_parameters": count_parameters(model.encoder),
        "decoder_parameters": count_parameters(model.decoder),
        "head_parameters": count_parameters(model.heads),
        "train_flops_per_image": flops, "build_s": build_s, "warmup_step_s": warmup_s,
        "step_s": statistics.median(times), "step_times_s": times, "peak_rss_bytes": _peak_rss_bytes(),
        "threads": torch.get_num_threads(),
    }


def run_worker(args: argparse.Namespace, kind: str, mode: str | None = None) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--config", args.config,
           "--paper-config", args.paper_config, "--batch-size", str(args.batch_size), "--device", args.device,
           "--paper-steps", str(args.paper_steps)]
    if mode:
        cmd += ["--mode", mode]
    cmd += list(args.overrides)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} worker ({mode}) failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# Main.
# ---------------------------------------------------------------------------------------------
def throughput(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Median train-step time of each mode, steps interleaved round-robin."""
    from mult.model import count_parameters

    runs = {}
    for mode in MODES:
        torch.manual_seed(0)
        model, cfg = _build(args.config, args.overrides, mode, args.device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        images = torch.randn(args.batch_size, 3, model.img_size, model.img_size, device=args.device)
        runs[mode] = dict(model=model, opt=opt, images=images, autocast=_autocast(args.device, cfg), times=[])
        runs[mode]["flops"] = step_flops(model, images, runs[mode]["autocast"])
        runs[mode]["activation_bytes"] = saved_activation_bytes(model, images, runs[mode]["autocast"])
        runs[mode]["state_bytes"] = train_state_bytes(model)
        runs[mode]["parameters"] = count_parameters(model)
    for i in range(args.warmup + args.steps):
        for mode, r in runs.items():
            _sync(args.device)
            t0 = time.perf_counter()
            _train_step(r["model"], r["opt"], r["images"], r["autocast"])
            _sync(args.device)
            if i >= args.warmup:
                r["times"].append(time.perf_counter() - t0)
    results = {}
    for mode, r in runs.items():
        step = statistics.median(r["times"])
        results[mode] = {
            "parameters": r["parameters"],
            "step_s": step,
            "samples_per_s": args.batch_size / step,
            "best_samples_per_s": args.batch_size / min(r["times"]),
            "activation_bytes": r["activation_bytes"],
            "state_bytes": r["state_bytes"],
            "step_memory_bytes": r["activation_bytes"] + r["state_bytes"],
            "flops_per_step": r["flops"],
            "achieved_flops_per_s": r["flops"] / step,
            "step_times_s": r["times"],
        }
    return results


def render(results: dict[str, Any]) -> str:
    rate = results["matmul_flops_per_s"]
    modes = results["modes"]
    base = modes["none"]
    lines = [
        f"config {results['config']} {' '.join(results['overrides'])}, batch {results['batch_size']}, "
        f"device {results['device']}, {results['threads']} threads, load average {results['load_average_1min']:.1f}",
        f"matmul {results['matmul_size']}^2 {results['dtype']}: {rate / 1e9:.1f} GFLOP/s",
        "",
        "| mode | params (M) | samples/s median (best) | vs none | activations + state (MiB) | vs none "
        "| GFLOP/step | GFLOP/s | of matmul |" + (" CUDA peak (MiB) | vs none |" if "cuda_peak_bytes" in base else ""),
        "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if "cuda_peak_bytes" in base else ""),
    ]
    for mode, r in modes.items():
        row = (
            f"| {mode} | {r['parameters'] / 1e6:.2f} | {r['samples_per_s']:.2f} ({r['best_samples_per_s']:.2f}) | "
            f"{r['samples_per_s'] / base['samples_per_s']:.2f} ({r['best_samples_per_s'] / base['best_samples_per_s']:.2f}) | "
            f"{r['activation_bytes'] / 2**20:.0f} + {r['state_bytes'] / 2**20:.0f} | "
            f"{r['step_memory_bytes'] / base['step_memory_bytes']:.2f} | {r['flops_per_step'] / 1e9:.2f} | "
            f"{r['achieved_flops_per_s'] / 1e9:.1f} | {r['achieved_flops_per_s'] / rate:.1%} |"
        )
        if "cuda_peak_bytes" in r:
            row += f" {r['cuda_peak_bytes'] / 2**20:.0f} | {r['cuda_peak_bytes'] / base['cuda_peak_bytes']:.2f} |"
        lines.append(row)
    paper = results.get("paper")
    if paper:
        ref = paper["none"]
        first = next(iter(paper.values()))
        lines += [
            "",
            f"paper model ({first['encoder']}, {len(first['tasks'])} tasks, {first['img_size']} px, window "
            f"{first['window_size']}, stage maps {[r for r, _ in first['resolutions']]}): one training step "
            f"(forward, losses, backward, AdamW) at batch 1 on the CPU, {first['threads']} threads, each mode in "
            "a fresh process",
            "",
            "| mode | params (M) | GFLOP fwd+bwd | s/step (median) | samples/s vs none | peak RSS (GiB) |",
            "|---|---|---|---|---|---|",
        ]
        for mode, r in paper.items():
            lines.append(
                f"| {mode} | {r['parameters'] / 1e6:.1f} | {r['train_flops_per_image'] / 1e9:.0f} | {r['step_s']:.1f} | "
                f"{ref['step_s'] / r['step_s']:.2f} | {r['peak_rss_bytes'] / 2**30:.1f} |"
            )
        if "reference" in paper:
            lines.append(f"\nreference / none speed: {paper['none']['step_s'] / paper['reference']['step_s']:.2f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = get_args_parser().parse_args(argv)
    if args.worker == "memory":
        print(json.dumps(memory_worker(args)))
        return {}
    if args.worker == "paper":
        print(json.dumps(paper_worker(args)))
        return {}
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.quick:
        args.steps, args.warmup, args.matmul_size, args.no_paper = 6, 2, 1024, True
    from mult import load_config

    bf16 = args.device == "cuda" and load_config(args.config, list(args.overrides)).train.precision == "bf16"
    dtype = torch.bfloat16 if bf16 else torch.float32  # the matmul runs in the model's compute dtype
    log.info("matmul rate")
    rate = matmul_rate(args.matmul_size, args.device, dtype)
    log.info("throughput (interleaved)")
    modes = throughput(args)
    if args.device == "cuda":
        for mode in MODES:
            log.info("CUDA peak memory: %s", mode)
            modes[mode].update(run_worker(args, "memory", mode))
    results: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
        + (f", {torch.cuda.get_device_name()}" if args.device == "cuda" else ""),
        "torch": torch.__version__,
        "config": os.path.relpath(args.config, ROOT),
        "overrides": list(args.overrides),
        "batch_size": args.batch_size,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0],  # other jobs on a shared machine skew timings
        "dtype": str(dtype).replace("torch.", ""),
        "matmul_size": args.matmul_size,
        "matmul_flops_per_s": rate,
        "modes": modes,
    }
    if not args.no_paper:
        results["paper"] = {}
        for mode in MODES:
            log.info("paper model training step on the CPU: %s", mode)
            results["paper"][mode] = run_worker(args, "paper", mode)
    print(render(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
