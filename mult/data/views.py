"""What every dataset format hands the rest of the pipeline.

A format module (``mult.data.taskonomy``, ``.nyu``, ``.cocodoom``) provides:

* a reader class, built as ``Reader(root, split=None, split_file=None)``, with
  ``groups() -> list[str]`` (the units of parallel conversion: buildings, scenes, runs),
  ``views(group) -> Iterator[View]``, where each :class:`View` carries the bytes of its files,
  ``domain_tasks`` (member domain -> the task it labels) and ``tasks_found() -> list[str]``
  (the tasks this tree has labels for). The sharder keeps and counts members by task through
  these two: a domain that is neither ``rgb`` nor in ``domain_tasks`` (``mask_valid``,
  ``point_info``) is *auxiliary*, used when present and never missing;
* ``to_raw(members: dict[str, bytes], key: str) -> dict[str, np.ndarray]``, which turns a view's
  members (as stored in a shard: domain -> bytes) into ``"rgb"`` (``uint8 [H, W, 3]``),
  optionally ``"mask_valid"`` (``bool [H, W]``), and one array per task the format has labels
  for, **in that task's Taskonomy raw encoding** (what :attr:`mult.tasks.TaskSpec.to_target`
  takes). So shards keep each format's original bytes, and the loader decodes every format to
  the same targets.

The dataset table (:data:`mult.data.datasets.DATASETS`) names each format's reader and ``to_raw``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol


class MissingDomainError(KeyError):
    """A view lacks a domain that was asked for; the message names the view and the domain."""


@dataclass
class Member:
    """One file of a view: its bytes, or the path to read them from (read lazily)."""

    ext: str  # "png" or "json"
    data: bytes | None = None
    path: str | None = None

    def read(self) -> bytes:
        if self.data is None:
            if self.path is None:
                raise ValueError("a Member needs data or a path")
            self.data = Path(self.path).read_bytes()
        return self.data


@dataclass
class View:
    """One camera view with all its domains.

    ``key`` is unique within a dataset and contains no dots (webdataset splits member names on
    the first dot). ``missing`` lists the domains this format normally has that this view lacks.
    """

    key: str
    group: str
    members: dict[str, Member]
    missing: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if "." in self.key:
            raise ValueError(f"view key {self.key!r} contains a dot")


class Reader(Protocol):
    format: str
    domain_tasks: dict[str, str]

    def groups(self) -> list[str]: ...

    def tasks_found(self) -> list[str]: ...

    def views(self, group: str) -> Iterator[View]: ...
