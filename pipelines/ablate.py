"""The ablation stage: single-task baselines, then MulT per shared-attention mode, per task pair
and per number of tasks, over several seeds; Delta-m tables, a task-affinity table, plots.

    python -m pipelines.ablate --config configs/cpu-small.yaml --study all --seeds 0,1,2 \\
        --out runs/ablation data.train=URL data.val=URL [key=value ...]
    python -m pipelines.ablate --config configs/cpu-small.yaml --smoke-test --out /tmp/abl tasks=[normal,depth_zbuffer]

``--study modes|pairwise|num-tasks|all``; what each study trains and reports, the num-tasks
subset rule and the Delta-m convention are in :mod:`mult.studies`. All runs of one invocation
share the data, the steps and the seed set (``--seeds``, default 0,1,2): they differ only in
their tasks, shared-attention mode and seed. Each run is evaluated once, after its last step,
on ``data.val`` (all of it unless ``--eval-batches``).

**How runs execute (``--launcher``).** An ablation is many small, independent trainings.

* ``task`` (default): each run is one Ray task asking ``--cpus-per-run`` CPUs and
  ``--gpus-per-run`` GPUs, running :func:`pipelines.train.train_loop` in that one process with
  a single-rank :class:`LocalSession` (no DDP, no TorchTrainer). Ray packs as many runs as the
  cluster holds (on a 2-CPU machine with 1 CPU a run: two at a time) and an autoscaler adds
  nodes for the queue. This is what fits many *small* runs: a TorchTrainer costs about 20 s of
  start-up per run here, more than a small run itself.
* ``trainer``: each run is a normal ``TorchTrainer`` fit (``pipelines.train.build_trainer``:
  ``scaling.num_workers`` DDP workers, checkpoints under ``{out}/train-runs``, fault tolerance),
  started from a Ray task that asks ``--driver-cpus`` (default 0.01, as Tune's trial drivers;
  each worker asks that much less, so a run occupies exactly ``num_workers x cpus_per_worker``).
  This is for runs too large for one device.
* ``local``: the runs one after another in this process, without Ray (debugging).

``--max-concurrent`` caps the runs in flight (default: whatever the cluster's resources allow).
The global batch is the same under every launcher (``task``/``local`` accumulate micro-batches
on one rank), so the launcher does not change what a run computes.

**Resumable.** Each finished run is written at once to ``{out}/runs/{run_id}.json`` with a
fingerprint of its settings; a rerun skips every run whose file matches and trains the rest
(changed settings retrain). Baselines (single-task, ``shared_attention=none``) are trained once
per seed and shared by every study of the invocation, and by later invocations in the same
``--out``; runs that two studies share are trained once.

**Outputs** in ``--out``: ``runs/*.json``; per study ``{study}.md``, ``{study}.json``,
``{study}.png`` (``modes``, ``pairwise``, ``num_tasks``); ``baselines.json`` (mean single-task
metrics over seeds, the ``{task: {metric: value}}`` format ``train.baselines`` reads);
``report.md`` and ``results.json`` with everything of this invocation.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from mult import studies as st
from mult.config import Config, ConfigError, from_dict, load_config, to_dict

log = logging.getLogger("mult.ablate")

LAUNCHERS = ("task", "trainer", "local")
SMOKE_SEEDS = 2


# =============================================================================================
# One run, on a worker.
# =============================================================================================
class LocalSession:
    """A single-rank :class:`pipelines.train.Session`: nothing to restore, reports kept in memory."""

    def __init__(self, device: Any) -> None:
        self.rank = 0
        self.world_size = 1
        self.device = device
        self.reports = 0

    @contextlib.contextmanager
    def restored(self) -> Iterator[Path | None]:
        yield None  # an ablation run is short; a failed one is retrained from scratch

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        self.reports += 1


def execute_run(config: dict[str, Any], data_samples: int, cpus: float = 1.0) -> dict[str, Any]:
    """Train one run in this process (``train_loop`` with :class:`LocalSession`).

    Returns ``{"report": last reported metrics, "seconds": wall time}``; the last report holds
    the final validation (``val/<task>/<metric>``) since the last step always validates.
    """
    import torch

    from pipelines.train import LoopOptions, train_loop

    cfg = from_dict(config)
    torch.set_num_threads(max(1, int(cpus)))
    device = torch.device("cuda" if cfg.scaling.use_gpu and torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mult-ablate-") as tmp:
        opts = LoopOptions(Path(tmp), data_samples=data_samples, telemetry=False)
        report = train_loop(cfg, LocalSession(device), opts)
    return {"report": report, "seconds": time.perf_counter() - start}


def execute_trainer_run(config: dict[str, Any]) -> dict[str, Any]:
    """Train one run as a normal ``TorchTrainer`` fit (DDP over ``scaling.num_workers``)."""
    from pipelines.train import build_trainer, prepare

    start = time.perf_counter()
    plan = prepare(from_dict(config))
    result = build_trainer(plan).fit()
    if result.error is not None:
        raise RuntimeError(f"run {plan.run_name} failed: {result.error}")
    return {"report": dict(result.metrics or {}), "seconds": time.perf_counter() - start,
            "train_run": plan.run_url}


# =============================================================================================
# Driver.
# =============================================================================================
@dataclass
class Ablation:
    """What the driver settled before any run starts."""

    cfg: Config  # the base config (all tasks), already adjusted for the ablation
    out: Path
    studies: list[str]
    seeds: list[int]
    modes: list[str]
    study_mode: str
    runs: list[st.RunSpec]
    configs: dict[st.RunSpec, Config]
    data_samples: int


def prepare_ablation(cfg: Config, args: argparse.Namespace) -> Ablation:
    """Check data, storage and options; plan the runs. Raises ``ConfigError``/``StudyError``/``PreflightError``."""
    from pipelines.train import prepare

    out = Path(args.out).expanduser().resolve()
    if args.cpus_per_run <= 0 or args.gpus_per_run < 0:
        raise ConfigError(f"--cpus-per-run must be > 0 and --gpus-per-run >= 0, got {args.cpus_per_run}, "
                          f"{args.gpus_per_run}")
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise ConfigError(f"--max-concurrent must be >= 1, got {args.max_concurrent}")
    data = to_dict(cfg)
    t = data["train"]
    # One evaluation, after the last step; no mid-run checkpoints to pay for.
    t["val_every"] = t["checkpoint_every"] = t["max_steps"]
    t["log_every"] = min(t["log_every"], t["max_steps"])
    t["val_batches"] = args.eval_batches
    t["baselines"] = None
    t["storage_path"] = str(out / "train-runs")
    t["run_name"] = "ablate"
    if args.launcher != "trainer":
        data["scaling"]["num_workers"] = 1  # one rank; the global batch is reached by accumulation
        data["scaling"]["use_gpu"] = args.gpus_per_run > 0
    else:  # the run's driver task and its workers together ask num_workers x cpus_per_worker
        s = data["scaling"]
        s["cpus_per_worker"] = max(0.01, s["cpus_per_worker"] - args.driver_cpus / s["num_workers"])
    data["metrics"]["prometheus_port"] = None
    data["metrics"]["pushgateway"] = None
    cfg = from_dict(data)
    plan = prepare(cfg)  # data readable and has the tasks, storage writable
    if cfg.data.val is None:
        raise ConfigError("data.val: the ablation evaluates every run on data.val; set data.val=URL")
    studies = st.parse_studies(args.study)
    runs = st.plan_runs(studies, cfg.tasks, args.seeds, modes=args.modes, study_mode=args.study_mode)
    configs = {spec: st.run_config(cfg, spec) for spec in runs}
    for spec in runs:
        if spec.mode == "reference" and cfg.model.reference_task not in spec.tasks and spec.seed == args.seeds[0]:
            log.info("run %s lacks %s: its reference task is its first task, %s",
                     "+".join(spec.tasks), cfg.model.reference_task, spec.tasks[0])
    return Ablation(cfg, out, studies, list(args.seeds), list(args.modes), args.study_mode, runs, configs,
                    plan.data_samples)


def apply_smoke_test(cfg: Config, out: Path) -> Config:
    """A seconds-long ablation: ``pipelines.train``'s smoke settings, data generated under ``out``."""
    from pipelines.train import apply_smoke_test as train_smoke

    data = to_dict(cfg)
    data["train"]["storage_path"] = str(out)  # the generated data lands in {out}/smoke-data
    data["data"]["num_workers"] = 0  # one process per run: no loader processes to start per epoch
    return train_smoke(from_dict(data))


