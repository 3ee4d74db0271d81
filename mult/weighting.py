"""Loss weighting: how per-task losses become one number to minimise.

:class:`LossCombiner` is the one place where losses are weighted; it holds one strategy. Every
strategy multiplies each task's loss by its static weight from ``loss_weights`` (what Ray Tune
searches) and by a strategy factor:

* ``fixed``: factor 1.
* ``uncertainty`` (Kendall, Gal & Cipolla, CVPR 2018): a learnable log-variance
  ``s_t = log sigma_t^2`` per task. A regression task contributes
  ``w_t * (0.5 * exp(-s_t) * L_t + 0.5 * s_t)`` (``1 / (2 sigma^2) L + log sigma``), a
  classification task ``w_t * (exp(-s_t) * L_t + 0.5 * s_t)`` (``1 / sigma^2 L + log sigma``).
  The static weight scales the whole term, so it does not move the optimum of ``s_t``.
* ``dwa``, Dynamic Weight Average (Liu, Johns & Davison, CVPR 2019):
  ``lambda_t = K * softmax_t(r_t / T)`` with ``r_t = L_t(e-1) / L_t(e-2)``, the ratio of the
  task's mean loss over the last two finished epochs; ``lambda_t = 1`` until two epochs have
  ended. The epoch means are handed over explicitly by :meth:`Weighting.end_epoch` (reduce them
  across ranks first, so every rank weights alike).

All state (log-variances, DWA history and factors) lives in parameters and buffers, so the
strategy's ``state_dict`` is the checkpoint.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from mult.config import Config
from mult.tasks import TASKS, get_task


class Weighting(nn.Module):
    """Base class: a static weight per task times a strategy factor.

    Subclasses override :meth:`_terms` (and :meth:`end_epoch` if they keep history).
    """

    def __init__(self, tasks: Sequence[str], weights: Mapping[str, float]) -> None:
        super().__init__()
        self.tasks: tuple[str, ...] = tuple(tasks)
        self.static: dict[str, float] = {t: float(weights[t]) for t in self.tasks}

    def forward(
        self, losses: Mapping[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
        """Combine scalar per-task losses (a subset of ``self.tasks``).

        Returns ``(total, effective_weights, extras)``: the scalar to back-propagate, the
        multiplier each present task's loss received, and the strategy's learned values
        (detached is up to the caller).
        """
        terms, effective, extras = self._terms(losses)
        total = torch.stack([term.float() for term in terms.values()]).sum()
        return total, effective, extras

    def _terms(
        self, losses: Mapping[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
        raise NotImplementedError

    def end_epoch(self, mean_losses: Mapping[str, float]) -> None:
        """Called once per epoch with every task's mean loss; stateless strategies ignore it."""


class FixedWeighting(Weighting):
    """``total = sum_t w_t * L_t``."""

    def _terms(self, losses):
        terms, effective = {}, {}
        for task, loss in losses.items():
            weight = torch.tensor(self.static[task], dtype=loss.dtype, device=loss.device)
            terms[task] = weight * loss
            effective[task] = weight
        return terms, effective, {}


class UncertaintyWeighting(Weighting):
    """Homoscedastic-uncertainty weighting with one learnable log-variance per task.

    ``log_vars`` (``[T]``, in ``self.tasks`` order, initialised to 0) must be handed to the
    optimiser. A task absent from a batch still enters the graph with a zero coefficient, so
    its log-variance gets a (zero) gradient instead of none: DDP and ``find_unused_parameters``
    stay happy.
    """

    def __init__(self, tasks: Sequence[str], weights: Mapping[str, float]) -> None:
        super().__init__(tasks, weights)
        self.log_vars = nn.Parameter(torch.zeros(len(self.tasks)))
        # 1 / sigma^2 for classification, 1 / (2 sigma^2) for regression (Kendall et al., eq. 7-10)
        self.precision_scale = {
            t: 1.0 if TASKS[t].kind == "classification" else 0.5 for t in self.tasks
        }

    def _terms(self, losses):
        terms, effective, extras = {}, {}, {}
        for index, task in enumerate(self.tasks):
            log_var = self.log_vars[index]
            extras[task] = log_var
            if task not in losses:
                terms[task] = 0.0 * log_var
                continue
            loss = losses[task]
            weight = (
                self.static[task] * self.precision_scale[task] * torch.exp(-log_var).to(loss.dtype)
            )
            terms[task] = weight * loss + self.static[task] * 0.5 * log_var.to(loss.dtype)
            effective[task] = weight
        return terms, effective, {"log_var": extras}


