"""Generate an NYU Depth v2 (labeled) tree in the real files' formats.

Writes, under ``out``:

* ``nyu_depth_v2_labeled.mat``: MATLAB v7.3 (HDF5 with MATLAB's 512-byte header and
  ``MATLAB_class`` attributes), axes reversed as MATLAB stores them: ``images`` ``(N, 3, W, H)``
  uint8, ``depths`` and ``rawDepths`` ``(N, W, H)`` float32 metres, ``labels`` ``(N, W, H)``
  uint16 (0..894), ``instances`` ``(N, W, H)`` uint8, and the cell arrays ``names`` (894 class
  names) and ``scenes`` (one scene name per view) as object references;
* ``splits.mat`` (MATLAB v5): 1-based ``trainNdxs``, ``testNdxs`` (column vectors of doubles),
  whole scenes on one side, as in the real split;
* ``classMapping40.mat`` (MATLAB v5): ``mapClass`` 1x894 (doubles, 1..40) and ``className``
  (1x40 cell).

The real frame is 640x480; ``size`` is the generated width (height ``size * 3 / 4``). Views are
rendered in the ``nyu`` scene style with the Kinect's field of view. Labels go Taskonomy id ->
NYU40 (the inverse of :data:`mult.data.label_maps.NYU40_TO_TASKONOMY`; classes without an
NYU40 counterpart become ``otherprop``) -> a fine id that the generated ``mapClass`` maps back,
so the reader's 894 -> 40 -> Taskonomy round trip reproduces every label NYU40 can express.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np

from mult.data.label_maps import NUM_NYU40, NUM_NYU894, NYU40_CLASSES, NYU40_TO_TASKONOMY
from mult.data.nyu import CLASS_MAP_MAT, LABELED_MAT, SPLITS_MAT
from mult.data.synth.render import render
from mult.data.synth.scene import make_scene, sample_camera
from mult.data.synth.styles import StyleParams
from mult.encodings import NUM_SEMANTIC_CLASSES

log = logging.getLogger(__name__)

# Kinect colour camera: fx = 518.86 px at 640 px wide (NYU toolbox's camera_params).
KINECT_FOV_RAD = 2.0 * math.atan(320.0 / 518.857901)
TRAIN_FRACTION = 795 / 1449  # the real split's share of training views
_FLOOR, _CEILING = 0, 1  # scene surface indices of the room planes; 2..5 are walls
MAT73_USERBLOCK = 512


def synthetic_map_class(seed: int = 1449) -> np.ndarray:
    """A generated ``mapClass``: fine class ``k`` (1..894) -> NYU40 id, ``int64 [894]``.

    Every NYU40 class gets 22 or 23 fine classes, shuffled, so fine id != NYU40 id in general
    (a reader that skips the map produces wrong labels, which the tests catch).
    """
    ids = np.arange(NUM_NYU894) % NUM_NYU40 + 1
    np.random.default_rng(seed).shuffle(ids)
    return ids


def taskonomy_to_nyu40_lut() -> np.ndarray:
    """Taskonomy ``segment_semantic`` id -> NYU40 id for object classes, ``uint8 [18]``.

    Classes NYU40 has (chair, bed, ...) map to it; the others to ``otherprop``; 0 and 1 to 0
    (room surfaces are labelled from the surface index instead: wall, floor, ceiling).
    """
    lut = np.full(NUM_SEMANTIC_CLASSES, NYU40_CLASSES.index("otherprop"), np.uint8)
    lut[:2] = 0
    for row in NYU40_TO_TASKONOMY:
        if row.taskonomy_id >= 2:
            lut[row.taskonomy_id] = row.nyu40_id
    return lut


def nyu40_labels(semantic: np.ndarray, surface: np.ndarray) -> np.ndarray:
    """Rendered Taskonomy ids and surface indices ``[H, W]`` -> NYU40 ids ``uint8 [H, W]``."""
    labels = taskonomy_to_nyu40_lut()[semantic]
    labels[surface == _FLOOR] = NYU40_CLASSES.index("floor")
    labels[surface == _CEILING] = NYU40_CLASSES.index("ceiling")
    labels[(surface >= 2) & (surface <= 5)] = NYU40_CLASSES.index("wall")
    labels[surface < 0] = 0
    return labels


def _fine_ids(map_class: np.ndarray) -> np.ndarray:
    """NYU40 id -> one fine id mapping to it (the first), ``uint16 [41]``; 0 -> 0."""
    fine = np.zeros(NUM_NYU40 + 1, np.uint16)
    for c in range(1, NUM_NYU40 + 1):
        fine[c] = int(np.flatnonzero(map_class == c)[0]) + 1
    return fine


def _frame_size(size: int) -> tuple[int, int]:
    if size < 8 or size % 4:
        raise ValueError(f"NYU size (frame width) must be a multiple of 4 and >= 8, got {size}")
    return size, size * 3 // 4


def write_nyu(out: Path, *, scenes: int, views: int, size: int, seed: int, style: StyleParams) -> None:
    """Write a generated NYUv2 labeled tree to ``out`` (see the module docstring).

    ``scenes`` rooms, ``views`` views each (N = scenes * views), frames ``size`` wide.
    """
    if scenes < 1 or views < 1:
        raise ValueError(f"scenes and views must be >= 1, got scenes={scenes}, views={views}")
    width, height = _frame_size(size)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    map_class = synthetic_map_class()
    fine = _fine_ids(map_class)
    n = scenes * views
    rng = np.random.default_rng(seed)
    scene_names = []
    mat_path = out / LABELED_MAT
    h5py = _h5py()
    with h5py.File(mat_path, "w", userblock_size=MAT73_USERBLOCK) as f:
        frame = (width, height)  # MATLAB's column-major layout: columns before rows
        ds = {
            "images": _matlab_dataset(f, "images", (n, 3, *frame), np.uint8),
            "depths": _matlab_dataset(f, "depths", (n, *frame), np.float32),
            "rawDepths": _matlab_dataset(f, "rawDepths", (n, *frame), np.float32),
            "labels": _matlab_dataset(f, "labels", (n, *frame), np.uint16),
            "instances": _matlab_dataset(f, "instances", (n, *frame), np.uint8),
        }
        i = 0
        for s in range(scenes):
            scene = make_scene(rng, style)
            for _ in range(views):
                cam = sample_camera(scene, rng, fov_rad=KINECT_FOV_RAD, width=width, height=height)
                r = render(scene, cam)
                depth = np.where(np.isfinite(r.depth), r.depth, 0.0).astype(np.float32)
                ds["images"][i] = r.rgb.transpose(2, 1, 0)
                ds["depths"][i] = depth.T
                ds["rawDepths"][i] = _kinect_raw(depth, rng).T
                ds["labels"][i] = fine[nyu40_labels(r.semantic, r.surface)].T
                ds["instances"][i] = np.clip(r.instance, 0, 255).astype(np.uint8).T
                scene_names.append(f"synthetic_{s + 1:04d}")
                i += 1
        _write_cellstr(f, "names", [_fine_name(k, map_class) for k in range(1, NUM_NYU894 + 1)])
        _write_cellstr(f, "scenes", scene_names)
    _write_mat73_header(mat_path)
    _write_splits(out / SPLITS_MAT, scenes, views)
    _write_class_map(out / CLASS_MAP_MAT, map_class)
    log.info("wrote %d NYU views (%dx%d) in %d scenes to %s", n, width, height, scenes, out)


_MATLAB_CLASSES = {np.uint8: "uint8", np.uint16: "uint16", np.float32: "single", np.float64: "double"}


def _matlab_dataset(f, name: str, shape: tuple[int, ...], dtype: type):
    """An HDF5 dataset as MATLAB v7.3 writes a numeric array (one chunk per view)."""
    d = f.create_dataset(name, shape, dtype, chunks=(1, *shape[1:]))
    d.attrs["MATLAB_class"] = np.bytes_(_MATLAB_CLASSES[dtype])
    return d


def _kinect_raw(depth: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``rawDepths``: the depth before the toolbox's inpainting, with Kinect-like holes (0)."""
    raw = depth.copy()
    raw[rng.random(depth.shape) < 0.03] = 0.0
    raw[depth > 10.0] = 0.0  # beyond the sensor's range
    return raw


