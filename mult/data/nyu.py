"""NYU Depth v2 (labeled subset): reader and conversion to the Taskonomy raw encodings.

The release is one HDF5 file, ``nyu_depth_v2_labeled.mat`` (MATLAB v7.3). MATLAB stores arrays
column-major, so h5py sees every axis reversed: ``images`` is ``(N, 3, 640, 480)`` uint8,
``depths`` ``(N, 640, 480)`` float32 metres and ``labels`` ``(N, 640, 480)`` uint16 (0 =
unlabeled, 1..894), i.e. ``[view, (channel,) column, row]``. Transposing the last axes gives the
upright 480-row x 640-column frame. ``splits.mat`` (MATLAB v5) holds 1-based ``trainNdxs`` and
``testNdxs``; ``classMapping40.mat`` maps the 894 classes to Gupta et al.'s 40.

The ``.mat`` is one file, so there are no per-view original bytes: each view's members are
lossless PNGs made from the arrays:

* ``rgb``: 8-bit RGB, 480 x 640 (scaled-down generated sets keep the 4:3 frame);
* ``depth_zbuffer``: 16-bit, Taskonomy's encoding ``round(metres * 512)``, 65535 where the depth
  is 0 or not finite;
* ``segment_nyu40``: 8-bit NYU40 ids 0..40 when ``classMapping40.mat`` is present, otherwise
  ``label_nyu894``: the 16-bit fine labels, kept so that nothing is lost.

Keys are ``nyu-{index:05d}`` with the 1-based MATLAB index that ``splits.mat`` uses.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from mult.data.label_maps import ClassMap40, load_class_map_40, nyu40_to_taskonomy
from mult.data.png import CorruptFileError, decode_png, encode_png
from mult.data.views import Member, View
from mult.encodings import DEPTH_UNITS_PER_METRE

log = logging.getLogger(__name__)

LABELED_MAT = "nyu_depth_v2_labeled.mat"
SPLITS_MAT = "splits.mat"
CLASS_MAP_MAT = "classMapping40.mat"
SPLITS = {"train": "trainNdxs", "test": "testNdxs"}
DEFAULT_GROUP_SIZE = 64
DEPTH_NONE = 65535


def depth_to_raw(metres: np.ndarray) -> np.ndarray:
    """Depth in metres ``[H, W]`` -> Taskonomy raw ``uint16 [H, W]`` (0/NaN/inf -> 65535)."""
    metres = np.asarray(metres, dtype=np.float64)
    valid = np.isfinite(metres) & (metres > 0)
    raw = np.full(metres.shape, DEPTH_NONE, dtype=np.uint16)
    raw[valid] = np.clip(np.round(metres[valid] * DEPTH_UNITS_PER_METRE), 1, DEPTH_NONE - 1)
    return raw


def read_splits(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """``splits.mat`` -> ``{"train": 1-based indices, "test": ...}`` (``int64 [n]``).

    Raises :class:`CorruptFileError` naming the file when it is unreadable or lacks a split.
    """
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    try:
        mat = loadmat(os.fspath(path))
    except (OSError, ValueError, TypeError, NotImplementedError, MatReadError) as exc:
        raise CorruptFileError(f"{path}: cannot read NYU splits ({exc})") from exc
    out = {}
    for split, var in SPLITS.items():
        if var not in mat:
            raise CorruptFileError(f"{path}: lacks {var!r} (expected trainNdxs and testNdxs)")
        idx = np.asarray(mat[var]).reshape(-1)
        if idx.size and (idx.min() < 1 or np.any(idx != np.round(idx))):
            raise CorruptFileError(f"{path}: {var} must hold 1-based integer indices")
        out[split] = idx.astype(np.int64)
    return out


class NYUReader:
    """Reads ``nyu_depth_v2_labeled.mat`` lazily, one view at a time.

    ``split`` is ``"train"``, ``"test"`` or ``None`` (every view); the split comes from
    ``split_file`` or ``{root}/splits.mat``. Groups are chunks of ``group_size`` views.
    """

    format = "nyu"
    # label_nyu894 (fine labels kept when the 40-class map is absent) is the segmentation's
    # source too, although to_raw yields no segment_semantic from it.
    domain_tasks: dict[str, str] = {"depth_zbuffer": "depth_zbuffer", "segment_nyu40": "segment_semantic",
                                    "label_nyu894": "segment_semantic"}

    def __init__(
        self,
        root: str | os.PathLike,
        split: str | None = None,
        split_file: str | os.PathLike | None = None,
        *,
        group_size: int = DEFAULT_GROUP_SIZE,
    ) -> None:
        self.root = Path(root)
        self.mat_path = self.root / LABELED_MAT
        if not self.mat_path.is_file():
            raise FileNotFoundError(f"NYU root {self.root}: no {LABELED_MAT} there")
        if split is not None and split not in SPLITS:
            raise ValueError(f"unknown NYU split {split!r}; valid splits: {', '.join(SPLITS)}, or None")
        if split is None and split_file is not None:
            raise ValueError("split_file given without split: name 'train' or 'test'")
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        self.group_size = group_size
        self.count, self.present = self._inspect()
        self.indices = self._select(split, split_file)
        class_map_path = self.root / CLASS_MAP_MAT
        self.class_map: ClassMap40 | None = None
        if class_map_path.is_file():
            self.class_map = load_class_map_40(class_map_path)
        elif "labels" in self.present:
            log.warning(
                "%s: no %s; keeping the 894-class labels as label_nyu894. Segmentation "
                "evaluation needs the 894->40 map file in the NYU root.", self.root, CLASS_MAP_MAT
            )

    def _inspect(self) -> tuple[int, set[str]]:
        """Open the file once: number of views and which datasets exist, with shapes checked."""
        h5py = _h5py()
        try:
            with h5py.File(self.mat_path, "r") as f:
                if "images" not in f:
                    raise CorruptFileError(f"{self.mat_path}: lacks the 'images' dataset")
                images = f["images"]
                if images.ndim != 4 or images.shape[1] != 3:
                    raise CorruptFileError(
                        f"{self.mat_path}: images has shape {images.shape}, expected (N, 3, W, H)"
                    )
                count, _, width, height = images.shape
                present = {"images"}
                for name in ("depths", "labels"):
                    if name not in f:
                        continue
                    if f[name].shape != (count, width, height):
                        raise CorruptFileError(
                            f"{self.mat_path}: {name} has shape {f[name].shape}, "
                            f"expected {(count, width, height)} to match images"
                        )
                    present.add(name)
        except OSError as exc:
            raise CorruptFileError(f"{self.mat_path}: not a readable MATLAB v7.3 file ({exc})") from exc
        return count, present

    def _select(self, split: str | None, split_file: str | os.PathLike | None) -> list[int]:
        if split is None:
            return list(range(1, self.count + 1))
        path = Path(split_file) if split_file is not None else self.root / SPLITS_MAT
        if not path.is_file():
            raise FileNotFoundError(f"NYU split {split!r} needs {path}, which does not exist")
        indices = read_splits(path)[split]
        if indices.size and indices.max() > self.count:
            raise CorruptFileError(
                f"{path}: {SPLITS[split]} refers to view {int(indices.max())}, "
                f"but {self.mat_path} has {self.count}"
            )
        return sorted(int(i) for i in indices)

    def tasks_found(self) -> list[str]:
        """``depth_zbuffer`` when the file has ``depths``, ``segment_semantic`` when it has ``labels``."""
        found = {"depths": "depth_zbuffer", "labels": "segment_semantic"}
        return [task for name, task in found.items() if name in self.present]

    def groups(self) -> list[str]:
        n = -(-len(self.indices) // self.group_size)
        return [f"chunk{g:04d}" for g in range(n)]

    def _group_indices(self, group: str) -> list[int]:
        groups = self.groups()
        if group not in groups:
            raise KeyError(f"unknown NYU group {group!r}; groups are chunk0000..chunk{len(groups) - 1:04d}")
        g = int(group[len("chunk"):])
        return self.indices[g * self.group_size : (g + 1) * self.group_size]

    def views(self, group: str) -> Iterator[View]:
        indices = self._group_indices(group)
        h5py = _h5py()
        try:
            f = h5py.File(self.mat_path, "r")
        except OSError as exc:
            raise CorruptFileError(f"{self.mat_path}: not a readable MATLAB v7.3 file ({exc})") from exc
        with f:
            for index in indices:
                yield self._view(f, index, group)

    def _view(self, f, index: int, group: str) -> View:
        i = index - 1  # MATLAB indices are 1-based
        try:
            rgb = np.ascontiguousarray(f["images"][i].transpose(2, 1, 0))
            depth = f["depths"][i].T if "depths" in self.present else None
            labels = f["labels"][i].T if "labels" in self.present else None
        except (OSError, ValueError, KeyError) as exc:
            raise CorruptFileError(f"{self.mat_path}: cannot read view {index} ({exc})") from exc
        members = {"rgb": Member("png", data=encode_png(rgb.astype(np.uint8)))}
        missing = []
        if depth is not None:
            members["depth_zbuffer"] = Member("png", data=encode_png(depth_to_raw(depth)))
        else:
            missing.append("depth_zbuffer")
        if labels is None:
            missing.append("segment_nyu40")
        elif self.class_map is not None:
            members["segment_nyu40"] = Member("png", data=encode_png(self.class_map.apply(labels)))
        else:
            members["label_nyu894"] = Member("png", data=encode_png(labels.astype(np.uint16)))
        return View(key=f"nyu-{index:05d}", group=group, members=members, missing=missing)


def _h5py():
    import h5py

    return h5py


def nyu_to_raw(members: dict[str, bytes], key: str) -> dict[str, np.ndarray]:
    """A view's members (domain -> PNG bytes) -> Taskonomy raw arrays.

    Returns ``"rgb"`` ``uint8 [H, W, 3]``, ``"depth_zbuffer"`` ``uint16 [H, W]`` when present and
    ``"segment_semantic"`` ``uint8 [H, W]`` (NYU40 mapped through
    :data:`mult.data.label_maps.NYU40_TO_TASKONOMY`) when ``segment_nyu40`` is present. A view
    that only has ``label_nyu894`` gets no segmentation (the 894->40 map was missing at
    conversion time). Raises :class:`CorruptFileError` naming ``key`` and the domain.
    """
    if "rgb" not in members:
        raise KeyError(f"{key}: no rgb member (has {', '.join(sorted(members)) or 'nothing'})")
    out = {"rgb": _decode(members, key, "rgb", np.uint8, 3)}
    if "depth_zbuffer" in members:
        out["depth_zbuffer"] = _decode(members, key, "depth_zbuffer", np.uint16, 2)
    if "segment_nyu40" in members:
        labels = _decode(members, key, "segment_nyu40", np.uint8, 2)
        try:
            out["segment_semantic"] = nyu40_to_taskonomy(labels)
        except ValueError as exc:
            raise CorruptFileError(f"{key}.segment_nyu40: {exc}") from exc
    elif "label_nyu894" in members:
        _warn_fine_labels_only()
    shapes = {k: v.shape[:2] for k, v in out.items()}
    if len(set(shapes.values())) > 1:
        raise CorruptFileError(f"{key}: members disagree on size: {shapes}")
    return out


@functools.lru_cache(maxsize=1)
def _warn_fine_labels_only() -> None:
    """Once per process: views with only 894-class labels carry no segmentation target."""
    log.warning("NYU views with only 894-class labels: no segment_semantic; convert with %s", CLASS_MAP_MAT)


def _decode(members: dict[str, bytes], key: str, domain: str, dtype: type, ndim: int) -> np.ndarray:
    name = f"{key}.{domain}.png"
    array = decode_png(members[domain], name)
    if array.dtype != dtype or array.ndim != ndim:
        raise CorruptFileError(
            f"{name}: expected {np.dtype(dtype).name} with {ndim} axes, got {array.dtype} {array.shape}"
        )
    return array
