"""Evaluation of a MulT model on one test set, plus domain-transfer helpers.

The pieces, all pure torch (Ray lives in ``pipelines.evaluate``):

* :func:`select_tasks`: the tasks a set is evaluated on, (model tasks) ∩ (set tasks), and why
  the others are skipped;
* :func:`evaluate_batches` / :func:`evaluate_part`: one pass over a loader (or one rank's share
  of a set's shards) into a :class:`~mult.metrics.MetricSuite`, returning its flat float64
  state, the sample count and the samples kept for prediction grids;
* :func:`sum_states` and :func:`compute_metrics`: the exact reduce. MetricSuite states are
  sums, so the sum of the parts' states is the state of one suite over all the data;
* :func:`finetune`: a few AdamW steps on a target set's train split;
* :func:`gaussian_blur`: the blur corruption applied to Taskonomy test inputs.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mult.tasks import NUM_SEMANTIC_CLASSES, TASK_NAMES
from mult.viz import GridSample

log = logging.getLogger(__name__)

SET_NAMES: tuple[str, ...] = ("taskonomy", "replica", "nyu", "cocodoom")

# Sets whose depth is not in metres: only the scale-invariant depth metrics mean anything.
SCALE_INVARIANT_DEPTH_ONLY = frozenset({"cocodoom"})

ALIGNMENT: dict[str, str] = {
    "taskonomy": "native label spaces: depth in metres (raw / 512), normals in the camera frame, "
    "the model's 18 segmentation classes; metric and scale-invariant depth metrics.",
    "replica": "same encodings as Taskonomy (omnidata layout): depth in metres, normals in the "
    "camera frame; metric and scale-invariant depth metrics.",
    "nyu": "depth in metres (NYU's float metres stored as Taskonomy raw units); segmentation: "
    "NYU's 40 classes mapped onto the model's classes where they overlap (table below), the "
    "rest ignored as label 0; metric and scale-invariant depth metrics.",
    "cocodoom": "depth in Doom map units (metres = units / 32 is only a convention): only the "
    "scale-invariant depth metrics (si_*) are reported; segmentation scores background only "
    "(floor, ceiling, wall), Doom's object classes have no counterpart and are ignored.",
}


class EvaluationError(ValueError):
    """Bad evaluation input (set name, URL, tasks); the message says what is allowed."""


@dataclass
class EvalOutput:
    """What one evaluation pass returns: the suite's flat ``float64`` state, the number of
    samples seen, and up to ``grid_samples`` samples (the smallest keys) for grids."""

    state: torch.Tensor
    num_samples: int
    grid: list[GridSample] = field(default_factory=list)
    bad_samples: int = 0  # samples the loader skipped as undecodable


def check_set_name(name: str) -> None:
    if name not in SET_NAMES:
        raise EvaluationError(f"unknown evaluation set {name!r}; valid sets: {', '.join(SET_NAMES)}")


def select_tasks(
    model_tasks: Sequence[str], set_tasks: Sequence[str], set_name: str
) -> tuple[list[str], dict[str, str]]:
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


def _keep_smallest(kept: list[GridSample], new: GridSample, n: int) -> None:
    kept.append(new)
    kept.sort(key=lambda s: s.key)
    del kept[n:]


def merge_grids(parts: Iterable[Sequence[GridSample]], n: int) -> list[GridSample]:
    """The ``n`` samples with the smallest keys across parts: the same set however the data
    was split among workers."""
    return sorted((s for part in parts for s in part), key=lambda s: s.key)[:n]


def _grid_sample(
    batch: Mapping[str, Any], i: int, rgb: torch.Tensor, preds: Mapping[str, torch.Tensor], tasks: Sequence[str]
) -> GridSample:
    return GridSample(
        key=str(batch["key"][i]),
        rgb=rgb[i].detach().cpu().float().numpy(),
        preds={t: preds[t][i].detach().cpu().float().numpy() for t in tasks},
        targets={t: batch["targets"][t][i].cpu().numpy() for t in tasks},
        valid={t: batch["valid"][t][i].cpu().numpy().astype(bool) for t in tasks},
    )


@torch.no_grad()
def evaluate_batches(
    model: torch.nn.Module,
    batches: Iterable[Mapping[str, Any]],
    tasks: Sequence[str],
    *,
    device: str | torch.device = "cpu",
    num_classes: int = NUM_SEMANTIC_CLASSES,
    blur_sigma: float | None = None,
    grid_samples: int = 0,
    max_batches: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> EvalOutput:
    """Run ``model`` over loader batches (``"key"``, ``"rgb" [B, 3, H, W]``, ``"targets"``,
    ``"valid"``) and accumulate a MetricSuite over ``tasks``.

    ``progress(n)`` is called with each batch's size. ``max_batches`` is for smoke tests only:
    a cut-off pass is not the full test split.
    """
    from mult.losses import task_losses
    from mult.metrics import MetricSuite

    suite = MetricSuite(list(tasks), num_classes=num_classes)
    model = model.to(device).eval()
    seen, bad, kept = 0, 0, []
    for step, batch in enumerate(batches):
        if max_batches is not None and step >= max_batches:
            break
        missing = [t for t in tasks if t not in batch["targets"]]
        if missing:
            raise EvaluationError(f"batch lacks targets for {missing}; it has {sorted(batch['targets'])}")
        rgb = batch["rgb"].to(device)
        if blur_sigma:
            rgb = gaussian_blur(rgb, blur_sigma)
        out = model(rgb)
        absent = [t for t in tasks if t not in out]
        if absent:
            raise EvaluationError(f"the model predicts {sorted(out)}, not {absent}")
        preds = {t: out[t].float() for t in tasks}
        targets = {t: batch["targets"][t].to(device) for t in tasks}
        valid = {t: batch["valid"][t].to(device) for t in tasks}
        suite.update(preds, targets, valid, task_losses(preds, targets, valid, list(tasks)))
        n = rgb.shape[0]
        seen += n
        bad += int(batch.get("bad_samples", 0))
        for i in range(n if grid_samples else 0):
            key = str(batch["key"][i])
            if len(kept) < grid_samples or key < kept[-1].key:
                _keep_smallest(kept, _grid_sample(batch, i, rgb, preds, tasks), grid_samples)
        if progress is not None:
            progress(n)
    return EvalOutput(suite.state().detach().to(torch.float64).cpu(), seen, kept, bad)


def evaluate_part(
    model: torch.nn.Module,
    url: str,
    tasks: Sequence[str],
    *,
    image_size: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    loader_workers: int = 0,
    make_progress: Callable[[int], Callable[[int], None]] | None = None,
    **kwargs: Any,
) -> EvalOutput:
    """Evaluate rank ``rank``'s share of the shards at ``url`` (the loader's eval mode gives
    every sample to exactly one rank). ``make_progress(total)`` returns the per-batch progress
    callback, given this rank's sample count. ``kwargs`` go to :func:`evaluate_batches`."""
    from mult.data.loader import make_loader

    loader = make_loader(
        url,
        tasks=list(tasks),
        image_size=image_size,
        batch_size=batch_size,
        mode="eval",
        rank=rank,
        world_size=world_size,
        num_workers=loader_workers,
    )
    progress = make_progress(loader.num_samples) if make_progress is not None else None
    return evaluate_batches(model, loader, tasks, progress=progress, **kwargs)


