"""Evaluate a MulT checkpoint on Taskonomy and the domain-transfer sets, with Ray.

    python -m pipelines.evaluate --checkpoint s3://runs/mult/ckpt --out results/ \\
        --data taskonomy=s3://data/taskonomy/test nyu=s3://data/nyu/test \\
        [--finetune nyu=s3://data/nyu/train] [--blur 1 2] [--baselines taskonomy=st.json]

Each set's test shards are split among Ray tasks (one GPU each when the cluster has GPUs); each
returns its metric state and the driver sums them, which gives exactly the numbers of one
process over all the data (:mod:`mult.experiments.transfer`, :mod:`mult.launch.transfer`).
Writes ``results.json``, ``report.md`` and prediction grids (``grids/{set}_{task}.png``) under
``--out``. The same command runs under ``ray job submit``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Sequence

from mult.data.datasets import DATASET_NAMES, TRAINING_SET
from mult.experiments import transfer as tr
from mult.experiments.transfer_report import attach_baselines, write_report
from mult.training.plan import load_baselines

log = logging.getLogger("pipelines.evaluate")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint directory or file, local or s3://")
    p.add_argument("--data", nargs="+", required=True, metavar="NAME=URL",
                   help=f"test shards per set; NAME in {', '.join(DATASET_NAMES)}")
    p.add_argument("--out", required=True, help="local output directory")
    p.add_argument("--baselines", nargs="+", default=[], metavar="[NAME=]PATH",
                   help=f"single-task baselines, JSON {{task: {{metric: value}}}}, per set (no NAME: {TRAINING_SET})")
    p.add_argument("--finetune", nargs="+", default=[], metavar="NAME=URL",
                   help="fine-tune on these train shards, then evaluate NAME again (reported as NAME+ft)")
    p.add_argument("--finetune-steps", type=int, default=500)
    p.add_argument("--finetune-lr", type=float, default=5e-5)
    p.add_argument("--blur", nargs="+", type=float, default=[], metavar="SIGMA",
                   help=f"also evaluate {TRAINING_SET} test under Gaussian blur of these sigmas (pixels)")
    p.add_argument("--num-workers", type=int, default=2, help="Ray tasks per set")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grid-samples", type=int, default=4,
                   help="samples per set in the prediction grids (those with the smallest keys)")
    p.add_argument("--max-batches", type=int, default=None, help="cut each worker's pass short (smoke tests)")
    p.add_argument("--floor-samples", type=int, default=256,
                   help="training samples the constant-predictor row is fitted on (0: no such row)")
    p.add_argument("--no-ray", action="store_true", help="evaluate in this process, without Ray")
    p.add_argument("--smoke-test", action="store_true",
                   help="2 batches per worker, 2 fine-tuning steps, 2 grid samples")
    return p


def _baselines(items: Sequence[str]) -> dict[str, dict[str, dict[str, float]]]:
    out = {}
    for name, path in tr.parse_pairs(items, "--baselines", default_name=TRAINING_SET):
        try:
            out[name] = load_baselines(path)
        except (OSError, ValueError) as exc:
            raise tr.EvaluationError(f"--baselines {name}={path}: {exc}") from exc
    return out


def _with_floor(entries, cfg, runs, args, common) -> list[dict[str, Any]]:
    """Each set's row followed by the constant predictor's, fitted on the checkpoint's training
    shards (``data.train`` of its config); without them, no such rows and a warning."""
    from mult.experiments.constant import LABEL, constant_for

    try:
        floor = constant_for(cfg, max_samples=args.floor_samples)
    except Exception as exc:  # shards moved or unreachable: the model's rows still stand
        log.warning("no %s rows: cannot fit it on the training shards %s (%s)", LABEL, cfg.data.train, exc)
        return entries
    return tr.with_floor(entries, floor, cfg.tasks, runs, args.out, LABEL, **common)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.smoke_test:
        args.max_batches, args.finetune_steps, args.grid_samples = 2, 2, min(args.grid_samples, 2)
    for flag in ("num_workers", "batch_size", "finetune_steps"):
        if getattr(args, flag) < 1:
            raise tr.EvaluationError(f"--{flag.replace('_', '-')}: must be >= 1, got {getattr(args, flag)}")
    if args.floor_samples < 0:
        raise tr.EvaluationError(f"--floor-samples: must be >= 0, got {args.floor_samples}")
    if args.grid_samples < 0:
        raise tr.EvaluationError(f"--grid-samples: must be >= 0, got {args.grid_samples}")
    runs = tr.plan_sets(args.data, args.finetune, args.blur)
    baselines = _baselines(args.baselines)
    infos = {run.name: tr.read_set_info(run.name, run.url) for run in runs}

    from mult.training.checkpoint import load_model

    model, cfg = load_model(args.checkpoint, map_location="cpu")
    if args.no_ray:
        runner = tr.LocalRunner()
    else:
        from mult.launch.transfer import RayRunner

        runner = RayRunner(args.cpus_per_worker)
    common = dict(runner=runner, infos=infos, image_size=cfg.model.img_size, precision=cfg.train.precision,
                  normalize=cfg.loss.normalize, num_workers=args.num_workers, batch_size=args.batch_size,
                  max_batches=args.max_batches)
    entries = tr.evaluate_sets(model, cfg.tasks, runs, args.out, grid_samples=args.grid_samples,
                               finetune_steps=args.finetune_steps, finetune_lr=args.finetune_lr, **common)
    if args.floor_samples > 0:
        entries = _with_floor(entries, cfg, runs, args, common)
    results = tr.build_results(args.checkpoint, cfg.tasks, entries)
    results["partial"] = args.max_batches is not None
    attach_baselines(results, baselines)
    json_path, md_path = write_report(results, args.out)
    log.info("wrote %s and %s", json_path, md_path)
    return results


if __name__ == "__main__":
    from mult.training.checkpoint import CheckpointError

    try:
        main()
    except (tr.EvaluationError, CheckpointError) as exc:
        sys.exit(f"error: {exc}")
