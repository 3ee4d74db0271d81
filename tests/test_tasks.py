"""The task table: raw -> physical -> target conversions with known values."""

from __future__ import annotations

import numpy as np
import pytest

from mult.encodings import depth_from_target
from mult.tasks import TASK_NAMES, TASKS, get_task


def test_table_has_the_six_tasks_with_consistent_entries():
    assert set(TASK_NAMES) == {
        "segment_semantic", "depth_zbuffer", "normal", "keypoints2d", "edge_texture", "reshading",
    }
    for spec in TASKS.values():
        assert spec.resize in ("nearest", "bilinear")
        assert callable(spec.loss)
        names = [m.name for m in spec.metrics]
        assert names[-1] == "loss"
        # the accumulator the table names computes exactly the task's metrics (besides loss)
        assert set(spec.accumulator().compute()) == set(names[:-1])
    assert TASKS["segment_semantic"].resize == "nearest"
    assert TASKS["segment_semantic"].file_domain == "segmentsemantic"


def test_unknown_task_lists_valid_names():
    with pytest.raises(KeyError, match="valid tasks: segment_semantic"):
        get_task("sky")


def test_depth_known_values():
    spec = TASKS["depth_zbuffer"]
    raw = np.array([[512, 65535], [1500, 8191]], dtype=np.uint16)
    metres = spec.to_physical(raw)
    assert metres[0, 0] == 1.0
    assert np.isnan(metres[0, 1])
    target, valid = spec.to_target(raw)
    assert target.shape == (1, 2, 2)
    assert valid.tolist() == [[True, False], [True, True]]
    assert target[0, 1, 0] == 0.0  # (1500 - 1500) / 1000
    assert depth_from_target(target[0, 0, 0]) == pytest.approx(1.0)


def test_normal_known_values():
    spec = TASKS["normal"]
    raw = np.array([[[128, 128, 255], [128, 128, 128]]], dtype=np.uint8)
    phys = spec.to_physical(raw)
    np.testing.assert_allclose(phys[0, 0], [0.0, 0.0, 1.0], atol=0.01)
    assert np.isnan(phys[0, 1]).all()
    target, valid = spec.to_target(raw)
    assert target.shape == (3, 1, 2)
    assert valid.tolist() == [[True, False]]


def test_segmentation_ignores_zero_and_rejects_out_of_range():
    spec = TASKS["segment_semantic"]
    labels, valid = spec.to_target(np.array([[0, 1, 17]], dtype=np.uint8))
    assert labels.dtype == np.int64 and labels.tolist() == [[0, 1, 17]]
    assert valid.tolist() == [[False, True, True]]
    with pytest.raises(ValueError, match="label 40 outside 0..17"):
        spec.to_target(np.array([[40]], dtype=np.uint8))


def test_affine_targets():
    kp, _ = TASKS["keypoints2d"].to_target(np.array([[50, 150]], dtype=np.uint16))
    np.testing.assert_allclose(kp[0], [[0.0, 1.0]])
    edge, _ = TASKS["edge_texture"].to_target(np.array([[718, 1788]], dtype=np.uint16))
    np.testing.assert_allclose(edge[0], [[0.0, 1.0]])
    rgb = np.full((1, 1, 3), 255, dtype=np.uint8)
    gray = np.full((1, 1), 255, dtype=np.uint8)
    a, _ = TASKS["reshading"].to_target(rgb)
    b, _ = TASKS["reshading"].to_target(gray)
    np.testing.assert_allclose(a, (1.0 - 0.4962) / 0.2846, rtol=1e-6)
    np.testing.assert_allclose(a, b)


@pytest.mark.parametrize("task", TASK_NAMES)
def test_draw_returns_rgb(task):
    spec = TASKS[task]
    values = np.zeros((spec.channels, 4, 5), dtype=np.float32)
    img = spec.draw(values)
    assert img.shape == (4, 5, 3) and img.dtype == np.uint8
