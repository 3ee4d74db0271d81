"""Drawings and prediction grids (mult.experiments.viz)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mult.encodings import NUM_SEMANTIC_CLASSES
from mult.tasks import TASKS
from mult.experiments.viz import (
    INVALID_COLOUR,
    MIN_CELL,
    SEPARATOR,
    GridSample,
    denormalize,
    draw_task,
    normalize_image,
    prediction_grid,
    write_grids,
)

H, W = 6, 5


def _values(task: str, rng: np.random.Generator) -> np.ndarray:
    spec = TASKS[task]
    if spec.kind == "classification":
        return rng.integers(0, NUM_SEMANTIC_CLASSES, size=(H, W))
    return rng.normal(size=(spec.channels, H, W)).astype(np.float32)


def test_normalize_roundtrip_is_exact():
    image = np.random.default_rng(0).integers(0, 256, size=(H, W, 3), dtype=np.uint8)
    x = normalize_image(image)
    assert x.shape == (3, H, W) and x.dtype == np.float32
    np.testing.assert_array_equal(denormalize(x), image)


@pytest.mark.parametrize("bad", [np.zeros((H, W)), np.zeros((H, W, 4))])
def test_normalize_rejects_non_rgb(bad):
    with pytest.raises(ValueError, match="RGB"):
        normalize_image(bad.astype(np.uint8))


@pytest.mark.parametrize("task", list(TASKS))
def test_draw_task_shapes_and_invalid_pixels(task):
    values = _values(task, np.random.default_rng(1))
    valid = np.ones((H, W), dtype=bool)
    valid[0, :] = False
    image = draw_task(task, values, valid)
    assert image.shape == (H, W, 3) and image.dtype == np.uint8
    assert (image[0] == INVALID_COLOUR).all()
    np.testing.assert_array_equal(image[1:], draw_task(task, values)[1:])


def test_draw_segment_logits_equal_labels():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(NUM_SEMANTIC_CLASSES, H, W))
    np.testing.assert_array_equal(draw_task("segment_semantic", logits), draw_task("segment_semantic", logits.argmax(0)))


def test_draw_normal_is_rgb_of_vector():
    values = np.zeros((3, H, W), dtype=np.float32)
    values[2] = -1.0  # facing the camera: (0, 0, -1) -> (128, 128, 0)
    image = draw_task("normal", values)
    assert (image == np.array([128, 128, 0], dtype=np.uint8)).all()


def _samples(n: int, tasks: list[str]) -> list[GridSample]:
    rng = np.random.default_rng(3)
    out = []
    for i in range(n):
        rgb = normalize_image(rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8))
        preds = {t: _values(t, rng) for t in tasks}
        targets = {t: _values(t, rng) for t in tasks}
        valid = {t: rng.random((H, W)) > 0.3 for t in tasks}
        out.append(GridSample(f"k{i}", rgb, preds, targets, valid))
    return out


def test_prediction_grid_layout():
    """Cells are enlarged by a whole factor to at least MIN_CELL pixels a side (nearest: every
    model pixel becomes a k x k square)."""
    samples = _samples(3, ["depth_zbuffer"])
    grid = prediction_grid("depth_zbuffer", samples)
    k = -(-MIN_CELL // min(H, W))
    h, w = k * H, k * W
    assert min(h, w) >= MIN_CELL and k > 1
    assert grid.shape == (3 * h + 2 * SEPARATOR, 3 * w + 2 * SEPARATOR, 3)

    def big(image):
        return image.repeat(k, axis=0).repeat(k, axis=1)

    s = samples[1]
    y = h + SEPARATOR
    np.testing.assert_array_equal(grid[y : y + h, :w], big(denormalize(s.rgb)))
    x = w + SEPARATOR
    np.testing.assert_array_equal(grid[y : y + h, x : x + w], big(draw_task("depth_zbuffer", s.preds["depth_zbuffer"])))
    x = 2 * (w + SEPARATOR)
    expected = draw_task("depth_zbuffer", s.targets["depth_zbuffer"], s.valid["depth_zbuffer"])
    np.testing.assert_array_equal(grid[y : y + h, x : x + w], big(expected))
    assert (grid[h : h + SEPARATOR] == 255).all()


def test_prediction_grid_errors():
    with pytest.raises(ValueError, match="at least one sample"):
        prediction_grid("normal", [])
    with pytest.raises(ValueError, match="no prediction"):
        prediction_grid("normal", _samples(1, ["depth_zbuffer"]))


def test_write_grids(tmp_path):
    tasks = list(TASKS)
    paths = write_grids(tmp_path, "taskonomy+blur2", _samples(2, tasks), tasks)
    assert [p.name for p in paths] == [f"taskonomy_blur2_{t}.png" for t in tasks]
    for p in paths:
        with Image.open(p) as img:
            k = -(-MIN_CELL // min(H, W))
            assert img.size == (3 * k * W + 2 * SEPARATOR, 2 * k * H + SEPARATOR)