class DynamicWeightAverage(Weighting):
    """DWA: task factors from the rate at which each task's epoch-mean loss falls.

    Buffers (checkpointed with ``state_dict``): ``history`` ``float64 [2, T]`` (the last two
    epoch means, oldest first), ``epochs_seen`` (how many of its rows are filled, at most 2),
    ``factors`` ``float32 [T]`` (the current ``lambda_t``, summing to ``T``).
    """

    def __init__(
        self, tasks: Sequence[str], weights: Mapping[str, float], temperature: float = 2.0
    ) -> None:
        super().__init__(tasks, weights)
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"dwa_temperature must be a finite number > 0, got {temperature}")
        self.temperature = float(temperature)
        self.register_buffer("history", torch.zeros(2, len(self.tasks), dtype=torch.float64))
        self.register_buffer("epochs_seen", torch.zeros((), dtype=torch.long))
        self.register_buffer("factors", torch.ones(len(self.tasks)))

    def _terms(self, losses):
        terms, effective = {}, {}
        for index, task in enumerate(self.tasks):
            if task not in losses:
                continue
            loss = losses[task]
            weight = (self.static[task] * self.factors[index]).to(
                device=loss.device, dtype=loss.dtype
            )
            terms[task] = weight * loss
            effective[task] = weight
        return (
            terms,
            effective,
            {"dwa_factor": {t: self.factors[i] for i, t in enumerate(self.tasks)}},
        )

    def end_epoch(self, mean_losses: Mapping[str, float]) -> None:
        """Record one finished epoch's mean loss per task and recompute the factors.

        Values must be finite and > 0. A task missing from ``mean_losses`` (no labelled batch
        that epoch) is recorded as unknown, and a ratio involving an unknown value counts as 1.
        """
        unknown = sorted(set(mean_losses) - set(self.tasks))
        if unknown:
            raise ValueError(
                f"DWA end_epoch got losses for tasks {unknown} that are not combined; "
                f"tasks: {list(self.tasks)}"
            )
        values = [float(mean_losses.get(t, math.nan)) for t in self.tasks]
        bad = {t: float(v) for t, v in mean_losses.items() if not (math.isfinite(v) and v > 0)}
        if bad:
            raise ValueError(f"DWA end_epoch needs finite mean losses > 0, got {bad}")
        new = torch.tensor(values, dtype=torch.float64, device=self.history.device)
        self.history[0] = self.history[1].clone()
        self.history[1] = new
        self.epochs_seen.fill_(min(int(self.epochs_seen) + 1, 2))
        if int(self.epochs_seen) < 2:
            return
        ratios = torch.nan_to_num(self.history[1] / self.history[0], nan=1.0)
        factors = len(self.tasks) * torch.softmax(ratios / self.temperature, dim=0)
        self.factors.copy_(factors.to(self.factors.dtype))


WEIGHTINGS: dict[str, Callable[..., Weighting]] = {
    "fixed": lambda tasks, weights, dwa_temperature: FixedWeighting(tasks, weights),
    "uncertainty": lambda tasks, weights, dwa_temperature: UncertaintyWeighting(tasks, weights),
    "dwa": lambda tasks, weights, dwa_temperature: DynamicWeightAverage(
        tasks, weights, dwa_temperature
    ),
}


def build_weighting(
    name: str, tasks: Sequence[str], weights: Mapping[str, float], dwa_temperature: float = 2.0
) -> Weighting:
    """A weighting strategy by name (``fixed`` | ``uncertainty`` | ``dwa``)."""
    try:
        factory = WEIGHTINGS[name]
    except KeyError:
        raise ValueError(
            f"unknown loss weighting {name!r}; choose from {sorted(WEIGHTINGS)}"
        ) from None
    return factory(tasks, weights, dwa_temperature)


