"""CocoDoom: reader and conversion to the Taskonomy raw encodings.

Layout of the release (Mahendran et al. 2016, "ResearchDoom and CocoDoom")::

    {root}/run{R}/map{MM}/rgb/{tic:06d}.png      320x200, palette PNG (Doom's 256 colours)
    {root}/run{R}/map{MM}/depth/{tic:06d}.png    16-bit gray, 64 x Doom map units, 65535 = sky
    {root}/run{R}/map{MM}/objects/{tic:06d}.png  8-bit RGB, object id = R + 256 G + 65536 B
    {root}/{run,map}[-full]-{train,val,test}.json   COCO annotation files (the splits)

Object ids at or above 2**23 are not objects: 2**23 sky, 2**23 + 1 floor or ceiling,
2**23 + 2 wall. The split JSONs list images by ``file_name`` (``run1/map01/rgb/000123.png``)
with ``id = R * 10**9 + MM * 10**7 + tic``. Run splits put run1/run2/run3 (different players,
same levels) in train/val/test; map splits put maps with ``(MM - 1) % 4`` in {0, 1} / 2 / 3 in
train/val/test. The ``-full`` files hold every frame, the others a subsample.

Depth convention (Doom units are not metres). A depth value ``v`` is ``v / 64`` map units
along the view axis (planar depth, like Taskonomy's z-buffer). We take DoomWiki's rough
"32 map units = 1 metre" (the player is 56 units tall), so ``metres = v / 2048`` and the
Taskonomy raw value ``round(metres * 512)`` is ``round(v / 4)``; 65535 (sky) stays 65535. The
scale is a convention, not a measurement: report CocoDoom depth with the scale-invariant
metrics (``si_*``), for which any global scale gives the same numbers.

Semantic labels: CocoDoom's classes (monsters, items) have no Taskonomy counterpart, so
``segment_semantic`` is 1 (background) on floor, ceiling and wall and 0 (ignored) elsewhere.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from mult.data.png import CorruptFileError, decode_png
from mult.data.views import Member, View

log = logging.getLogger(__name__)

DOMAINS = ("rgb", "depth", "objects")
DEPTH_UNITS_PER_MAP_UNIT = 64
MAP_UNITS_PER_METRE = 32  # DoomWiki's rough convention; see the module docstring
DEPTH_SKY = 65535
# Doom raw -> Taskonomy raw: v / 64 / 32 * 512 = v / 4.
DOOM_RAW_PER_TASKONOMY_RAW = DEPTH_UNITS_PER_MAP_UNIT * MAP_UNITS_PER_METRE // 512
ID_SKY = 2**23
ID_FLOOR_CEILING = 2**23 + 1
ID_WALL = 2**23 + 2

SPLIT_NAMES: tuple[str, ...] = tuple(
    f"{by}{full}-{part}"
    for by in ("run", "map")
    for full in ("", "-full")
    for part in ("train", "val", "test")
)
_FILE_RE = re.compile(r"^run(\d+)/map(\d\d)/rgb/(\d{6})\.png$")
_GROUP_RE = re.compile(r"^run(\d+)/map(\d\d)$")


def image_id(run: int, map_number: int, tic: int) -> int:
    """The COCO image id CocoDoom gives frame ``tic`` of ``run{run}/map{map_number}``."""
    return run * 10**9 + map_number * 10**7 + tic


def view_key(run: int, map_number: int, tic: int) -> str:
    return f"cocodoom-run{run}-map{map_number:02d}-{tic:06d}"


def decode_object_ids(objects: np.ndarray) -> np.ndarray:
    """Objects image ``uint8 [H, W, 3]`` (RGB) -> ids ``uint32 [H, W]`` = R + 256 G + 65536 B."""
    objects = np.asarray(objects)
    if objects.dtype != np.uint8 or objects.ndim != 3 or objects.shape[2] != 3:
        raise ValueError(f"objects image must be uint8 [H, W, 3], got {objects.dtype} {objects.shape}")
    o = objects.astype(np.uint32)
    return o[..., 0] + (o[..., 1] << 8) + (o[..., 2] << 16)


def encode_object_ids(ids: np.ndarray) -> np.ndarray:
    """The inverse of :func:`decode_object_ids`: ids ``[H, W]`` (< 2**24) -> ``uint8 [H, W, 3]``."""
    ids = np.asarray(ids).astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= 2**24):
        raise ValueError("object ids must lie in 0..2**24 - 1")
    return np.stack([ids & 255, (ids >> 8) & 255, (ids >> 16) & 255], axis=-1).astype(np.uint8)


def depth_to_raw(depth: np.ndarray) -> np.ndarray:
    """CocoDoom depth ``uint16 [H, W]`` -> Taskonomy raw ``uint16 [H, W]`` (see module docstring).

    ``round(v / 4)`` with halves rounded up, computed in integers; sky (65535) stays 65535.
    """
    depth = np.asarray(depth)
    if depth.dtype != np.uint16:
        raise ValueError(f"CocoDoom depth must be uint16, got {depth.dtype}")
    d = DOOM_RAW_PER_TASKONOMY_RAW
    raw = ((depth.astype(np.uint32) + d // 2) // d).astype(np.uint16)
    raw[depth == DEPTH_SKY] = DEPTH_SKY
    return raw


def segment_from_ids(ids: np.ndarray) -> np.ndarray:
    """Object ids ``[H, W]`` -> Taskonomy ``segment_semantic`` raw ``uint8 [H, W]``: 1 on
    floor/ceiling/wall, 0 (ignored) on sky and objects."""
    return np.isin(ids, (ID_FLOOR_CEILING, ID_WALL)).astype(np.uint8)


def load_coco(path: str | os.PathLike) -> dict[str, Any]:
    """Read a COCO JSON; :class:`CorruptFileError` naming the file if it is not one."""
    try:
        with open(path, "rb") as fh:
            doc = json.load(fh)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptFileError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise CorruptFileError(f"{path}: not a COCO annotation file (no 'images' list)")
    return doc


def parse_file_name(file_name: str, source: str = "<json>") -> tuple[int, int, int]:
    """``run1/map01/rgb/000123.png`` -> ``(1, 1, 123)``."""
    m = _FILE_RE.match(file_name)
    if m is None:
        raise CorruptFileError(
            f"{source}: image file_name {file_name!r} is not of the form "
            "run{R}/map{MM}/rgb/{tic:06d}.png"
        )
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


class CocoDoomReader:
    """Reads a CocoDoom tree; views keep the original PNG bytes (``rgb``, ``depth``, ``objects``).

    ``split``: ``None`` (every frame on disk), one of :data:`SPLIT_NAMES`, or the name of a COCO
    JSON file in ``root``; ``split_file``: the path of a COCO JSON anywhere (overrides
    ``split``). Groups are ``run{R}/map{MM}``.
    """

    format = "cocodoom"
    domain_tasks: dict[str, str] = {"depth": "depth_zbuffer", "objects": "segment_semantic"}

    def __init__(
        self,
        root: str | os.PathLike,
        split: str | None = None,
        split_file: str | os.PathLike | None = None,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"CocoDoom root {self.root} is not a directory")
        json_path = self._split_path(split, split_file)
        if json_path is None:
            self._tics = self._scan()
        else:
            self._tics = self._from_json(json_path)
        if not self._tics:
            raise FileNotFoundError(
                f"no CocoDoom frames found under {self.root}"
                + (f" for {json_path.name}" if json_path else " (expected run{R}/map{MM}/rgb/*.png)")
            )

    def _split_path(self, split: str | None, split_file: str | os.PathLike | None) -> Path | None:
        if split_file is not None:
            path = Path(split_file)
        elif split is None:
            return None
        elif split in SPLIT_NAMES:
            path = self.root / f"{split}.json"
        elif split.endswith(".json"):
            path = self.root / split
        else:
            raise ValueError(
                f"unknown CocoDoom split {split!r}; valid: {', '.join(SPLIT_NAMES)}, "
                "or the name of a COCO .json file in the root"
            )
        if not path.is_file():
            raise FileNotFoundError(f"CocoDoom split file {path} does not exist")
        return path

    def _scan(self) -> dict[str, list[int]]:
        tics: dict[str, set[int]] = {}
        for run_dir in sorted(self.root.glob("run*")):
            for map_dir in sorted(run_dir.glob("map*")):
                group = f"{run_dir.name}/{map_dir.name}"
                if not map_dir.is_dir() or not _GROUP_RE.match(group):
                    continue
                for domain in DOMAINS:
                    for png in (map_dir / domain).glob("*.png"):
                        if png.stem.isdigit() and len(png.stem) == 6:
                            tics.setdefault(group, set()).add(int(png.stem))
        return {g: sorted(t) for g, t in sorted(tics.items())}

    def _from_json(self, path: Path) -> dict[str, list[int]]:
        doc = load_coco(path)
        tics: dict[str, set[int]] = {}
        for entry in doc["images"]:
            if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str):
                raise CorruptFileError(f"{path}: an image entry lacks a file_name: {entry!r:.200}")
            run, map_number, tic = parse_file_name(entry["file_name"], str(path))
            tics.setdefault(f"run{run}/map{map_number:02d}", set()).add(tic)
        return {g: sorted(t) for g, t in sorted(tics.items())}

    def groups(self) -> list[str]:
        return list(self._tics)

    def tasks_found(self) -> list[str]:
        """Tasks whose folder (``depth``, ``objects``) exists under any of the groups read."""
        return [task for domain, task in self.domain_tasks.items()
                if any((self.root / group / domain).is_dir() for group in self._tics)]

    def views(self, group: str) -> Iterator[View]:
        if group not in self._tics:
            raise KeyError(f"unknown CocoDoom group {group!r}; groups: {', '.join(self._tics)}")
        m = _GROUP_RE.match(group)
        run, map_number = int(m.group(1)), int(m.group(2))
        for tic in self._tics[group]:
            members, missing = {}, []
            for domain in DOMAINS:
                path = self.root / group / domain / f"{tic:06d}.png"
                if path.is_file():
                    members[domain] = Member("png", path=str(path))
                else:
                    missing.append(domain)
            if missing:
                log.warning("%s/%s/%06d: missing %s", self.root, group, tic, ", ".join(missing))
            yield View(key=view_key(run, map_number, tic), group=group, members=members, missing=missing)


def cocodoom_to_raw(members: dict[str, bytes], key: str) -> dict[str, np.ndarray]:
    """A view's members -> ``"rgb"`` ``uint8 [H, W, 3]`` (palette expanded), and when present
    ``"depth_zbuffer"`` ``uint16 [H, W]`` (Taskonomy encoding, see module docstring) and
    ``"segment_semantic"`` ``uint8 [H, W]`` (from ``objects``). Raises
    :class:`CorruptFileError` naming ``key`` and the domain for undecodable or wrong-typed files.
    """
    if "rgb" not in members:
        raise KeyError(f"{key}: no rgb member (has {', '.join(sorted(members)) or 'nothing'})")
    out = {"rgb": _decode(members, key, "rgb", np.uint8, 3)}
    if "depth" in members:
        out["depth_zbuffer"] = depth_to_raw(_decode(members, key, "depth", np.uint16, 2))
    if "objects" in members:
        objects = _decode(members, key, "objects", np.uint8, 3)
        out["segment_semantic"] = segment_from_ids(decode_object_ids(objects))
    shapes = {k: v.shape[:2] for k, v in out.items()}
    if len(set(shapes.values())) > 1:
        raise CorruptFileError(f"{key}: members disagree on size: {shapes}")
    return out


def _decode(members: dict[str, bytes], key: str, domain: str, dtype: type, ndim: int) -> np.ndarray:
    name = f"{key}.{domain}.png"
    array = decode_png(members[domain], name)
    if array.dtype != dtype or array.ndim != ndim or (ndim == 3 and array.shape[2] != 3):
        raise CorruptFileError(
            f"{name}: expected {np.dtype(dtype).name} with {ndim} axes, got {array.dtype} {array.shape}"
        )
    return array
