"""What the training loop does with a step whose loss or gradient is not finite.

:func:`mult.training.step.train_step` already makes every rank agree that a step was
non-finite and skips it on all of them. :class:`NonFiniteGuard` applies ``train.nonfinite``:

* ``skip`` (default): the step is dropped (no weight, optimizer or schedule update; the data
  position moves on), counted in ``nonfinite_steps_total`` and logged with every rank's losses
  and sample keys; more than ``train.max_nonfinite_steps`` such steps in a row fail the run;
* ``fail``: the first one fails the run.

A failure raises :class:`~mult.losses.NonFiniteLossError` on every rank, naming the step, the
data position and each rank's task losses and samples, and writes a record
(:data:`RECORD`) to the run's storage. A restarted run reads it back and says, before training,
that it is about to replay the same data with the same RNG (:func:`warn_if_replaying`): a
data-driven NaN comes back at the same step, and a restart alone will not get past it.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import torch.distributed as dist

from mult.losses import NonFiniteLossError
from mult.training.step import StepResult

log = logging.getLogger(__name__)

RECORD = "nonfinite.json"  # in the run's storage: the last failure's step and data position


class NonFiniteGuard:
    """Counts non-finite steps and applies the policy; every rank holds one and sees the same
    results, so every rank takes the same branch."""

    def __init__(self, policy: str, max_in_a_row: int, *, rank: int, world: int, run_url: str | None) -> None:
        if policy not in ("skip", "fail"):
            raise ValueError(f"train.nonfinite must be 'skip' or 'fail', got {policy!r}")
        self.policy = policy
        self.max_in_a_row = max_in_a_row
        self.rank = rank
        self.world = world
        self.run_url = run_url
        self.in_a_row = 0

    def check(self, result: StepResult, *, step: int, epoch: int, micro_batch: int, accumulation: int) -> bool:
        """After a step: False if it was finite; True if it was skipped; raises when the
        policy says to stop. ``step`` is the step that was attempted (1-based), ``micro_batch``
        the epoch's micro-batches consumed before it."""
        if not result.skipped:
            self.in_a_row = 0
            return False
        self.in_a_row += 1
        where = (f"step {step} (epoch {epoch}, micro-batches {micro_batch}-{micro_batch + accumulation - 1} "
                 f"of the epoch on every rank)")
        ranks = self._every_rank(result)
        message = (f"non-finite loss or gradient at {where}, {self.in_a_row} such step(s) in a row; "
                   f"{result.nonfinite_ranks} of {self.world} rank(s) had a non-finite loss; gradient norm "
                   f"{result.grad_norm:.6g}; " + "; ".join(f"rank {r}: {text}" for r, text in ranks))
        if self.policy == "fail" or self.in_a_row > self.max_in_a_row:
            why = ("train.nonfinite=fail" if self.policy == "fail"
                   else f"more than train.max_nonfinite_steps={self.max_in_a_row} in a row")
            if self.rank == 0:
                self._record(step, epoch, micro_batch, message)
            raise NonFiniteLossError(f"{message}. Stopping ({why}). A restart from the last checkpoint replays "
                                     "the same data and RNG; lower optim.lr, fix or drop the samples named, or "
                                     "raise train.max_nonfinite_steps.")
        if self.rank == 0:
            log.warning("skipped %s (train.nonfinite=skip)", message)
        return True

    def _every_rank(self, result: StepResult) -> list[tuple[int, str]]:
        mine = result.problem or "finite"
        if self.world == 1 or not dist.is_initialized():
            return [(self.rank, mine)]
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, mine)
        return list(enumerate(gathered))

    def _record(self, step: int, epoch: int, micro_batch: int, message: str) -> None:
        if not self.run_url:
            return
        from mult.data.storage import open_storage

        record = {"step": step, "epoch": epoch, "micro_batch": micro_batch, "message": message,
                  "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        try:
            open_storage(self.run_url).write_bytes(RECORD, json.dumps(record, indent=1).encode())
        except Exception as exc:  # the failure itself must still surface
            log.error("could not record the non-finite failure in %s: %s", self.run_url, exc)


def warn_if_replaying(run_url: str | None, *, step: int, epoch: int, micro_batch: int) -> dict[str, Any] | None:
    """When a previous attempt of this run failed on a non-finite step at or after the
    position being restored, log that the restart will replay it; returns the record."""
    if not run_url:
        return None
    from mult.data.storage import open_storage

    try:
        record = json.loads(open_storage(run_url).read_bytes(RECORD))
    except FileNotFoundError:
        return None
    except Exception as exc:
        log.warning("could not read %s/%s: %s", run_url, RECORD, exc)
        return None
    if (int(record["epoch"]), int(record["micro_batch"])) < (epoch, micro_batch):
        return None  # already past it
    log.error("resuming at step %d (epoch %d, micro-batch %d), before the step that stopped a previous attempt "
              "of this run with a non-finite loss: the same data and RNG replay it, so it will most likely fail "
              "again at step %d unless the config changed. That failure: %s",
              step, epoch, micro_batch, int(record["step"]), record["message"])
    return record
