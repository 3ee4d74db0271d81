"""Evaluation on a test set and domain transfer: which sets and tasks, one pass per shard share,
the exact reduce, fine-tuning first, blur corruption.

* :func:`plan_sets` turns ``--data``, ``--finetune`` and ``--blur`` into :class:`SetRun` rows;
  :func:`read_set_info` checks each set's manifest against the dataset table.
* :func:`select_tasks`: a set is evaluated on (model tasks) ∩ (set tasks); the others are
  skipped with the reason.
* :func:`evaluate_part` runs the one evaluation loop (:func:`mult.training.step.evaluate`)
  over one rank's share of a set's shards and returns its metric state; :func:`sum_states`
  and :func:`compute_metrics` reduce the parts exactly (MetricSuite states are sums).
* :func:`finetune`: a few optimizer steps on a target's train split, through the training
  step and the loss combiner.
* :func:`evaluate_sets` runs every row through a :class:`Runner` (in this process, or Ray tasks:
  :class:`mult.launch.transfer.RayRunner`) and writes the prediction grids.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, Sequence

import torch
import torch.nn.functional as F

from mult.data.datasets import DATASET_NAMES, TRAINING_SET, get_dataset
from mult.tasks import TASK_NAMES, get_task
from mult.experiments.viz import GridSample, write_grids

log = logging.getLogger(__name__)


class EvaluationError(ValueError):
    """Bad evaluation input (set name, URL, tasks); the message says what is allowed."""


# --------------------------------------------------------------------------------------------
# What to evaluate.
# --------------------------------------------------------------------------------------------
@dataclass
class SetRun:
    """One row group of the report: a test set, possibly fine-tuned first or blurred."""

    label: str
    name: str
    url: str
    blur_sigma: float | None = None
    finetune_url: str | None = None


def check_set_name(name: str) -> None:
    if name not in DATASET_NAMES:
        raise EvaluationError(f"unknown evaluation set {name!r}; valid sets: {', '.join(DATASET_NAMES)}")


def parse_pairs(items: Sequence[str], flag: str, default_name: str | None = None) -> list[tuple[str, str]]:
    """``["nyu=s3://x"]`` -> ``[("nyu", "s3://x")]``; names are checked against the dataset table."""
    pairs, seen = [], set()
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            if default_name is None:
                raise EvaluationError(f"{flag} {item!r}: expected NAME=URL with NAME in {', '.join(DATASET_NAMES)}")
            name, value = default_name, item
        if not value:
            raise EvaluationError(f"{flag} {item!r}: empty URL after '='")
        check_set_name(name)
        if name in seen:
            raise EvaluationError(f"{flag}: set {name!r} given twice")
        seen.add(name)
        pairs.append((name, value))
    return pairs


def plan_sets(data: Sequence[str], finetune: Sequence[str] = (), blur: Sequence[float] = ()) -> list[SetRun]:
    """Rows for ``--data NAME=URL ...``, ``--finetune NAME=URL ...`` (row ``NAME+ft``) and
    ``--blur SIGMA ...`` (rows ``taskonomy+blurσ`` on the training set's test shards)."""
    sets = dict(parse_pairs(data, "--data"))
    runs = [SetRun(name, name, url) for name, url in sets.items()]
    for name, url in parse_pairs(finetune, "--finetune"):
        if name not in sets:
            raise EvaluationError(f"--finetune {name}=...: give its test shards with --data {name}=URL too")
        runs.append(SetRun(f"{name}+ft", name, sets[name], finetune_url=url))
    for sigma in blur:
        if TRAINING_SET not in sets:
            raise EvaluationError(f"--blur corrupts {TRAINING_SET} test images: give --data {TRAINING_SET}=URL")
        if not (sigma > 0 and math.isfinite(sigma)):
            raise EvaluationError(f"--blur: sigma must be a finite number > 0, got {sigma}")
        runs.append(SetRun(f"{TRAINING_SET}+blur{sigma:g}", TRAINING_SET, sets[TRAINING_SET], blur_sigma=sigma))
    return runs


@dataclass
class SetInfo:
    format: str
    tasks: list[str]
    num_shards: int
    num_samples: int


def read_set_info(name: str, url: str, flag: str = "--data") -> SetInfo:
    """Read and check a set's shard manifest; raise a clear error for a bad URL or format."""
    from mult.data.samples import read_manifest

    try:
        manifest = read_manifest(url)
    except Exception as exc:  # storage errors vary (missing dir, S3 NoSuchKey, bad JSON)
        hint = "" if "pipelines.shard" in str(exc) else "; point it at the output of `python -m pipelines.shard`"
        raise EvaluationError(
            f"{flag} {name}={url}: cannot read a shard manifest there ({type(exc).__name__}: {exc}){hint}"
        ) from exc
    info = SetInfo(manifest["format"], list(manifest["tasks"]), len(manifest["shards"]), int(manifest["num_samples"]))
    if info.format != name:
        raise EvaluationError(f"{flag} {name}={url}: these shards are in the {info.format!r} format, not {name!r}")
    if info.num_shards < 1:
        raise EvaluationError(f"{flag} {name}={url}: the manifest lists no shards")
    return info


def select_tasks(model_tasks: Sequence[str], set_tasks: Sequence[str], set_name: str) -> tuple[list[str], dict[str, str]]:
    """(tasks to evaluate in table order, {skipped task: reason})."""
    tasks, skipped = [], {}
    for task in TASK_NAMES:
        in_model, in_set = task in model_tasks, task in set_tasks
        if in_model and in_set:
            tasks.append(task)
        elif in_model:
            skipped[task] = f"the {set_name} shards carry no {task} labels"
        elif in_set:
            skipped[task] = "the checkpoint was not trained on it"
    return tasks, skipped


# --------------------------------------------------------------------------------------------
# One pass.
# --------------------------------------------------------------------------------------------
def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``[B, C, H, W]`` with reflect padding, radius ``ceil(3σ)``.

    Blur commutes with the per-channel affine ImageNet normalisation (the kernel sums to 1),
    so blurring the normalised input equals normalising the blurred image.
    """
    if not sigma > 0 or not math.isfinite(sigma):
        raise EvaluationError(f"blur sigma must be a finite number > 0, got {sigma}")
    _, c, h, w = images.shape
    radius = min(max(1, math.ceil(3.0 * sigma)), h - 1, w - 1)
    if radius < 1:
        return images
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-(x**2) / (2.0 * sigma**2))
    kernel = (kernel / kernel.sum()).to(images.dtype).to(images.device)
    out = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return F.conv2d(out, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)


class GridKeeper:
    """Keeps the ``n`` samples with the smallest keys seen (for prediction grids), so the same
    samples are drawn however the data was split among workers."""

    def __init__(self, n: int, tasks: Sequence[str]) -> None:
        self.n, self.tasks, self.kept = n, list(tasks), []

    def __call__(self, batch: Mapping[str, Any], preds: Mapping[str, torch.Tensor]) -> None:
        if not self.n:
            return
        for i, key in enumerate(map(str, batch["key"])):
            if len(self.kept) < self.n or key < self.kept[-1].key:
                self.kept.append(GridSample(
                    key=key, rgb=batch["rgb"][i].cpu().float().numpy(),
                    preds={t: preds[t][i].cpu().float().numpy() for t in self.tasks},
                    targets={t: batch["targets"][t][i].cpu().numpy() for t in self.tasks},
                    valid={t: batch["valid"][t][i].cpu().numpy().astype(bool) for t in self.tasks},
                ))
                self.kept.sort(key=lambda s: s.key)
                del self.kept[self.n:]


def merge_grids(parts: Iterable[Sequence[GridSample]], n: int) -> list[GridSample]:
    """The ``n`` samples with the smallest keys across parts."""
    return sorted((s for part in parts for s in part), key=lambda s: s.key)[:n]


@dataclass
class EvalOutput:
    """One evaluation pass: the suite's flat ``float64`` state, the samples seen, the samples
    kept for grids, and the samples the loader skipped as undecodable."""

    state: torch.Tensor
    num_samples: int
    grid: list[GridSample] = field(default_factory=list)
    bad_samples: int = 0


def evaluate_batches(model: torch.nn.Module, batches: Iterable[Mapping[str, Any]], tasks: Sequence[str], *,
                     device: torch.device | str = "cpu", precision: str = "fp32", normalize: str = "valid",
                     blur_sigma: float | None = None, grid_samples: int = 0, max_batches: int | None = None,
                     tick: Callable[[int], None] | None = None) -> EvalOutput:
    """The one evaluation loop (:func:`mult.training.step.evaluate`) over loader-shaped batches,
    into a fresh metric suite, keeping ``grid_samples`` samples for grids; ``tick(n)`` is called
    with each batch's size. ``max_batches`` is for smoke tests: a cut-off pass is not the split."""
    from mult.metrics import MetricSuite
    from mult.training.step import evaluate

    keeper = GridKeeper(grid_samples, tasks)

    def on_batch(batch: Mapping[str, Any], preds: Mapping[str, torch.Tensor]) -> None:
        keeper(batch, preds)
        if tick is not None:
            tick(len(batch["key"]))

    suite = MetricSuite(tasks)
    device = torch.device(device)
    counts = evaluate(model.to(device), batches, suite, tasks=list(tasks), device=device, precision=precision,
                      normalize=normalize, max_batches=max_batches, on_batch=on_batch,
                      transform=(lambda x: gaussian_blur(x, blur_sigma)) if blur_sigma else None)
    return EvalOutput(suite.state(), counts.samples, keeper.kept, counts.bad_samples)


def evaluate_part(model: torch.nn.Module, url: str, tasks: Sequence[str], *, image_size: int, batch_size: int,
                  rank: int = 0, world_size: int = 1,
                  progress: Callable[[int], Callable[[int], None]] | None = None, **kwargs: Any) -> EvalOutput:
    """Evaluate rank ``rank``'s share of the shards at ``url`` (the loader's eval mode gives every
    sample to exactly one rank). ``progress(total)`` returns the per-batch callback given this
    rank's sample count; ``kwargs`` go to :func:`evaluate_batches`."""
    from mult.data.loader import make_loader

    loader = make_loader(url, tasks=list(tasks), image_size=image_size, batch_size=batch_size, mode="eval",
                         rank=rank, world_size=world_size)
    tick = progress(loader.num_samples) if progress is not None else None
    return evaluate_batches(model, loader, tasks, tick=tick, **kwargs)


def sum_states(states: Sequence[torch.Tensor]) -> torch.Tensor:
    """The exact reduce: sum per-worker MetricSuite states in float64."""
    if not states:
        raise EvaluationError("no worker states to reduce")
    tensors = [torch.as_tensor(s, dtype=torch.float64) for s in states]
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1:
        raise EvaluationError(f"worker states differ in shape {sorted(shapes)}: different task lists?")
    return torch.stack(tensors).sum(dim=0)


def compute_metrics(tasks: Sequence[str], state: torch.Tensor, set_name: str) -> dict[str, dict[str, float]]:
    """Load a (summed) state into a fresh suite and compute ``{task: {metric: value}}``. On a set
    whose depth has no metric unit, metrics that depend on absolute scale are left out."""
    from mult.metrics import MetricSuite

    suite = MetricSuite(list(tasks))
    suite.load_state(state)
    metric_depth = get_dataset(set_name).metric_depth
    return {t: {k: float(v) for k, v in m.items() if metric_depth or not get_task(t).metric(k).absolute_scale}
            for t, m in suite.compute().items()}


def finetune(model: torch.nn.Module, make_batches: Callable[[], Iterable[Mapping[str, Any]]], tasks: Sequence[str],
             *, steps: int, lr: float = 5e-5, weight_decay: float = 0.05, loss_weights: Mapping[str, float] | None = None,
             grad_clip: float | None = 1.0, device: torch.device | str = "cpu", precision: str = "fp32",
             normalize: str = "valid") -> list[float]:
    """Fine-tune ``model`` in place for ``steps`` AdamW steps on the batches of ``make_batches()``
    (called again when an epoch runs out): the training step (:func:`~mult.training.step.train_step`)
    with the tasks' losses weighted by the loss combiner. Returns the total loss of each step."""
    from mult.config import OptimConfig
    from mult.training.optim import build_optimizer
    from mult.training.step import train_step
    from mult.weighting import LossCombiner

    if steps < 1:
        raise EvaluationError(f"fine-tuning steps must be >= 1, got {steps}")
    device = torch.device(device)
    model.to(device)
    combiner = LossCombiner(list(tasks), {t: w for t, w in (loss_weights or {}).items() if t in tasks}).to(device)
    optimizer = build_optimizer(model, OptimConfig(lr=lr, weight_decay=weight_decay))
    batches = _cycle(make_batches)
    history = [train_step(model, combiner, optimizer, None, batches, tasks=list(tasks), accumulation=1,
                          grad_clip=grad_clip, device=device, precision=precision, normalize=normalize).loss
               for _ in range(steps)]
    model.eval()
    log.info("fine-tuned %d steps: loss %.4f -> %.4f", steps, history[0], history[-1])
    return history


def _cycle(make_batches: Callable[[], Iterable[Mapping[str, Any]]]) -> Iterator[Mapping[str, Any]]:
    for _ in itertools.count():
        empty = True
        for batch in make_batches():
            empty = False
            yield batch
        if empty:
            raise EvaluationError("the fine-tuning data yielded no batches")


# --------------------------------------------------------------------------------------------
# Every row.
# --------------------------------------------------------------------------------------------
class Runner(Protocol):
    """Where the parts of a set and fine-tuning run: this process or Ray tasks."""

    def parts(self, model: torch.nn.Module, url: str, tasks: list[str], opts: dict[str, Any], world_size: int,
              label: str) -> list[EvalOutput]: ...

    def finetune(self, model: torch.nn.Module, url: str, tasks: list[str], opts: dict[str, Any]) -> torch.nn.Module: ...


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def run_part(model: torch.nn.Module, url: str, tasks: list[str], opts: dict[str, Any], rank: int, world_size: int,
             label: str, tqdm: Callable[..., Any]) -> EvalOutput:
    """Evaluate rank ``rank``'s share with a ``tqdm`` progress bar; ``opts`` as
    :func:`evaluate_sets` builds them."""
    bars = []

    def progress(total: int) -> Callable[[int], None]:
        bars.append(tqdm(desc=f"{label} [{rank + 1}/{world_size}]", total=total, unit="img"))
        return bars[-1].update

    try:
        return evaluate_part(model, url, tasks, rank=rank, world_size=world_size, device=_device(),
                             progress=progress, **opts)
    finally:
        for bar in bars:
            bar.close()


def run_finetune(model: torch.nn.Module, url: str, tasks: list[str], opts: dict[str, Any]) -> torch.nn.Module:
    """Fine-tune a copy of ``model`` on ``url``'s shards (the loader's train mode: shuffled,
    flipped, exactly ``steps`` batches); returns it on the CPU."""
    from mult.data.loader import make_loader

    model = copy.deepcopy(model)

    def batches():
        return make_loader(url, tasks=tasks, image_size=opts["image_size"], batch_size=opts["batch_size"],
                           mode="train", steps_per_epoch=opts["steps"], hflip=True, num_workers=0)

    finetune(model, batches, tasks, steps=opts["steps"], lr=opts["lr"], device=_device(), precision=opts["precision"],
             normalize=opts["normalize"])
    return model.cpu()


class LocalRunner:
    """Runs every part and fine-tuning in this process, one after another."""

    def parts(self, model, url, tasks, opts, world_size, label):
        from tqdm import tqdm

        return [run_part(model, url, tasks, opts, r, world_size, label, tqdm) for r in range(world_size)]

    def finetune(self, model, url, tasks, opts):
        return run_finetune(model, url, tasks, opts)


def evaluate_sets(model: torch.nn.Module, model_tasks: Sequence[str], runs: Sequence[SetRun], out_dir: str | Path, *,
                  runner: Runner, infos: Mapping[str, SetInfo], image_size: int, precision: str = "fp32",
                  normalize: str = "valid",
                  num_workers: int = 2, batch_size: int = 8, grid_samples: int = 4, max_batches: int | None = None,
                  finetune_steps: int = 500, finetune_lr: float = 5e-5) -> list[dict[str, Any]]:
    """Evaluate every row; write its grids; return the ``sets`` entries of the results."""
    entries = []
    for run in runs:
        info = infos[run.name]
        tasks, skipped = select_tasks(model_tasks, info.tasks, run.name)
        entry: dict[str, Any] = {
            "label": run.label, "name": run.name, "url": run.url, "format": info.format,
            "num_samples": 0, "tasks": tasks, "skipped": skipped, "metrics": {},
            "alignment": get_dataset(run.name).alignment, "finetune": None, "corruption": None,
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
                raise EvaluationError(f"--finetune {run.name}={run.finetune_url}: its shards carry none of {tasks}")
            ft = {"image_size": image_size, "batch_size": batch_size, "steps": finetune_steps, "lr": finetune_lr,
                  "precision": precision, "normalize": normalize}
            net = runner.finetune(model, run.finetune_url, ft_tasks, ft)
            entry["finetune"] = {"url": run.finetune_url, "steps": finetune_steps, "lr": finetune_lr, "tasks": ft_tasks}
        # The loader's eval mode splits by shard, or by sample when shards are fewer than ranks.
        world_size = max(1, min(num_workers, info.num_samples or 1))
        opts = {"image_size": image_size, "batch_size": batch_size, "grid_samples": grid_samples,
                "max_batches": max_batches, "blur_sigma": run.blur_sigma, "precision": precision,
                "normalize": normalize}
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


def with_floor(entries: list[dict[str, Any]], floor: torch.nn.Module, model_tasks: Sequence[str],
               runs: Sequence[SetRun], out_dir: str | Path, label: str, **kwargs: Any) -> list[dict[str, Any]]:
    """``entries`` with, after each plain set's row, the same set scored by ``floor`` (a model
    that ignores its input, :mod:`mult.experiments.constant`): the row a reader compares the
    model's with. Fine-tuned and blurred rows get none (the floor has nothing to fine-tune,
    and blur does not change it)."""
    plain = [SetRun(f"{r.label}: {label}", r.name, r.url) for r in runs if not (r.finetune_url or r.blur_sigma)]
    kwargs = {**kwargs, "grid_samples": 0}
    floors = {e["name"]: {**e, "floor": True}
              for e in evaluate_sets(floor, model_tasks, plain, out_dir, **kwargs)}
    out = []
    for entry in entries:
        out.append(entry)
        is_plain = not (entry.get("finetune") or entry.get("corruption"))
        if is_plain and entry["name"] in floors:
            out.append(floors.pop(entry["name"]))
    return out


def build_results(checkpoint: str, model_tasks: Sequence[str], entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The results document; a set's class mapping is included when a classification task of it
    was scored."""
    results: dict[str, Any] = {"checkpoint": checkpoint, "model_tasks": list(model_tasks), "sets": entries,
                               "label_map": None}
    for entry in entries:
        scored = any(get_task(t).kind == "classification" for t in entry["tasks"])
        markdown = get_dataset(entry["name"]).label_map_markdown() if scored else None
        if markdown:
            results["label_map"] = markdown
    return results
