"""Evaluation across tasks: the metric suite, Delta-m, relative changes and baselines.

* :class:`MetricSuite` runs each task's accumulator (:mod:`mult.accumulators`, named by the
  task table) plus each task's mean loss, and reduces all of them across ranks in one flat
  float64 ``all_reduce``: the numbers of one process over all the data.
* :func:`relative_change` is the one formula for "how much better than a baseline":
  ``100 * (value - baseline) / |baseline|``, sign flipped when lower is better, so a positive
  change is always an improvement. :func:`delta_m` averages it over tasks' primary metrics.
* :func:`check_baselines` checks single-task baselines ``{task: {metric: value}}`` against the
  task table (:func:`mult.training.plan.load_baselines` reads them from storage).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from mult.accumulators import Accumulator
from mult.tasks import TASK_NAMES, TASKS, get_task, task_losses

Baselines = dict[str, dict[str, float]]  # task -> metric -> value


class MetricSuite:
    """All tasks' accumulators plus each task's mean loss, reduced as one flat tensor.

    The ``loss`` metric is the mean of the per-batch task losses weighted by batch size, in
    Taskonomy target units. Tasks that never received a target are left out of ``compute``.
    """

    def __init__(self, tasks: Sequence[str]) -> None:
        self.tasks: tuple[str, ...] = tuple(get_task(t).name for t in tasks)
        self.accumulators: dict[str, Accumulator] = {t: get_task(t).accumulator() for t in self.tasks}
        self._loss = torch.zeros(
            2 * len(self.tasks), dtype=torch.float64
        )  # [sum, samples] per task

    def update(
        self,
        preds: Mapping[str, Tensor],
        targets: Mapping[str, Tensor],
        valid: Mapping[str, Tensor] | None = None,
        losses: Mapping[str, Tensor | float] | None = None,
    ) -> None:
        """Add a batch. Tasks absent from ``targets`` are skipped; losses missing from
        ``losses`` (or all of them, when it is ``None``) are computed with :func:`task_losses`."""
        valid = valid or {}
        present = [t for t in self.tasks if t in targets]
        missing = [t for t in present if t not in preds]
        if missing:
            raise KeyError(
                f"tasks {missing} have targets but no prediction; predictions: {sorted(preds)}"
            )
        losses = dict(losses or {})
        need = [t for t in present if t not in losses]
        if need:
            with torch.no_grad():
                losses.update(task_losses(preds, targets, valid, need))
        for index, task in enumerate(self.tasks):
            if task not in present:
                continue
            self.accumulators[task].update(preds[task].detach(), targets[task], valid.get(task))
            batch = targets[task].shape[0]
            value = losses[task]
            value = float(value.detach()) if isinstance(value, Tensor) else float(value)
            self._loss[2 * index] += value * batch
            self._loss[2 * index + 1] += batch

    def state(self) -> Tensor:
        """Every statistic as one ``float64 [S]`` tensor (a copy); states of suites add up."""
        return torch.cat([acc.state() for acc in self.accumulators.values()] + [self._loss.clone()])

    def load_state(self, state: Tensor) -> None:
        sizes = [acc.state().numel() for acc in self.accumulators.values()] + [self._loss.numel()]
        if state.dim() != 1 or state.numel() != sum(sizes):
            raise ValueError(
                f"MetricSuite.load_state: expected {sum(sizes)} values for tasks {list(self.tasks)}, "
                f"got shape {tuple(state.shape)}"
            )
        parts = state.detach().to(device="cpu", dtype=torch.float64).split(sizes)
        for acc, part in zip(self.accumulators.values(), parts):
            acc.load_state(part)
        self._loss = parts[-1].clone()

    def reduce_(self, group=None) -> None:
        """Sum the statistics over the ranks of ``group`` in place (no-op without a process group).

        NCCL needs the tensor on this rank's GPU; other backends reduce on the CPU.
        """
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            return
        flat = self.state()
        if dist.get_backend(group) == "nccl":
            flat = flat.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        self.load_state(flat.cpu())

    def reset(self) -> None:
        for acc in self.accumulators.values():
            acc.reset()
        self._loss.zero_()

    def compute(self) -> dict[str, dict[str, float]]:
        """``{task: {metric: value}}`` for every task that received data, ``loss`` included."""
        out: dict[str, dict[str, float]] = {}
        for index, task in enumerate(self.tasks):
            acc = self.accumulators[task]
            count = float(self._loss[2 * index + 1])
            if acc.samples == 0 and count == 0:
                continue
            values = acc.compute()
            values["loss"] = float(self._loss[2 * index]) / count if count > 0 else math.nan
            out[task] = values
        return out


# ------------------------------------------------------------------------------------------
# Relative change and Delta-m.
# ------------------------------------------------------------------------------------------
def relative_change(value: float, baseline: float, higher_is_better: bool) -> float:
    """Percent change of ``value`` against ``baseline``; positive = better.

    ``100 * (value - baseline) / |baseline|``, negated when lower is better. Dividing by the
    baseline's magnitude keeps the sign meaning "better" or "worse" whatever the baseline's
    sign. NaN when the baseline is 0 or either number is not finite.
    """
    if baseline == 0 or not math.isfinite(baseline) or not math.isfinite(value):
        return math.nan
    change = 100.0 * (value - baseline) / abs(baseline)
    return change if higher_is_better else -change


def delta_m(
    metrics: Mapping[str, Mapping[str, float]],
    baselines: Mapping[str, Mapping[str, float]],
    tasks: Sequence[str],
) -> float:
    """Delta-m (Maninis et al., CVPR 2019), in percent, on each task's primary metric.

    The mean over ``tasks`` of :func:`relative_change` of ``TASKS[t].primary_metric`` against
    the single-task baseline: ``100 / T * sum_i (-1)^{l_i} (M_i - B_i) / |B_i|`` with ``l_i = 1``
    when lower is better. **Positive means better than the baselines**; e.g. +2.0 is an
    average 2 % relative improvement.
    """
    if not tasks:
        raise ValueError("delta_m needs at least one task")
    problems, terms = [], []
    for task in tasks:
        metric = get_task(task).primary_metric
        model_value = metrics.get(task, {}).get(metric.name)
        base_value = baselines.get(task, {}).get(metric.name)
        if model_value is None:
            problems.append(f"metrics lack {task}.{metric.name}")
        if base_value is None:
            problems.append(f"baselines lack {task}.{metric.name}")
        elif base_value == 0 or not math.isfinite(base_value):
            problems.append(f"baseline {task}.{metric.name} = {base_value} (must be finite and non-zero)")
        if model_value is None or base_value is None:
            continue
        terms.append(relative_change(model_value, base_value, metric.higher_is_better))
    if problems:
        raise ValueError("cannot compute delta_m: " + "; ".join(problems))
    return sum(terms) / len(terms)


# ------------------------------------------------------------------------------------------
# Baselines.
# ------------------------------------------------------------------------------------------
def check_baselines(data: Any, where: str = "baselines", tasks: Sequence[str] | None = None) -> Baselines:
    """Check ``{task: {metric: number}}`` against the task table; with ``tasks``, also that
    each has its primary metric (what :func:`delta_m` uses). Raises ValueError naming the entry."""
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(f"{where}: expected a JSON object {{task: {{metric: value}}}}")
    out: Baselines = {}
    for task, values in data.items():
        if task not in TASKS:
            raise ValueError(f"{where}: unknown task {task!r}; valid tasks: {', '.join(TASK_NAMES)}")
        valid = [m.name for m in TASKS[task].metrics]
        for metric, value in values.items():
            if metric not in valid:
                raise ValueError(f"{where}: {task} has unknown metric {metric!r}; valid: {', '.join(valid)}")
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{where}: {task}.{metric} is {value!r}, not a number")
        out[task] = {m: float(v) for m, v in values.items()}
    if tasks is not None:
        missing = [f"{t}.{get_task(t).primary_metric.name}" for t in tasks
                   if get_task(t).primary_metric.name not in out.get(t, {})]
        if missing:
            raise ValueError(
                f"{where} lack {', '.join(missing)} (the primary metric of each task is needed; "
                f"the file has tasks {sorted(out)})"
            )
    return out
