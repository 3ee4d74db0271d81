"""Taskonomy and Replica readers (the :mod:`mult.data.views` contract) and their ``to_raw``.

Layouts, detected per domain folder:

* plain Taskonomy: ``{root}/{folder}/{building}/point_{p}_view_{v}_domain_{domain}.{png,json}``;
* omnidata: ``{root}/{folder}/taskonomy/{building}/...`` and ``{root}/{folder}/replica/{scene}/...``.

The semantic folder is ``segment_semantic`` but its files say ``domain_segmentsemantic``; both
spellings are accepted in file names. Members are keyed by folder name (``segment_semantic``),
which is also the task name. View keys are ``{building}-p{point}-v{view}``.

Taskonomy's split tables (``train_val_test_*.csv``: ``id,train,val,test`` with 0/1 flags) are
parsed whatever their line endings (the originals use ``\\r``).
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from mult.data.png import CorruptFileError, decode_png
from mult.data.views import Member, MissingDomainError, View
from mult.tasks import INPUT_DOMAIN, MASK_DOMAIN, POINT_INFO_DOMAIN, TASKS

log = logging.getLogger(__name__)

TASK_FOLDERS: tuple[str, ...] = tuple(spec.folder for spec in TASKS.values())
DOMAINS: tuple[str, ...] = (INPUT_DOMAIN, *TASK_FOLDERS, MASK_DOMAIN, POINT_INFO_DOMAIN)
SPLITS: tuple[str, ...] = ("train", "val", "test")
# omnidata's components: a domain folder holding one of these is in omnidata's layout.
OMNIDATA_COMPONENTS = frozenset({"taskonomy", "replica", "replica_gso", "hypersim", "blended_mvg",
                                 "clevr_simple", "clevr_complex", "habitat2"})
_FILE_RE = re.compile(r"^point_(\d+)_view_(\d+)_domain_([A-Za-z0-9_]+)\.(png|json)$")


def _file_domains(folder: str) -> set[str]:
    """Domain strings accepted in a folder's file names (the segmentsemantic quirk)."""
    names = {folder}
    if folder in TASKS:
        names.add(TASKS[folder].file_domain)
    return names