class LossCombiner(nn.Module):
    """Weights per-task losses into the total; the only place weighting happens.

    ``weights`` holds the static ``loss_weights`` (missing tasks take ``TASKS[t].default_weight``);
    ``weighting`` picks the strategy of :mod:`mult.weighting` (``fixed`` | ``uncertainty`` |
    ``dwa``). Learnable parameters (uncertainty's log-variances) are this module's
    ``parameters()``: add them to the optimiser (:func:`mult.training.step.train_step` averages
    their gradients across ranks, since they live outside the DDP-wrapped model). ``state_dict``
    holds everything, DWA history included.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        weights: Mapping[str, float] | None = None,
        weighting: str = "fixed",
        dwa_temperature: float = 2.0,
    ) -> None:
        super().__init__()
        self.tasks: tuple[str, ...] = tuple(get_task(t).name for t in tasks)
        if not self.tasks:
            raise ValueError("LossCombiner needs at least one task")
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(self.tasks))
        if unknown:
            raise ValueError(
                f"loss weights for tasks {unknown} that are not combined; tasks: {list(self.tasks)}"
            )
        resolved = {t: float(weights.get(t, TASKS[t].default_weight)) for t in self.tasks}
        bad = {t: w for t, w in resolved.items() if not (math.isfinite(w) and w >= 0)}
        if bad:
            raise ValueError(f"loss weights must be finite and >= 0, got {bad}")
        self.weights = resolved
        self.weighting = weighting
        self.strategy: Weighting = build_weighting(weighting, self.tasks, resolved, dwa_temperature)

    def forward(self, losses: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """``losses``: ``{task: scalar}`` for any non-empty subset of the tasks.

        Returns ``(total, details)``; details hold floats: ``loss/<task>`` (raw loss),
        ``weight/<task>`` (effective multiplier), the strategy's values (``log_var/<task>`` or
        ``dwa_factor/<task>``) and ``loss/total``. A non-finite total is returned as it is:
        the training step decides, on every rank together, what to do with it
        (:func:`describe_losses` words it).
        """
        if not losses:
            raise ValueError(
                f"LossCombiner got no task losses; expected some of {list(self.tasks)}"
            )
        unknown = sorted(set(losses) - set(self.tasks))
        if unknown:
            raise ValueError(
                f"losses for tasks {unknown} that are not combined; tasks: {list(self.tasks)}"
            )
        total, effective, extras = self.strategy(losses)
        names, values = ["loss/total"], [total]
        for task, loss in losses.items():
            names += [f"loss/{task}", f"weight/{task}"]
            values += [loss, effective[task]]
        for kind, per_task in extras.items():
            for task, value in per_task.items():
                names.append(f"{kind}/{task}")
                values.append(value)
        # one device->host copy for all of them
        numbers = torch.stack(
            [v.detach().float().reshape(()).to(total.device) for v in values]
        ).tolist()
        return total, dict(zip(names, numbers))

    def end_epoch(self, mean_losses: Mapping[str, float]) -> None:
        """Hand the strategy one finished epoch's mean loss per task (DWA uses it)."""
        self.strategy.end_epoch(mean_losses)


def describe_losses(details: Mapping[str, float]) -> str:
    """``total=nan; depth_zbuffer=0.75 (weight 1), normal=nan (weight 1)``: a combiner's
    details for an error message, every task named."""
    tasks = [k[len("loss/"):] for k in details if k.startswith("loss/") and k != "loss/total"]
    per_task = ", ".join(f"{t}={details[f'loss/{t}']:.6g} (weight {details.get(f'weight/{t}', math.nan):.6g})"
                         for t in tasks)
    return f"total={details.get('loss/total', math.nan):.6g}; {per_task}"


def build_loss_combiner(cfg: Config) -> LossCombiner:
    """The combiner a :class:`mult.config.Config` describes (tasks, loss_weights, loss.*)."""
    return LossCombiner(
        cfg.tasks,
        weights={t: cfg.weight(t) for t in cfg.tasks},
        weighting=cfg.loss.weighting,
        dwa_temperature=cfg.loss.dwa_temperature,
    )