def _result(spec: st.RunSpec, cfg: Config, outcome: dict[str, Any]) -> st.RunResult:
    metrics = st.metrics_from_report(outcome["report"], list(spec.tasks))
    report = outcome["report"]
    extra = {k: float(v) for k, v in report.items()
             if k.startswith("loss/") and isinstance(v, (int, float))}
    if "train_run" in outcome:
        extra["train_run"] = outcome["train_run"]
    return st.RunResult(
        spec, metrics, st.fingerprint(cfg),
        reference_task=cfg.model.reference_task if spec.mode == "reference" else None,
        seconds=float(outcome.get("seconds", math.nan)), steps=int(report.get("step", 0)), extra=extra,
    )


def _init_ray() -> None:
    from pipelines.raysetup import init_ray

    init_ray()


def _submitter(abl: Ablation, args: argparse.Namespace) -> Callable[[st.RunSpec], Any]:
    """``spec -> ObjectRef`` for the Ray launchers."""
    import ray

    if args.launcher == "task":
        remote = ray.remote(num_cpus=args.cpus_per_run, num_gpus=args.gpus_per_run,
                            max_retries=args.max_retries)(execute_run)
        return lambda spec: remote.options(name=f"ablate:{spec.run_id}").remote(
            to_dict(abl.configs[spec]), abl.data_samples, args.cpus_per_run)
    remote = ray.remote(num_cpus=args.driver_cpus, max_retries=0)(execute_trainer_run)

    def submit(spec: st.RunSpec) -> Any:
        config = to_dict(abl.configs[spec])
        config["train"]["run_name"] = f"ablate-{spec.run_id}"  # Train's run directory says which run
        return remote.options(name=f"ablate:{spec.run_id}").remote(config)

    return submit


