"""Ray Train vs plain torchrun: the same training loop, model, data and steps, side by side.

    python bench/ddp.py [--config configs/cpu-small.yaml] [--steps 40] [--log-every 5] \
        [--repeats 2] [key=value ...]

Both launchers run the library's loop, :func:`mult.training.loop.train_loop` (model, AdamW +
schedule, the shard loader, DDP over gloo on CPU or NCCL on GPU, ``ray.train.report`` every
``--log-every`` steps under Ray through :class:`mult.launch.trainer.RaySession`, a no-op under
torchrun through :class:`mult.training.session.LocalSession`) on ``--nproc`` workers over the
same generated shards. ``--nproc 1`` is the spare-core case: one worker, the other core left to
Ray's own processes, as on a GPU node whose CPUs are not all busy feeding the GPUs. Throughput is
the global samples/s between the reports at steps ``log_every`` and ``steps - log_every``: start-up,
the first (warm-up) steps and the final validation + checkpoint are outside the window.
Runs alternate (torchrun, Ray, torchrun, Ray, ...) and the median of each is compared against
the 0.95 goal.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mult.training.session import Hook  # noqa: E402

log = logging.getLogger("bench.ddp")


class ReportTimer(Hook):
    """A loop hook: when each report is reached and how long it blocked the loop."""

    def __init__(self, rank: int, out_file: str | None) -> None:
        self.rank = rank
        self.out_file = out_file
        self.marks: list[list] = []  # [step, time, samples_total, cpu_s, report_s]

    @staticmethod
    def _cpu_seconds() -> float:
        """CPU time of this rank and its live child processes (the loader workers), from /proc."""
        tick = os.sysconf("SC_CLK_TCK")
        total, todo = 0.0, [os.getpid()]
        while todo:
            pid = todo.pop()
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
                for task in Path(f"/proc/{pid}/task").iterdir():
                    todo += [int(c) for c in (task / "children").read_text().split()]
            except (OSError, ValueError, IndexError):  # a process that just exited
                continue
        return total

    def before_report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        self.marks.append([int(metrics["step"]), time.perf_counter(), metrics["samples_total"], self._cpu_seconds(), 0.0])

    def after_report(self, metrics: dict[str, Any], seconds: float) -> None:
        self.marks[-1][4] = seconds

    def close(self) -> None:
        if self.rank == 0 and self.out_file:
            Path(self.out_file).write_text(json.dumps(self.marks))


def _loop(cfg_dict: dict, session: Any, out_file: str, local_dir: str) -> None:
    from mult.config import from_dict
    from mult.training.loop import LoopOptions, train_loop

    timer = ReportTimer(session.rank, out_file)
    train_loop(from_dict(cfg_dict), session, LoopOptions(Path(local_dir), telemetry=False), hooks=[timer])


def _ray_func(config: dict) -> None:
    from mult.launch.trainer import RaySession

    _loop(config["cfg"], RaySession(), config["out"], config["local_dir"])


def report_seconds(marks: list[list[float]], first: int, last: int) -> float:
    """Mean time a report blocked rank 0's loop, over the reports inside the window."""
    inside = [m[4] for m in marks if first <= int(m[0]) < last]
    return sum(inside) / max(len(inside), 1)


def throughput(marks: list[list[float]], first: int, last: int) -> tuple[float, float]:
    """Between the reports at steps ``first`` and ``last``: global samples per wall second, and
    samples per CPU-second of rank 0's processes (trainer + loader workers; Ray's own daemons
    are not counted), which contention from other jobs on the host disturbs far less."""
    by_step = {int(m[0]): m[1:4] for m in marks}
    (t0, n0, c0), (t1, n1, c1) = by_step[first], by_step[last]
    return (n1 - n0) / (t1 - t0), (n1 - n0) / max(c1 - c0, 1e-9)


def run_torchrun(cfg: dict, workdir: Path, nproc: int) -> list:
    out = workdir / f"torchrun-{time.monotonic_ns()}.json"
    cfg_file = workdir / "cfg.json"
    cfg_file.write_text(json.dumps(cfg))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           __file__, "--worker", str(cfg_file), str(out), str(workdir)]
    subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(out.read_text())


