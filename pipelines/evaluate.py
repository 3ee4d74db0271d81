"""Evaluate a MulT checkpoint on Taskonomy and the domain-transfer sets, with Ray.

    python -m pipelines.evaluate --checkpoint s3://runs/mult/ckpt --out results/ \\
        --data taskonomy=s3://data/taskonomy/test nyu=s3://data/nyu/test \\
        [--finetune nyu=s3://data/nyu/train] [--blur 1 2] [--baselines taskonomy=st.json]

Each set's test shards are split among Ray tasks (one GPU each when the cluster has GPUs); each
returns its MetricSuite state and the driver sums them, which gives exactly the numbers of one
process over all the data. Writes ``results.json``, ``report.md`` and prediction grids
(``grids/{set}_{task}.png``) under ``--out``. The same command runs under ``ray job submit``.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from mult.evaluation import (
    ALIGNMENT,
    SET_NAMES,
    EvalOutput,
    EvaluationError,
    check_set_name,
    compute_metrics,
    evaluate_part,
    finetune,
    merge_grids,
    select_tasks,
    sum_states,
)
from mult.report import Baselines, attach_baselines, load_baselines, write_report
from mult.viz import write_grids

log = logging.getLogger("pipelines.evaluate")


@dataclass
class SetRun:
    """One row group of the report: a test set, possibly fine-tuned first or blurred."""

    label: str
    name: str
    url: str
    blur_sigma: float | None = None
    finetune_url: str | None = None


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint directory or file, local or s3://")
    p.add_argument("--data", nargs="+", required=True, metavar="NAME=URL",
                   help=f"test shards per set; NAME in {', '.join(SET_NAMES)}")
    p.add_argument("--out", required=True, help="local output directory")
    p.add_argument("--baselines", nargs="+", default=[], metavar="[NAME=]PATH",
                   help="single-task baselines, JSON {task: {metric: value}}, per set (no NAME: taskonomy)")
    p.add_argument("--finetune", nargs="+", default=[], metavar="NAME=URL",
                   help="fine-tune on these train shards, then evaluate NAME again (reported as NAME+ft)")
    p.add_argument("--finetune-steps", type=int, default=500)
    p.add_argument("--finetune-lr", type=float, default=5e-5)
    p.add_argument("--blur", nargs="+", type=float, default=[], metavar="SIGMA",
                   help="also evaluate Taskonomy test under Gaussian blur of these sigmas (pixels)")
    p.add_argument("--num-workers", type=int, default=2, help="Ray tasks per set")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grid-samples", type=int, default=4,
                   help="samples per set in the prediction grids (those with the smallest keys)")
    p.add_argument("--max-batches", type=int, default=None, help="cut each worker's pass short (smoke tests)")
    p.add_argument("--no-ray", action="store_true", help="evaluate in this process, without Ray")
    p.add_argument("--smoke-test", action="store_true",
                   help="2 batches per worker, 2 fine-tuning steps, 2 grid samples")
    return p


def parse_pairs(items: Sequence[str], flag: str, default_name: str | None = None) -> list[tuple[str, str]]:
    """``["nyu=s3://x"]`` -> ``[("nyu", "s3://x")]``; names are checked against the sets."""
    pairs, seen = [], set()
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            if default_name is None:
                raise EvaluationError(
                    f"{flag} {item!r}: expected NAME=URL with NAME in {', '.join(SET_NAMES)}"
                )
            name, value = default_name, item
        if not value:
            raise EvaluationError(f"{flag} {item!r}: empty URL after '='")
        check_set_name(name)
        if name in seen:
            raise EvaluationError(f"{flag}: set {name!r} given twice")
        seen.add(name)
        pairs.append((name, value))
    return pairs


def plan_runs(args: argparse.Namespace) -> list[SetRun]:
    data = dict(parse_pairs(args.data, "--data"))
    runs = [SetRun(name, name, url) for name, url in data.items()]
    for name, url in parse_pairs(args.finetune, "--finetune"):
        if name not in data:
            raise EvaluationError(f"--finetune {name}=...: give its test shards with --data {name}=URL too")
        runs.append(SetRun(f"{name}+ft", name, data[name], finetune_url=url))
    for sigma in args.blur:
        if "taskonomy" not in data:
            raise EvaluationError("--blur corrupts Taskonomy test images: give --data taskonomy=URL")
        if not sigma > 0:
            raise EvaluationError(f"--blur: sigma must be > 0, got {sigma}")
        runs.append(SetRun(f"taskonomy+blur{sigma:g}", "taskonomy", data["taskonomy"], blur_sigma=sigma))
    return runs


@dataclass
class SetInfo:
    format: str
    tasks: list[str]
    num_shards: int
    num_samples: int | None


def read_set_info(name: str, url: str, flag: str = "--data") -> SetInfo:
    """Read and check a set's shard manifest; raise a clear error for a bad URL or format."""
    from mult.data.loader import read_manifest

    try:
        manifest = read_manifest(url)
    except Exception as exc:  # storage errors vary (missing dir, S3 NoSuchKey, bad JSON)
        hint = "" if "pipelines.shard" in str(exc) else "; point it at the output of `python -m pipelines.shard`"
        raise EvaluationError(
            f"{flag} {name}={url}: cannot read a shard manifest there ({type(exc).__name__}: {exc}){hint}"
        ) from exc
    info = manifest_info(manifest)
    if info.format != name:
        raise EvaluationError(
            f"{flag} {name}={url}: these shards are in the {info.format!r} format, not {name!r}"
        )
    if info.num_shards < 1:
        raise EvaluationError(f"{flag} {name}={url}: the manifest lists no shards")
    return info


