"""The floor: a prediction that ignores its input, fitted on the training split.

A number about a model means something only next to what a constant prediction scores. Per
task, :class:`ConstantPredictor` predicts, for every image, the per-pixel median of the training
targets over their valid pixels (what minimises the L1 losses pixel by pixel; a pixel never valid
takes the median of all valid values); for classification, per-pixel class frequencies (the
majority class wins; the logits are the log of the smoothed frequencies, so its cross-entropy is
that of the frequencies). It is an ``nn.Module`` like MulT, so it goes through the same
:func:`mult.training.step.evaluate`, losses and metric suite as the model it is the floor of.

The median is exact over the samples read: up to ``max_samples`` training samples, unflipped,
in shard order (a whole Taskonomy training split does not fit in memory at 256 px; the median of
a few hundred views is already stable per pixel).
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from mult.tasks import get_task

log = logging.getLogger(__name__)

LABEL = "constant predictor"  # how reports name it


class ConstantPredictor(nn.Module):
    """``forward(images [B, 3, H, W]) -> {task: map [B, C, H, W]}``, the same map for every image."""

    def __init__(self, maps: Mapping[str, Tensor], samples: int = 0) -> None:
        super().__init__()
        self.tasks = list(maps)
        self.samples = samples  # how many training samples it was fitted on
        for task, value in maps.items():
            if value.dim() != 3:
                raise ValueError(f"{task}: a constant map must be [C, H, W], got {tuple(value.shape)}")
            self.register_buffer(f"map_{task}", value.float())

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        out = {}
        for task in self.tasks:
            value: Tensor = getattr(self, f"map_{task}")
            if value.shape[-2:] != images.shape[-2:]:
                raise ValueError(f"{task}: fitted at {tuple(value.shape[-2:])} px, asked for "
                                 f"{tuple(images.shape[-2:])}")
            out[task] = value.unsqueeze(0).expand(images.shape[0], -1, -1, -1)
        return out


def fit_constant(batches: Iterable[Mapping[str, Any]], tasks: Sequence[str], *, max_samples: int = 512,
                 smoothing: float = 0.1) -> ConstantPredictor:
    """Fit on loader batches (``targets`` and ``valid`` per task, as the training step gets them)."""
    if max_samples < 1:
        raise ValueError(f"max_samples must be >= 1, got {max_samples}")
    targets: dict[str, list[Tensor]] = {t: [] for t in tasks}
    valids: dict[str, list[Tensor]] = {t: [] for t in tasks}
    samples = 0
    for batch in batches:
        take = min(int(batch["rgb"].shape[0]), max_samples - samples)
        for t in tasks:
            if t in batch["targets"]:
                targets[t].append(batch["targets"][t][:take].cpu())
                valids[t].append(batch["valid"][t][:take].cpu())
        samples += take
        if samples >= max_samples:
            break
    if samples == 0:
        raise ValueError("fit_constant: the training split gave no samples")
    maps = {}
    for t in tasks:
        if not targets[t]:
            raise ValueError(f"fit_constant: no training sample has a {t} target")
        spec = get_task(t)
        y, valid = torch.cat(targets[t]), torch.cat(valids[t])
        if spec.kind == "classification":
            maps[t] = _log_frequencies(y, valid, spec.channels, spec.ignore_index, smoothing)
        else:
            maps[t] = _median(y, valid)
    log.info("constant predictor fitted on %d training samples", samples)
    return ConstantPredictor(maps, samples)


def _median(y: Tensor, valid: Tensor) -> Tensor:
    """y ``[N, C, H, W]``, valid ``[N, H, W]`` -> ``[C, H, W]``."""
    masked = y.float().masked_fill(~valid.unsqueeze(1), float("nan"))
    per_pixel = torch.nanmedian(masked, dim=0).values
    fallback = torch.nanmedian(masked.transpose(0, 1).reshape(y.shape[1], -1), dim=1).values
    fallback = torch.nan_to_num(fallback, nan=0.0).view(-1, 1, 1).expand_as(per_pixel)
    return torch.where(torch.isnan(per_pixel), fallback, per_pixel)


def _log_frequencies(labels: Tensor, valid: Tensor, classes: int, ignore: int | None, smoothing: float) -> Tensor:
    """labels ``[N, H, W]`` -> log of the per-pixel class frequencies ``[K, H, W]``."""
    keep = valid & (labels != ignore) if ignore is not None else valid
    one_hot = torch.nn.functional.one_hot(labels.clamp(0, classes - 1), classes).permute(0, 3, 1, 2).float()
    counts = (one_hot * keep.unsqueeze(1).float()).sum(dim=0)
    if ignore is not None:
        counts[ignore] = 0.0  # never predicted: the loss and the metrics ignore it
    freq = (counts + smoothing) / (counts.sum(dim=0, keepdim=True) + smoothing * classes)
    if ignore is not None:
        freq[ignore] = 1e-12
    return freq.log()


def constant_for(cfg: Any, *, max_samples: int = 512) -> ConstantPredictor:
    """The constant predictor of ``cfg``'s tasks, fitted on ``data.train`` at ``model.img_size``."""
    from mult.data.loader import make_loader

    if cfg.data.train is None:
        raise ValueError("data.train: the constant predictor is fitted on the training shards; none configured")
    loader = make_loader(cfg.data.train, mode="eval", tasks=cfg.tasks, image_size=cfg.model.img_size,
                         batch_size=max(1, cfg.train.micro_batch_size), num_workers=0, seed=cfg.train.seed,
                         bad_sample_policy=cfg.data.bad_sample_policy)
    return fit_constant(loader, cfg.tasks, max_samples=max_samples)


def constant_val_metrics(cfg: Any, *, max_samples: int = 512) -> dict[str, dict[str, float]]:
    """The constant predictor of ``cfg`` scored on ``data.val`` (at most ``train.val_batches``
    batches) with the metric suite validation uses: ``{task: {metric: value}}``."""
    from mult.data.loader import build_loader
    from mult.metrics import MetricSuite
    from mult.training.step import evaluate

    floor = constant_for(cfg, max_samples=max_samples)
    suite = MetricSuite(cfg.tasks)
    evaluate(floor, build_loader(cfg, "val"), suite, tasks=cfg.tasks, device=torch.device("cpu"),
             max_batches=cfg.train.val_batches, normalize=cfg.loss.normalize)
    return suite.compute()