def run_ray(cfg: dict, workdir: Path, nproc: int) -> list:
    import ray

    from mult.launch.env import DEFAULT_HEALTH_CHECK_S, HEALTH_CHECK_ENV

    # As the training stage does (mult.launch.env): the report latency follows this interval.
    os.environ.setdefault(HEALTH_CHECK_ENV, DEFAULT_HEALTH_CHECK_S)
    private = not ray.is_initialized() and "RAY_ADDRESS" not in os.environ
    if private:  # never another user's head on this host
        # The dashboard serves the state API that Ray Train's placement-group cleaner polls;
        # without it the cleaner retries in a loop and takes CPU from the workers.
        ray.init(address="local", num_cpus=nproc, include_dashboard=True)
    elif not ray.is_initialized():
        ray.init()
    try:
        return _fit_ray(cfg, workdir, nproc)
    finally:
        if private:  # so the next torchrun run does not share the cores with idle Ray daemons
            ray.shutdown()


def _fit_ray(cfg: dict, workdir: Path, nproc: int) -> list:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    out = workdir / f"ray-{time.monotonic_ns()}.json"
    use_gpu = cfg["scaling"]["use_gpu"]
    trainer = TorchTrainer(
        _ray_func,
        train_loop_config={"cfg": cfg, "out": str(out), "local_dir": str(workdir)},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=nproc, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cfg["scaling"]["cpus_per_worker"]}),
        run_config=RunConfig(name=f"bench-{time.monotonic_ns()}", storage_path=str(workdir / "ray")),
    )
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"Ray Train run failed: {result.error}")
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/cpu-small.yaml")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.steps < 3 * args.log_every:
        parser.error("--steps must be at least 3 x --log-every")

    from mult.config import load_config, to_dict
    from mult.data.smoke import make_smoke_dataset

    with tempfile.TemporaryDirectory(prefix="mult-bench-") as tmp:
        workdir = Path(tmp)
        base = load_config(args.config, args.overrides)
        train_url, _ = make_smoke_dataset(str(workdir / "data"), size=base.model.img_size)
        cfg = load_config(args.config, [
            *args.overrides, f"data.train={train_url}", "data.val=null",
            f"train.max_steps={args.steps}", f"train.log_every={args.log_every}",
            f"train.val_every={args.steps}", f"train.checkpoint_every={args.steps}",
            f"data.steps_per_epoch={args.steps}", f"scaling.num_workers={args.nproc}",
            f"train.storage_path={workdir / 'runs'}",
        ])
        cfg_dict = to_dict(cfg)
        first, last = args.log_every, args.steps - args.log_every
        results: dict[str, list[tuple[float, float]]] = {"torchrun": [], "ray": []}
        blocked: dict[str, list[float]] = {"torchrun": [], "ray": []}
        loads = []
        for repeat in range(args.repeats):
            for name, runner in (("torchrun", run_torchrun), ("ray", run_ray)):
                marks = runner(cfg_dict, workdir, args.nproc)
                wall, per_cpu = throughput(marks, first, last)
                results[name].append((wall, per_cpu))
                blocked[name].append(report_seconds(marks, first, last))
                loads.append(os.getloadavg()[0])
                log.info("repeat %d %-8s %.2f samples/s, %.2f samples per rank-0 CPU-s, reports block "
                         "%.3f s each (load %.1f)", repeat, name, wall, per_cpu, blocked[name][-1], loads[-1])
    med = {n: [statistics.median(v[i] for v in r) for i in (0, 1)] for n, r in results.items()}
    ratio_wall = med["ray"][0] / med["torchrun"][0]
    ratio_cpu = med["ray"][1] / med["torchrun"][1]
    summary = {
        "config": args.config, "overrides": args.overrides, "steps": args.steps,
        "window": [first, last], "global_batch": cfg.train.global_batch_size, "workers": args.nproc,
        "runs_wall_and_per_cpu": results, "medians": med, "report_blocking_s": blocked, "load_average_1min": loads,
        "ratio_wall": ratio_wall, "ratio_per_cpu": ratio_cpu, "goal": 0.95,
    }
    sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    for label, ratio in (("wall", ratio_wall), ("per CPU-second", ratio_cpu)):
        verdict = "met" if ratio >= 0.95 else "NOT met"
        sys.stdout.write(f"ray / torchrun ({label}) = {ratio:.3f} (goal >= 0.95: {verdict})\n")
    return 0


def _worker(argv: list[str]) -> None:
    cfg_file, out_file, local_dir = argv
    import torch.distributed as dist

    from mult.training.session import LocalSession

    session = LocalSession.from_torchrun()
    try:
        _loop(json.loads(Path(cfg_file).read_text()), session, out_file, local_dir)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(sys.argv[2:])
    else:
        sys.exit(main())