def manifest_info(manifest: Any) -> SetInfo:
    get = manifest.get if isinstance(manifest, dict) else lambda k, d=None: getattr(manifest, k, d)
    shards = get("shards", []) or []
    samples = get("num_samples", None)
    if samples is None and shards and isinstance(shards[0], dict):
        samples = sum(int(s.get("samples", s.get("num_samples", 0))) for s in shards)
    return SetInfo(str(get("format", "?")), list(get("tasks", []) or []), len(shards), samples)


# --------------------------------------------------------------------------------------------
# One evaluation part: in this process or as a Ray task.
# --------------------------------------------------------------------------------------------
def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def run_part(
    model: torch.nn.Module, url: str, tasks: list[str], opts: dict[str, Any], rank: int, world_size: int, label: str
) -> EvalOutput:
    """Evaluate rank ``rank``'s share, with a progress bar; a Ray task body, also run in-process."""
    try:
        import ray

        in_ray = ray.is_initialized() and ray.get_runtime_context().get_task_id() is not None
    except ImportError:
        in_ray = False
    if in_ray:
        from ray.experimental.tqdm_ray import tqdm
    else:
        from tqdm import tqdm
    bars = []

    def make_progress(total: int):
        bars.append(tqdm(desc=f"{label} [{rank + 1}/{world_size}]", total=total, unit="img"))
        return bars[-1].update

    try:
        return evaluate_part(
            model, url, tasks, image_size=opts["image_size"], batch_size=opts["batch_size"], rank=rank,
            world_size=world_size, make_progress=make_progress, device=_device(),
            blur_sigma=opts.get("blur_sigma"), grid_samples=opts["grid_samples"],
            max_batches=opts.get("max_batches"),
        )
    finally:
        for bar in bars:
            bar.close()


def run_finetune(model: torch.nn.Module, url: str, tasks: list[str], opts: dict[str, Any]) -> torch.nn.Module:
    """Fine-tune a copy of ``model`` on ``url``'s shards (the loader's train mode: shuffled,
    flipped, exactly ``steps`` batches); returns it on the CPU."""
    from mult.data.loader import make_loader

    model = copy.deepcopy(model)

    def batches():
        return make_loader(
            url, tasks=tasks, image_size=opts["image_size"], batch_size=opts["batch_size"], mode="train",
            steps_per_epoch=opts["steps"], hflip=True, num_workers=0,
        )

    finetune(model, batches, tasks, steps=opts["steps"], lr=opts["lr"], device=_device())
    return model.cpu()


class Runner:
    """Runs parts and fine-tuning either in this process or as Ray tasks."""

    def __init__(self, use_ray: bool, cpus_per_worker: float) -> None:
        self.use_ray = use_ray
        if not use_ray:
            return
        import ray

        from pipelines.raysetup import init_ray

        init_ray()
        gpus = ray.cluster_resources().get("GPU", 0)
        self.options = {"num_cpus": cpus_per_worker, "num_gpus": 1 if gpus >= 1 else 0}
        log.info("Ray: %s; each part gets %s", ray.cluster_resources(), self.options)
        self._part = ray.remote(run_part).options(**self.options)
        self._finetune = ray.remote(run_finetune).options(**self.options)

    def parts(
        self, model: torch.nn.Module, url: str, tasks: list[str], opts: dict[str, Any], world_size: int, label: str
    ) -> list[EvalOutput]:
        """One part per rank; Ray tasks run them in parallel, each returning its state."""
        if not self.use_ray:
            return [run_part(model, url, tasks, opts, r, world_size, label) for r in range(world_size)]
        import ray

        ref = ray.put(model)
        refs = [self._part.remote(ref, url, tasks, opts, r, world_size, label) for r in range(world_size)]
        return ray.get(refs)

    def finetune(
        self, model: torch.nn.Module, url: str, tasks: list[str], opts: dict[str, Any]
    ) -> torch.nn.Module:
        if not self.use_ray:
            return run_finetune(model, url, tasks, opts)
        import ray

        return ray.get(self._finetune.remote(ray.put(model), url, tasks, opts))


