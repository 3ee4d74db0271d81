"""The ablation stage: single-task baselines, then MulT per shared-attention mode, per task pair
and per number of tasks, over several seeds; Delta-m tables, a task-affinity table, plots.

    python -m pipelines.ablate --config configs/cpu-small.yaml --study all --seeds 0,1,2 \\
        --out runs/ablation data.train=URL data.val=URL [key=value ...]
    python -m pipelines.ablate --config configs/cpu-small.yaml --smoke-test --out /tmp/abl tasks=[normal,depth_zbuffer]

What each study trains and reports: :mod:`mult.experiments.ablation`; how runs execute
(``--launcher task|trainer|local``): :mod:`mult.launch.ablation`. All runs of one invocation
share the data, the steps and the seed set: they differ only in their tasks, shared-attention
mode and seed; the global batch is the same under every launcher. Each run is evaluated once,
after its last step, on ``data.val``. Reruns into the same ``--out`` skip finished runs.

**Outputs** in ``--out``: ``runs/*.json``; per study ``{study}.md``, ``{study}.json``,
``{study}.png``; ``baselines.json`` (mean single-task metrics, the format ``train.baselines``
reads); ``report.md`` and ``results.json`` with everything of this invocation.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from mult.config import ConfigError, add_config_arguments, load_config
from mult.experiments import ablation as ab
from mult.experiments.ablation_report import write_reports
from mult.launch.ablation import LAUNCHERS, run_pending
from mult.training.plan import PreflightError

log = logging.getLogger("mult.ablate")

SMOKE_SEEDS = 2


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, "train.max_steps=200")
    parser.add_argument("--study", default="all", choices=[*ab.STUDIES, "all"])
    parser.add_argument("--seeds", type=_int_list, default=[0, 1, 2], help="comma-separated seed set (default: 0,1,2)")
    parser.add_argument("--out", required=True, help="output directory (local); reruns resume from it")
    parser.add_argument("--modes", type=_mode_list, default=list(ab.MODES),
                        help=f"comma-separated shared-attention modes of the modes study (default: {','.join(ab.MODES)})")
    parser.add_argument("--study-mode", default="reference", choices=ab.MODES,
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
    bad = [m for m in modes if m not in ab.MODES]
    if bad or not modes:
        raise argparse.ArgumentTypeError(f"{text!r}: modes must be among {', '.join(ab.MODES)}")
    return modes


def _floor(abl):
    """The constant predictor's validation metrics for the modes table; None (and a warning)
    when it cannot be fitted or scored."""
    if "modes" not in abl.studies:
        return None
    from mult.experiments.constant import constant_val_metrics

    try:
        return constant_val_metrics(abl.cfg)
    except Exception as exc:  # the trained runs' tables still stand
        log.warning("no constant-predictor row: %s", exc)
        return None


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = get_args_parser().parse_args(argv)
    one_rank = args.launcher != "trainer"
    try:
        if args.cpus_per_run <= 0 or args.gpus_per_run < 0:
            raise ConfigError(f"--cpus-per-run must be > 0 and --gpus-per-run >= 0, got {args.cpus_per_run}, "
                              f"{args.gpus_per_run}")
        if args.max_concurrent is not None and args.max_concurrent < 1:
            raise ConfigError(f"--max-concurrent must be >= 1, got {args.max_concurrent}")
        if len(set(args.seeds)) != len(args.seeds):
            raise ab.StudyError(f"--seeds: duplicates in {args.seeds}")
        # one rank per run: check the batch split against that
        cfg = load_config(args.config, (["scaling.num_workers=1"] if one_rank else []) + list(args.overrides))
        if args.smoke_test:
            args.seeds = args.seeds[:SMOKE_SEEDS]
            cfg = ab.ablation_smoke_config(cfg, Path(args.out).expanduser().resolve())
        abl = ab.prepare_ablation(cfg, out=args.out, studies=ab.parse_studies(args.study), seeds=args.seeds,
                                  modes=args.modes, study_mode=args.study_mode, eval_batches=args.eval_batches,
                                  one_rank=one_rank, driver_cpus=args.driver_cpus, gpus=args.gpus_per_run > 0)
    except (ConfigError, PreflightError, ab.StudyError, KeyError) as exc:
        log.error("%s", exc.args[0] if isinstance(exc, KeyError) else exc)
        return 2
    store = ab.ResultStore(abl.out)
    fingerprints = {spec: ab.fingerprint(c) for spec, c in abl.configs.items()}
    done, pending = ab.split_finished(abl.runs, store, fingerprints)
    log.info("ablation -> %s: studies %s, %d runs (%d finished, %d to train), launcher %s",
             abl.out, ", ".join(abl.studies), len(abl.runs), len(done), len(pending), args.launcher)
    new, failures = run_pending(abl, pending, store, launcher=args.launcher, cpus=args.cpus_per_run,
                                gpus=args.gpus_per_run, driver_cpus=args.driver_cpus, max_retries=args.max_retries,
                                max_concurrent=args.max_concurrent)
    write_reports(abl, {**done, **new}, constant=_floor(abl))
    log.info("report: %s", abl.out / "report.md")
    if failures:
        log.error("%d run(s) failed (rerun the same command to retry them): %s", len(failures),
                  "; ".join(f"{s.run_id}: {e}" for s, e in failures.items()))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