def _fine_name(k: int, map_class: np.ndarray) -> str:
    return f"{NYU40_CLASSES[int(map_class[k - 1])]} {k}"


def _write_cellstr(f, name: str, strings: list[str]) -> None:
    """A MATLAB ``len x 1`` cell of char arrays, as v7.3 stores it (references into ``#refs#``)."""
    h5py = _h5py()
    refs = f.require_group("#refs#")
    ref_type = h5py.special_dtype(ref=h5py.Reference)
    cell = f.create_dataset(name, (1, len(strings)), dtype=ref_type)
    for j, text in enumerate(strings):
        codes = np.frombuffer(text.encode("utf-16-le"), "<u2")[:, None]  # a 1 x L char array
        chars = refs.create_dataset(f"{name}_{j}", data=codes)
        chars.attrs["MATLAB_class"] = np.bytes_("char")
        cell[0, j] = chars.ref
    cell.attrs["MATLAB_class"] = np.bytes_("cell")


_CREATED = time.strftime("%a %b %d %H:%M:%S %Y", time.gmtime(0))  # fixed: same seed, same bytes


def _write_mat73_header(path: Path) -> None:
    """MATLAB's 128-byte text header in the HDF5 userblock (what makes it a v7.3 MAT-file)."""
    text = f"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: {_CREATED} HDF5 schema 1.00 ."
    header = text.encode("ascii").ljust(116, b" ") + b"\x00" * 8 + b"\x00\x02" + b"IM"
    with open(path, "r+b") as fh:
        fh.write(header)


def _savemat_v5(path: Path, variables: dict[str, np.ndarray]) -> None:
    """``scipy.io.savemat`` with MATLAB's header text and a fixed date (reproducible bytes)."""
    from scipy.io import savemat

    savemat(path, variables)
    text = f"MATLAB 5.0 MAT-file, Platform: GLNXA64, Created on: {_CREATED}"
    with open(path, "r+b") as fh:
        fh.write(text.encode("ascii").ljust(116, b" "))


def _write_splits(path: Path, scenes: int, views: int) -> None:
    n_train = min(max(1, round(scenes * TRAIN_FRACTION)), scenes - 1) if scenes > 1 else 1
    train = [s * views + v + 1 for s in range(n_train) for v in range(views)]
    test = [s * views + v + 1 for s in range(n_train, scenes) for v in range(views)]
    _savemat_v5(
        path,
        {
            "trainNdxs": np.array(train, np.float64).reshape(-1, 1),
            "testNdxs": np.array(test, np.float64).reshape(-1, 1),
        },
    )


def _write_class_map(path: Path, map_class: np.ndarray) -> None:
    names = np.empty((1, NUM_NYU40), dtype=object)
    for c in range(NUM_NYU40):
        names[0, c] = NYU40_CLASSES[c + 1]
    _savemat_v5(path, {"mapClass": map_class.astype(np.float64).reshape(1, -1), "className": names})


def _h5py():
    import h5py

    return h5py