# --------------------------------------------------------------------------------------------
# The stage.
# --------------------------------------------------------------------------------------------
def evaluate_sets(
    model: torch.nn.Module,
    model_tasks: Sequence[str],
    image_size: int,
    runs: Sequence[SetRun],
    out_dir: str | Path,
    *,
    runner: Runner,
    infos: dict[str, SetInfo],
    num_workers: int = 2,
    batch_size: int = 8,
    grid_samples: int = 4,
    max_batches: int | None = None,
    finetune_steps: int = 500,
    finetune_lr: float = 5e-5,
) -> list[dict[str, Any]]:
    """Evaluate every run; write its grids; return the ``sets`` entries of the results."""
    entries = []
    for run in runs:
        info = infos[run.name]
        tasks, skipped = select_tasks(model_tasks, info.tasks, run.name)
        entry: dict[str, Any] = {
            "label": run.label, "name": run.name, "url": run.url, "format": info.format,
            "num_samples": 0, "tasks": tasks, "skipped": skipped, "metrics": {},
            "alignment": ALIGNMENT[run.name], "finetune": None, "corruption": None,
        }
        if run.blur_sigma:
            entry["corruption"] = {"type": "gaussian_blur", "sigma": run.blur_sigma}
        if not tasks:
            log.warning("%s: nothing to evaluate (%s)", run.label, skipped)
            entries.append(entry)
            continue
        net = model
        if run.finetune_url:
            ft_info = read_set_info(run.name, run.finetune_url, "--finetune")
            ft_tasks = [t for t in tasks if t in ft_info.tasks]
            if not ft_tasks:
                raise EvaluationError(
                    f"--finetune {run.name}={run.finetune_url}: its shards carry none of {tasks}"
                )
            ft = {"image_size": image_size, "batch_size": batch_size, "steps": finetune_steps, "lr": finetune_lr}
            net = runner.finetune(model, run.finetune_url, ft_tasks, ft)
            entry["finetune"] = {"url": run.finetune_url, "steps": finetune_steps, "lr": finetune_lr,
                                 "tasks": ft_tasks}
        # The loader's eval mode splits by shard, or by sample when shards are fewer than ranks.
        world_size = max(1, min(num_workers, info.num_samples or 1))
        opts = {"image_size": image_size, "batch_size": batch_size, "grid_samples": grid_samples,
                "max_batches": max_batches, "blur_sigma": run.blur_sigma}
        outputs = runner.parts(net, run.url, tasks, opts, world_size, run.label)
        entry["num_samples"] = sum(o.num_samples for o in outputs)
        entry["bad_samples"] = sum(o.bad_samples for o in outputs)
        entry["workers"] = world_size
        entry["metrics"] = compute_metrics(tasks, sum_states([o.state for o in outputs]), run.name)
        grid = merge_grids((o.grid for o in outputs), grid_samples)
        entry["grid_keys"] = [g.key for g in grid]
        if grid:
            entry["grids"] = [str(p) for p in write_grids(Path(out_dir) / "grids", run.label, grid, tasks)]
        log.info("%s: %d samples, %s", run.label, entry["num_samples"], entry["metrics"])
        entries.append(entry)
    return entries


def _load_baselines(items: Sequence[str]) -> dict[str, Baselines]:
    pairs = parse_pairs(items, "--baselines", default_name="taskonomy")
    return {name: load_baselines(path) for name, path in pairs}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.smoke_test:
        args.max_batches, args.finetune_steps, args.grid_samples = 2, 2, min(args.grid_samples, 2)
    for flag in ("num_workers", "batch_size", "finetune_steps"):
        if getattr(args, flag) < 1:
            raise EvaluationError(f"--{flag.replace('_', '-')}: must be >= 1, got {getattr(args, flag)}")
    if args.grid_samples < 0:
        raise EvaluationError(f"--grid-samples: must be >= 0, got {args.grid_samples}")
    runs = plan_runs(args)
    baselines = _load_baselines(args.baselines)
    infos = {run.name: read_set_info(run.name, run.url) for run in runs}

    from mult.checkpoint import load_model

    model, cfg = load_model(args.checkpoint, map_location="cpu")
    model.eval()
    runner = Runner(not args.no_ray, args.cpus_per_worker)
    entries = evaluate_sets(
        model, cfg.tasks, cfg.model.img_size, runs, args.out, runner=runner, infos=infos,
        num_workers=args.num_workers, batch_size=args.batch_size, grid_samples=args.grid_samples,
        max_batches=args.max_batches, finetune_steps=args.finetune_steps, finetune_lr=args.finetune_lr,
    )
    results = build_results(args.checkpoint, cfg.tasks, entries)
    results["partial"] = args.max_batches is not None
    attach_baselines(results, baselines)
    json_path, md_path = write_report(results, args.out)
    log.info("wrote %s and %s", json_path, md_path)
    return results


def build_results(checkpoint: str, model_tasks: Sequence[str], entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The results document; the NYU label table is included when NYU segmentation was scored."""
    results: dict[str, Any] = {
        "checkpoint": checkpoint, "model_tasks": list(model_tasks), "sets": entries, "label_map": None
    }
    if any(e["name"] == "nyu" and "segment_semantic" in e["tasks"] for e in entries):
        from mult.data.label_maps import mapping_markdown

        results["label_map"] = mapping_markdown()
    return results


if __name__ == "__main__":
    from mult.checkpoint import CheckpointError
    from mult.report import ReportError

    try:
        main()
    except (EvaluationError, ReportError, CheckpointError) as exc:
        sys.exit(f"error: {exc}")
