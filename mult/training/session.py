"""What the training loop needs from whoever launched it, and the hooks it calls.

:func:`mult.training.loop.train_loop` talks to its launcher only through a :class:`Session`:
its rank, world size and device, the checkpoint to resume from, and where each report goes.
Ray Train's adapter is :class:`mult.launch.trainer.RaySession`; :class:`LocalSession` is the
one for a single process (tests, the ablation's Ray tasks) and for ranks started by
``torchrun`` (the DDP benchmark).

:class:`Hook` objects see the loop's steps and reports: rank 0's telemetry, the benchmark's
timers and the test-only fault switch are hooks, so the loop itself stays one loop.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch


class Session(Protocol):
    rank: int
    world_size: int
    device: torch.device

    def restored(self) -> contextlib.AbstractContextManager[Path | None]:
        """A local directory holding the checkpoint to resume from, or None."""

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        """Hand over one report (every rank, same number of times); ``checkpoint_dir`` is rank
        0's new checkpoint, or None."""

    def flush(self, metrics: dict[str, float]) -> None:
        """Return once the launcher has taken in every report so far (every rank calls it):
        before stopping, so that the last checkpoint is the one a restart gets."""


class LocalSession:
    """A session without Ray: one process, or one rank of a ``torchrun`` job.

    Reports are kept in memory (``reports``: how many, ``last``: the latest metrics); there is
    nothing to resume from unless ``resume_from`` names a checkpoint directory.
    """

    def __init__(self, device: torch.device | str = "cpu", *, rank: int = 0, world_size: int = 1,
                 resume_from: Path | None = None) -> None:
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)
        self.resume_from = resume_from
        self.reports = 0
        self.last: dict[str, float] = {}

    @classmethod
    def from_torchrun(cls) -> "LocalSession":
        """Join the process group ``torchrun`` describes (``RANK``, ``WORLD_SIZE``,
        ``LOCAL_RANK``): NCCL on CUDA, gloo on the CPU."""
        import torch.distributed as dist

        cuda = torch.cuda.is_available()
        dist.init_process_group("nccl" if cuda else "gloo")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local) if cuda else torch.device("cpu")
        return cls(device, rank=dist.get_rank(), world_size=dist.get_world_size())

    @contextlib.contextmanager
    def restored(self) -> Iterator[Path | None]:
        yield self.resume_from

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        self.reports += 1
        self.last = dict(metrics)

    def flush(self, metrics: dict[str, float]) -> None:
        """Reports are taken in at once here."""


class Hook:
    """Called by the training loop; override what you need. Every rank runs its own hooks."""

    def before_step(self, step: int) -> None:
        """Before optimizer step ``step + 1`` starts (``step`` steps are done)."""

    def before_report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        """Just before a report; ``checkpoint_dir`` is set when this report carries a checkpoint."""

    def after_report(self, metrics: dict[str, Any], seconds: float) -> None:
        """Just after a report, with the seconds it blocked the loop."""

    def close(self) -> None:
        """When the loop ends, also on an error."""
