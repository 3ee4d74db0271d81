"""Colour maps that turn one task's values into an image (``uint8 [H, W, 3]``).

The task table (:mod:`mult.tasks`) picks one drawing per task; :mod:`mult.experiments.viz`
lays the drawings out in grids. Values are in target units: ``[C, H, W]`` maps, or ``[H, W]`` class ids.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from mult.encodings import NUM_SEMANTIC_CLASSES


def colormap(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """A dependency-free perceptual-ish ramp (dark blue -> yellow)."""
    t = np.clip((values - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    r = np.clip(1.5 * t - 0.2, 0, 1)
    g = np.clip(1.2 * t, 0, 1) ** 0.8
    b = np.clip(0.6 - 0.8 * np.abs(t - 0.35), 0, 1)
    return (np.stack([r, g, b], axis=-1) * 255).astype(np.uint8)


def draw_scalar(lo: float, hi: float) -> Callable[[np.ndarray], np.ndarray]:
    """A one-channel map ``[1, H, W]`` or ``[H, W]`` through :func:`colormap` over ``[lo, hi]``."""

    def draw(values: np.ndarray) -> np.ndarray:
        return colormap(values.reshape(values.shape[-2:]), lo, hi)

    return draw


def draw_normal(values: np.ndarray) -> np.ndarray:
    """Normals ``[3, H, W]`` in [-1, 1] as RGB, the way the files store them."""
    rgb = (np.clip(values, -1, 1) + 1.0) / 2.0 * 255.0
    return rgb.transpose(1, 2, 0).round().astype(np.uint8)


def _palette(n: int) -> np.ndarray:
    rng = np.random.default_rng(7)
    pal = rng.integers(40, 255, size=(n, 3), dtype=np.uint8)
    pal[0] = 0
    pal[1] = (90, 90, 90)
    return pal


SEGMENT_PALETTE = _palette(NUM_SEMANTIC_CLASSES)


def draw_segment(values: np.ndarray) -> np.ndarray:
    """Class ids [H, W], or logits [C, H, W] (argmax taken)."""
    labels = values.argmax(axis=0) if values.ndim == 3 else values
    return SEGMENT_PALETTE[np.clip(labels, 0, NUM_SEMANTIC_CLASSES - 1)]