# ------------------------------------------------------------------------------------------------
# Split CSVs.
# ------------------------------------------------------------------------------------------------
def read_split_csv(path: str | os.PathLike) -> dict[str, list[str]]:
    """Parse a Taskonomy split table into ``{"train": [...], "val": [...], "test": [...]}``.

    Accepts ``\\r``, ``\\r\\n`` and ``\\n`` line endings, a UTF-8 BOM, blank lines, and the
    columns in any order (the building column is ``id``, or the first column when no header
    names it). Flags are 0/1 (``1.0``, ``true`` also accepted).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file {path} does not exist")
    text = path.read_bytes().decode("utf-8-sig")
    rows = [line.split(",") for line in re.split(r"\r\n|\r|\n", text) if line.strip()]
    if not rows:
        raise ValueError(f"split file {path} is empty")
    header = [cell.strip().lower() for cell in rows[0]]
    missing = [s for s in SPLITS if s not in header]
    if missing:
        raise ValueError(
            f"split file {path}: header {rows[0]!r} lacks column(s) {missing}; "
            f"expected columns id,{','.join(SPLITS)}"
        )
    id_col = header.index("id") if "id" in header else 0
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    for lineno, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise ValueError(f"split file {path} line {lineno}: {len(row)} fields, header has {len(header)}")
        name = row[id_col].strip()
        if not name:
            raise ValueError(f"split file {path} line {lineno}: empty building id")
        for split in SPLITS:
            if _parse_flag(row[header.index(split)], path, lineno):
                out[split].append(name)
    return out


def _parse_flag(cell: str, path: Path, lineno: int) -> bool:
    value = cell.strip().lower()
    if value in ("1", "1.0", "true"):
        return True
    if value in ("0", "0.0", "false", ""):
        return False
    raise ValueError(f"split file {path} line {lineno}: flag {cell!r} is not 0 or 1")


def find_split_file(root: Path) -> Path | None:
    """``{root}/splits/train_val_test_full.csv``, else the only ``train_val_test_*.csv`` found."""
    for candidate in (root / "splits" / "train_val_test_full.csv", root / "train_val_test_full.csv"):
        if candidate.is_file():
            return candidate
    found = sorted(root.glob("splits/train_val_test_*.csv")) + sorted(root.glob("train_val_test_*.csv"))
    if len(found) > 1:
        raise ValueError(f"several split files under {root}: {[str(p) for p in found]}; pass split_file")
    return found[0] if found else None


# ------------------------------------------------------------------------------------------------
# Readers.
# ------------------------------------------------------------------------------------------------
class TaskonomyReader:
    """Views of a Taskonomy tree (plain or omnidata layout), one group per building.

    ``split`` (``train``/``val``/``test``) keeps the buildings the split table assigns to it;
    ``split_file`` defaults to :func:`find_split_file`. ``domains`` narrows the folders a view is
    expected to have (default: all of :data:`DOMAINS`); absent ones are listed in
    ``View.missing`` and logged once per building.
    """

    format = "taskonomy"
    component = "taskonomy"  # omnidata's level between the domain folder and the building
    domain_tasks: dict[str, str] = {spec.folder: name for name, spec in TASKS.items()}

    def __init__(
        self,
        root: str | os.PathLike,
        split: str | None = None,
        split_file: str | os.PathLike | None = None,
        domains: Sequence[str] | None = None,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.format} root {self.root} is not a directory")
        self.domains = tuple(domains) if domains is not None else DOMAINS
        unknown = [d for d in self.domains if d not in DOMAINS]
        if unknown:
            raise ValueError(f"unknown domain(s) {unknown}; valid domains: {', '.join(DOMAINS)}")
        self.bases = self._find_bases()
        if not self.bases:
            raise FileNotFoundError(
                f"no {self.format} domain folders under {self.root} (looked for {', '.join(DOMAINS)}, "
                f"as {{domain}}/{{building}}/ or {{domain}}/{self.component}/{{building}}/)"
            )
        self.layout = "omnidata" if any(b.name == self.component for b in self.bases.values()) else "plain"
        absent = [d for d in self.domains if d not in self.bases]
        if absent:  # Taskonomy's own release has no mask_valid; downloads may leave domains out
            log.info("%s tree %s has no %s folder(s)", self.format, self.root, ", ".join(absent))
        self.split = split
        self.buildings = self._select(split, split_file)

    def _find_bases(self) -> dict[str, Path]:
        """Folder -> the directory that holds its building folders."""
        bases = {}
        for folder in DOMAINS:
            top = self.root / folder
            if not top.is_dir():
                continue
            nested = top / self.component
            if nested.is_dir():
                bases[folder] = nested
            elif not any((top / c).is_dir() for c in OMNIDATA_COMPONENTS):
                bases[folder] = top  # plain layout
            # else: an omnidata tree holding other components only
        return bases

    def _select(self, split: str | None, split_file: str | os.PathLike | None) -> list[str]:
        on_disk = sorted({p.name for base in self.bases.values() for p in base.iterdir() if p.is_dir()})
        if split is None:
            return on_disk
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)} (or None for all)")
        path = Path(split_file) if split_file is not None else find_split_file(self.root)
        if path is None:
            raise FileNotFoundError(
                f"split {split!r} asked for but no split file given and none found under {self.root}"
            )
        listed = read_split_csv(path)[split]
        absent = sorted(set(listed) - set(on_disk))
        if absent:
            log.info("%d building(s) of split %s are not on disk under %s (e.g. %s)",
                     len(absent), split, self.root, absent[0])
        return [b for b in on_disk if b in set(listed)]

    def groups(self) -> list[str]:
        return list(self.buildings)

    def tasks_found(self) -> list[str]:
        """Tasks whose folder holds any of the selected buildings (in task-table order). A
        download without some domains (omnidata's domain choices) simply lacks them."""
        return [self.domain_tasks[f] for f in TASK_FOLDERS if f in self.bases and f in self.domains
                and any((self.bases[f] / b).is_dir() for b in self.buildings)]

    def _scan(self, group: str) -> dict[tuple[int, int], dict[str, Member]]:
        found: dict[tuple[int, int], dict[str, Member]] = {}
        for folder in self.domains:
            base = self.bases.get(folder)
            directory = base / group if base is not None else None
            if directory is None or not directory.is_dir():
                continue
            accepted = _file_domains(folder)
            for entry in os.scandir(directory):
                match = _FILE_RE.match(entry.name)
                if match is None or match.group(3) not in accepted:
                    log.debug("ignoring %s: not a %s view file", entry.path, folder)
                    continue
                view_id = (int(match.group(1)), int(match.group(2)))
                found.setdefault(view_id, {})[folder] = Member(ext=match.group(4), path=entry.path)
        return found

    def views(self, group: str) -> Iterator[View]:
        """Every view of building ``group``, ordered by (point, view)."""
        if group not in self.buildings:
            raise KeyError(f"unknown {self.format} group {group!r} under {self.root}")
        found = self._scan(group)
        missing_counts: Counter[str] = Counter()
        safe = group.replace(".", "_")
        for point, view in sorted(found):
            members = found[(point, view)]
            missing = [d for d in self.domains if d not in members]
            missing_counts.update(missing)
            yield View(f"{safe}-p{point}-v{view}", group, members, missing)
        # Warn about domains other buildings have; a folder absent from the whole tree was
        # logged once when the reader was built.
        missing_counts = Counter({d: n for d, n in missing_counts.items() if d in self.bases})
        if missing_counts:
            summary = ", ".join(f"{d} ({n})" for d, n in sorted(missing_counts.items()))
            log.warning("%s %s: %d view(s) lack domains: %s", self.format, group, len(found), summary)


class ReplicaReader(TaskonomyReader):
    """Views of a Replica tree in omnidata's layout (``{domain}/replica/{scene}/...``)."""

    format = "replica"
    component = "replica"


# ------------------------------------------------------------------------------------------------
# Members -> raw arrays.
# ------------------------------------------------------------------------------------------------
def _gray_channel(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.ndim == 3:
        if not (np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])):
            raise CorruptFileError(f"{name}: expected a gray image, got colour channels that differ")
        return arr[..., 0]
    return arr


