"""Test-only fault switch: one rank misbehaves once, at a chosen step, in a real run.

``MULT_FAULT_AT_STEP=N`` (and ``MULT_FAULT_KIND``) in the driver's environment
(:func:`mult.training.plan.prepare`) makes rank 1 (rank 0 on one worker), when it is about to
run optimizer step N + 1:

* ``exit`` (default): exit hard, as a crashed or OOM-killed worker does;
* ``sigterm``: send itself SIGTERM, as a spot notice handler or a pod termination does, and
  wait until the stop handler has seen it (:mod:`mult.training.interrupts`);
* ``nan``: set one weight to NaN on this rank only for one step (the next attempt puts it
  back), as a bad batch or an overflow on one GPU would make its loss.

A marker file in ``local_dir`` keeps the switch from firing again after a restart.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path

import torch

from mult.training.interrupts import stop_requested
from mult.training.session import Hook

log = logging.getLogger(__name__)

FAULT_MARKER = "fault_fired"
FAULT_KINDS = ("exit", "sigterm", "nan")


class FaultSwitch(Hook):
    def __init__(self, step: int, local_dir: Path, *, kind: str = "exit", model: torch.nn.Module | None = None,
                 wait_seconds: float = 120.0) -> None:
        if kind not in FAULT_KINDS:
            raise ValueError(f"fault kind {kind!r}: choose one of {list(FAULT_KINDS)}")
        if kind == "nan" and model is None:
            raise ValueError("the 'nan' fault needs the model")
        self.step = step
        self.kind = kind
        self.model = model
        self.marker = Path(local_dir) / FAULT_MARKER
        self.wait_seconds = wait_seconds
        self._saved: tuple[torch.nn.Parameter, torch.Tensor] | None = None

    def before_step(self, step: int) -> None:
        if self._saved is not None:  # the poisoned step is over: put the weight back
            param, value = self._saved
            with torch.no_grad():
                param.copy_(value)
            self._saved = None
            return
        if step != self.step or self.marker.exists():
            return
        self.marker.parent.mkdir(parents=True, exist_ok=True)
        self.marker.write_text(str(step))
        log.error("fault switch (%s) before step %d on this rank (test-only)", self.kind, step + 1)
        if self.kind == "exit":
            os._exit(17)
        elif self.kind == "sigterm":
            self._sigterm()
        else:
            param = next(p for p in self.model.parameters() if p.dtype.is_floating_point)
            self._saved = (param, param.detach().clone())
            with torch.no_grad():
                param.view(-1)[0] = float("nan")

    def _sigterm(self) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        # the handler runs in the main thread, maybe a moment later; wait for it (bounded) so the
        # step boundary the loop stops at is the next one
        done = threading.Event()
        for _ in range(int(self.wait_seconds * 10)):
            if stop_requested():
                return
            done.wait(0.1)
        log.error("SIGTERM sent but no stop request seen after %.0f s: is the stop handler installed?",
                  self.wait_seconds)