def run_pending(abl: Ablation, pending: Sequence[st.RunSpec], store: st.ResultStore,
                args: argparse.Namespace) -> tuple[dict[st.RunSpec, st.RunResult], dict[st.RunSpec, str]]:
    """Train ``pending``; save each result the moment it arrives. Returns (results, failures)."""
    results: dict[st.RunSpec, st.RunResult] = {}
    failures: dict[st.RunSpec, str] = {}

    def finish(spec: st.RunSpec, outcome: Callable[[], dict[str, Any]]) -> None:
        try:
            result = _result(spec, abl.configs[spec], outcome())
        except Exception as exc:  # one failed run must not cost the others; reported at the end
            failures[spec] = f"{type(exc).__name__}: {exc}"
            log.error("run %s failed: %s", spec.run_id, failures[spec])
            return
        store.save(result)
        results[spec] = result
        log.info("[%d/%d] %s done in %.0f s", len(results) + len(failures), len(pending), spec.run_id,
                 result.seconds)

    if args.launcher == "local":
        for spec in pending:
            finish(spec, lambda spec=spec: execute_run(to_dict(abl.configs[spec]), abl.data_samples,
                                                       args.cpus_per_run))
        return results, failures
    import ray

    _init_ray()
    submit = _submitter(abl, args)
    queue = list(pending)
    in_flight: dict[Any, st.RunSpec] = {}
    limit = args.max_concurrent or len(queue)
    while queue or in_flight:
        while queue and len(in_flight) < limit:
            spec = queue.pop(0)
            in_flight[submit(spec)] = spec
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        for ref in ready:
            finish(in_flight.pop(ref), lambda ref=ref: ray.get(ref))
    return results, failures


# =============================================================================================
# Reports.
# =============================================================================================
def write_reports(abl: Ablation, results: st.Results) -> dict[str, Any]:
    """Tables, JSON and plots for each study of this invocation; returns the combined summary."""
    cfg, out = abl.cfg, abl.out
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "tasks": list(cfg.tasks), "seeds": abl.seeds, "studies": abl.studies,
        "settings": _settings(abl), "runs": {spec.run_id: results[spec].to_dict() for spec in abl.runs if spec in results},
        "missing_runs": [spec.run_id for spec in abl.runs if spec not in results],
    }
    sections = [_header(abl, results)]
    baselines = st.summarize_baselines(results, cfg.tasks, abl.seeds)
    summary["baselines"] = baselines
    means = {t: {m: s["mean"] for m, s in ms.items() if math.isfinite(s["mean"])} for t, ms in baselines.items()}
    (out / "baselines.json").write_text(json.dumps(means, indent=1, sort_keys=True))
    for study in abl.studies:
        if study == "modes":
            data = st.summarize_modes(results, cfg.tasks, abl.seeds, abl.modes)
            text = st.markdown_modes(data)
            st.plot_modes(data, out / "modes.png")
            name = "modes"
        elif study == "pairwise":
            data = st.affinity_table(results, cfg.tasks, abl.seeds, abl.study_mode)
            text = st.markdown_affinity(data)
            st.plot_affinity(data, out / "pairwise.png")
            name = "pairwise"
        else:
            data = st.num_tasks_curve(results, cfg.tasks, abl.seeds, abl.study_mode)
            text = st.markdown_num_tasks(data)
            st.plot_num_tasks(data, out / "num_tasks.png")
            name = "num_tasks"
        summary[name] = data
        (out / f"{name}.json").write_text(json.dumps(st.json_safe(data), indent=1))
        (out / f"{name}.md").write_text(text + "\n")
        sections.append(text)
    (out / "report.md").write_text("\n\n".join(sections) + "\n")
    (out / "results.json").write_text(json.dumps(st.json_safe(summary), indent=1))
    return summary