def _rgb8(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[..., :3]
    if arr.ndim != 3 or arr.dtype != np.uint8:
        raise CorruptFileError(f"{name}: expected 8-bit RGB, got {arr.dtype} with shape {arr.shape}")
    return arr


def _decode_member(domain: str, data: bytes, name: str) -> np.ndarray:
    """One member's PNG -> its raw array, checked against the layout the task table gives."""
    arr = decode_png(data, name)
    if domain == INPUT_DOMAIN:
        return _rgb8(arr, name)
    if domain == MASK_DOMAIN:
        return _gray_channel(arr, name) > 0
    spec = TASKS[domain]
    if spec.png_layout == "rgb":
        return _rgb8(arr, name)
    if arr.dtype != (np.uint16 if spec.bit_depth == 16 else np.uint8):
        raise CorruptFileError(f"{name}: expected {'a 16' if spec.bit_depth == 16 else 'an 8'}-bit PNG, "
                               f"got {arr.dtype}")
    if spec.png_layout == "gray_or_rgb":
        return arr[..., :3] if arr.ndim == 3 else arr  # RGB with R=G=B, or gray in older files
    return _gray_channel(arr, name)


def taskonomy_to_raw(members: dict[str, bytes], key: str) -> dict[str, np.ndarray]:
    """A view's member bytes (folder -> bytes) -> exact raw arrays.

    Returns ``"rgb"`` ``uint8 [H, W, 3]``, ``"mask_valid"`` ``bool [H, W]`` when present, and per
    task present: ``depth_zbuffer``/``keypoints2d``/``edge_texture`` ``uint16 [H, W]``,
    ``normal`` ``uint8 [H, W, 3]``, ``segment_semantic`` ``uint8 [H, W]``, ``reshading``
    ``uint8 [H, W, 3]`` or ``[H, W]``. Other members (``point_info``) are ignored.
    Raises :class:`CorruptFileError` naming ``key.domain`` for undecodable or mis-typed files and
    for sizes that differ from the RGB's; :class:`MissingDomainError` when there is no ``rgb``.
    """
    if INPUT_DOMAIN not in members:
        raise MissingDomainError(f"{key}: view has no {INPUT_DOMAIN!r} member (has {sorted(members)})")
    out: dict[str, np.ndarray] = {}
    for domain in (INPUT_DOMAIN, MASK_DOMAIN, *TASK_FOLDERS):
        if domain not in members:
            continue
        name = f"{key}.{domain}"
        arr = _decode_member(domain, members[domain], name)
        if domain != INPUT_DOMAIN and arr.shape[:2] != out[INPUT_DOMAIN].shape[:2]:
            raise CorruptFileError(
                f"{name}: size {arr.shape[1]}x{arr.shape[0]} differs from the rgb's "
                f"{out[INPUT_DOMAIN].shape[1]}x{out[INPUT_DOMAIN].shape[0]}"
            )
        out[domain] = arr
    return out
