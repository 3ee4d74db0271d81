"""Drawings of inputs, predictions and targets: per-task images and prediction grids.

Every task is drawn by its own ``TASKS[t].draw`` (depth colour-mapped, normals as RGB,
segmentation through a palette), so adding a task adds its drawing here for free. Inputs are
numpy arrays in the loader's layout (``[3, H, W]`` ImageNet-normalised RGB, targets in target
units); outputs are ``uint8 [H, W, 3]`` images.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from mult.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize_rgb
from mult.tasks import get_task

INVALID_COLOUR = np.array([48, 48, 48], dtype=np.uint8)  # target pixels without a label
SEPARATOR = 2  # pixels of white between grid cells


@dataclass
class GridSample:
    """One sample kept for a prediction grid, at the model's resolution.

    ``rgb`` is ``float32 [3, H, W]`` ImageNet-normalised; ``preds[t]`` is ``[C, H, W]`` (logits
    for segmentation); ``targets[t]`` is ``[C, H, W]`` or ``int64 [H, W]``; ``valid[t]`` is
    ``bool [H, W]``.
    """

    key: str
    rgb: np.ndarray
    preds: dict[str, np.ndarray] = field(default_factory=dict)
    targets: dict[str, np.ndarray] = field(default_factory=dict)
    valid: dict[str, np.ndarray] = field(default_factory=dict)


def normalize_image(image: np.ndarray) -> np.ndarray:
    """``uint8 [H, W, 3]`` -> ``float32 [3, H, W]`` ImageNet-normalised exactly as the loader
    normalises training inputs."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {image.shape}")
    return normalize_rgb(image)


def denormalize(rgb: np.ndarray) -> np.ndarray:
    """``float32 [3, H, W]`` ImageNet-normalised -> ``uint8 [H, W, 3]``."""
    if rgb.ndim != 3 or rgb.shape[0] != 3:
        raise ValueError(f"expected a normalised image [3, H, W], got shape {rgb.shape}")
    values = rgb.transpose(1, 2, 0) * IMAGENET_STD + IMAGENET_MEAN
    return (np.clip(values, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def draw_task(task: str, values: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """One task's prediction or target (target units, ``[C, H, W]`` or ``[H, W]`` class ids)
    -> ``uint8 [H, W, 3]``; pixels outside ``valid`` (``bool [H, W]``) are painted dark grey."""
    image = np.ascontiguousarray(get_task(task).draw(np.asarray(values)))
    if valid is not None:
        if valid.shape != image.shape[:2]:
            raise ValueError(f"{task}: valid mask {valid.shape} does not match image {image.shape[:2]}")
        image = image.copy()
        image[~valid] = INVALID_COLOUR
    return image


MIN_CELL = 128  # grid cells are enlarged (nearest, whole factors) to at least this many pixels


def _enlarge(cell: np.ndarray, min_side: int) -> np.ndarray:
    """Nearest-neighbour up-scaling by the smallest whole factor that makes the shorter side
    at least ``min_side``: each model pixel stays a visible square, nothing is invented."""
    factor = max(1, -(-min_side // min(cell.shape[:2])))
    return np.repeat(np.repeat(cell, factor, axis=0), factor, axis=1) if factor > 1 else cell


def _tile(rows: Sequence[Sequence[np.ndarray]], min_cell: int = MIN_CELL) -> np.ndarray:
    """Cells ``uint8 [h, w, 3]`` (all the same size) -> one image with white separators, each
    cell enlarged to at least ``min_cell`` pixels a side."""
    rows = [[_enlarge(cell, min_cell) for cell in row] for row in rows]
    h, w = rows[0][0].shape[:2]
    ncols = max(len(r) for r in rows)
    out = np.full(
        (len(rows) * (h + SEPARATOR) - SEPARATOR, ncols * (w + SEPARATOR) - SEPARATOR, 3),
        255,
        dtype=np.uint8,
    )
    for i, row in enumerate(rows):
        for j, cell in enumerate(row):
            if cell.shape[:2] != (h, w):
                raise ValueError(f"grid cell ({i}, {j}) is {cell.shape[:2]}, expected {(h, w)}")
            y, x = i * (h + SEPARATOR), j * (w + SEPARATOR)
            out[y : y + h, x : x + w] = cell
    return out


def prediction_grid(task: str, samples: Sequence[GridSample]) -> np.ndarray:
    """Rows = samples; columns = input | prediction | target. Returns ``uint8 [rows*H, 3*W, 3]``
    (plus separators; H, W enlarged to at least :data:`MIN_CELL`). Every sample must carry ``task``."""
    if not samples:
        raise ValueError(f"{task}: a prediction grid needs at least one sample")
    rows = []
    for s in samples:
        if task not in s.preds or task not in s.targets:
            raise ValueError(f"sample {s.key!r} has no prediction or target for {task!r}")
        rows.append(
            [
                denormalize(s.rgb),
                draw_task(task, s.preds[task]),
                draw_task(task, s.targets[task], s.valid.get(task)),
            ]
        )
    return _tile(rows)


def save_png(path: str | Path, image: np.ndarray) -> Path:
    """Write ``uint8 [H, W, 3]`` as PNG, creating parent directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(image)).save(path, format="PNG")
    return path


def write_grids(
    out_dir: str | Path, set_label: str, samples: Sequence[GridSample], tasks: Sequence[str]
) -> list[Path]:
    """One grid PNG per task: ``{out_dir}/{set_label}_{task}.png``. Returns the paths written."""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in set_label)
    return [save_png(Path(out_dir) / f"{safe}_{task}.png", prediction_grid(task, samples)) for task in tasks]