def _settings(abl: Ablation) -> dict[str, Any]:
    c = abl.cfg
    return {
        "data_train": c.data.train, "data_val": c.data.val, "train_samples": abl.data_samples,
        "image_size": c.data.image_size, "max_steps": c.train.max_steps,
        "global_batch_size": c.train.global_batch_size, "lr": c.optim.lr, "encoder": c.model.encoder,
        "embed_dim": c.model.embed_dim, "eval_batches": c.train.val_batches,
        "study_mode": abl.study_mode, "modes": abl.modes,
    }


def _header(abl: Ablation, results: st.Results) -> str:
    s = _settings(abl)
    seconds = sum(r.seconds for r in results.values() if math.isfinite(r.seconds))
    missing = [spec.run_id for spec in abl.runs if spec not in results]
    lines = [
        f"Ablation on {', '.join(abl.cfg.tasks)}; seeds {', '.join(map(str, abl.seeds))}; "
        f"{s['max_steps']} steps of {s['global_batch_size']} samples at {s['image_size']} px "
        f"({s['train_samples']} training samples, data.train={s['data_train']}); "
        f"{len(abl.runs)} runs, {seconds / 60:.1f} run-minutes in total.",
    ]
    if missing:
        lines.append(f"**Missing runs** (failed or not yet trained; their cells are n/a or averaged over fewer "
                     f"seeds): {', '.join(missing)}.")
    return "\n\n".join(lines)


# =============================================================================================
# Command line.
# =============================================================================================
def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="experiment YAML (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=200")
    parser.add_argument("--study", default="all", choices=[*st.STUDIES, "all"])
    parser.add_argument("--seeds", type=_int_list, default=[0, 1, 2], help="comma-separated seed set (default: 0,1,2)")
    parser.add_argument("--out", required=True, help="output directory (local); reruns resume from it")
    parser.add_argument("--modes", type=_mode_list, default=list(st.MODES),
                        help=f"comma-separated shared-attention modes of the modes study (default: {','.join(st.MODES)})")
    parser.add_argument("--study-mode", default="reference", choices=st.MODES,
                        help="shared-attention mode of the pairwise and num-tasks runs (default: the paper's)")
    parser.add_argument("--launcher", default="task", choices=LAUNCHERS,
                        help="task: one Ray task per run; trainer: one TorchTrainer per run; local: serial, no Ray")
    parser.add_argument("--cpus-per-run", type=float, default=1.0, help="task launcher: CPUs per run")
    parser.add_argument("--gpus-per-run", type=float, default=0.0, help="task launcher: GPUs per run")
    parser.add_argument("--driver-cpus", type=float, default=0.01, help="trainer launcher: CPUs of each run's driver task")
    parser.add_argument("--max-concurrent", type=int, default=None, help="runs in flight at most")
    parser.add_argument("--max-retries", type=int, default=1, help="task launcher: retries of a run whose process died")
    parser.add_argument("--eval-batches", type=int, default=None,
                        help="evaluate each run on this many validation batches (default: all of data.val)")
    parser.add_argument("--smoke-test", action="store_true",
                        help=f"a few steps per run, the first {SMOKE_SEEDS} seeds, generated data if none is configured")
    return parser


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 0,1,2") from None


def _mode_list(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in st.MODES]
    if bad or not modes:
        raise argparse.ArgumentTypeError(f"{text!r}: modes must be among {', '.join(st.MODES)}")
    return modes


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = get_args_parser().parse_args(argv)
    from pipelines.train import PreflightError

    try:
        if len(set(args.seeds)) != len(args.seeds):
            raise st.StudyError(f"--seeds: duplicates in {args.seeds}")
        overrides = list(args.overrides)
        if args.launcher != "trainer":  # one rank per run: check the batch split against that
            overrides.insert(0, "scaling.num_workers=1")
        cfg = load_config(args.config, overrides)
        if args.smoke_test:
            args.seeds = args.seeds[:SMOKE_SEEDS]
            cfg = apply_smoke_test(cfg, Path(args.out).expanduser().resolve())
        abl = prepare_ablation(cfg, args)
    except (ConfigError, PreflightError, st.StudyError, KeyError) as exc:
        log.error("%s", exc.args[0] if isinstance(exc, KeyError) else exc)
        return 2
    store = st.ResultStore(abl.out)
    fingerprints = {spec: st.fingerprint(c) for spec, c in abl.configs.items()}
    done, pending = st.split_finished(abl.runs, store, fingerprints)
    log.info("ablation -> %s: studies %s, %d runs (%d finished, %d to train), launcher %s",
             abl.out, ", ".join(abl.studies), len(abl.runs), len(done), len(pending), args.launcher)
    new, failures = run_pending(abl, pending, store, args)
    write_reports(abl, {**done, **new})
    log.info("report: %s", abl.out / "report.md")
    if failures:
        log.error("%d run(s) failed (rerun the same command to retry them): %s", len(failures),
                  "; ".join(f"{s.run_id}: {e}" for s, e in failures.items()))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