def sum_states(states: Sequence[torch.Tensor | np.ndarray]) -> torch.Tensor:
    """The exact reduce: sum per-worker MetricSuite states in float64."""
    if not states:
        raise EvaluationError("no worker states to reduce")
    tensors = [torch.as_tensor(s, dtype=torch.float64) for s in states]
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1:
        raise EvaluationError(f"worker states differ in shape {sorted(shapes)}: different task lists?")
    return torch.stack(tensors).sum(dim=0)


def compute_metrics(
    tasks: Sequence[str], state: torch.Tensor, set_name: str, num_classes: int = NUM_SEMANTIC_CLASSES
) -> dict[str, dict[str, float]]:
    """Load a (summed) state into a fresh suite and compute ``{task: {metric: value}}``;
    for sets without metric depth only the scale-invariant depth metrics are kept."""
    from mult.metrics import MetricSuite

    suite = MetricSuite(list(tasks), num_classes=num_classes)
    suite.load_state(state)
    metrics = {t: {k: float(v) for k, v in m.items()} for t, m in suite.compute().items()}
    if set_name in SCALE_INVARIANT_DEPTH_ONLY and "depth_zbuffer" in metrics:
        metrics["depth_zbuffer"] = {k: v for k, v in metrics["depth_zbuffer"].items() if k.startswith("si_")}
    return metrics


def finetune(
    model: torch.nn.Module,
    make_batches: Callable[[], Iterable[Mapping[str, Any]]],
    tasks: Sequence[str],
    *,
    steps: int,
    lr: float = 5e-5,
    weight_decay: float = 0.05,
    loss_weights: Mapping[str, float] | None = None,
    grad_clip: float | None = 1.0,
    device: str | torch.device = "cpu",
) -> list[float]:
    """Fine-tune ``model`` in place for ``steps`` AdamW steps on the batches of
    ``make_batches()`` (called again when an epoch runs out), with the weighted sum of the
    task losses of ``tasks``. Returns the total loss of each step."""
    from mult.engine import param_groups
    from mult.losses import task_losses

    if steps < 1:
        raise EvaluationError(f"fine-tuning steps must be >= 1, got {steps}")
    weights = {t: float((loss_weights or {}).get(t, 1.0)) for t in tasks}
    model = model.to(device).train()
    opt = torch.optim.AdamW(param_groups([model], weight_decay), lr=lr)
    history: list[float] = []
    while len(history) < steps:
        empty = True
        for batch in make_batches():
            empty = False
            preds = model(batch["rgb"].to(device))
            targets = {t: batch["targets"][t].to(device) for t in tasks}
            valid = {t: batch["valid"][t].to(device) for t in tasks}
            losses = task_losses({t: preds[t].float() for t in tasks}, targets, valid, list(tasks))
            total = sum(weights[t] * losses[t] for t in tasks)
            if not torch.isfinite(total):
                per_task = {t: float(v) for t, v in losses.items()}
                raise FloatingPointError(f"non-finite fine-tuning loss; per-task losses: {per_task}")
            opt.zero_grad(set_to_none=True)
            total.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            opt.step()
            history.append(float(total.detach()))
            if len(history) >= steps:
                break
        if empty:
            raise EvaluationError("the fine-tuning data yielded no batches")
    model.eval()
    log.info("fine-tuned %d steps: loss %.4f -> %.4f", steps, history[0], history[-1])
    return history
