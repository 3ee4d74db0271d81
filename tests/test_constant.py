"""The constant predictor: per-pixel medians and class frequencies, checked against numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mult.experiments.constant import ConstantPredictor, fit_constant
from mult.losses import masked_l1
from mult.tasks import get_task


def _batches(n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        depth = torch.rand(2, 1, 4, 5, generator=gen)
        valid = torch.rand(2, 4, 5, generator=gen) > 0.3
        labels = torch.randint(0, 4, (2, 4, 5), generator=gen)
        yield {"rgb": torch.zeros(2, 3, 4, 5),
               "targets": {"depth_zbuffer": depth, "segment_semantic": labels},
               "valid": {"depth_zbuffer": valid, "segment_semantic": torch.ones(2, 4, 5, dtype=torch.bool)}}


def test_per_pixel_median_over_valid_pixels_and_majority_class():
    batches = list(_batches(4, seed=0))
    model = fit_constant(batches, ["depth_zbuffer", "segment_semantic"], max_samples=7)
    assert model.samples == 7
    depth = torch.cat([b["targets"]["depth_zbuffer"] for b in batches])[:7].numpy()
    valid = torch.cat([b["valid"]["depth_zbuffer"] for b in batches])[:7].numpy()
    out = model(torch.zeros(3, 3, 4, 5))
    got = out["depth_zbuffer"][0, 0].numpy()
    for i in range(4):
        for j in range(5):
            values = depth[:, 0, i, j][valid[:, i, j]]
            if len(values):  # torch's median of an even count is the lower middle value
                assert got[i, j] == pytest.approx(np.sort(values)[(len(values) - 1) // 2])
    labels = torch.cat([b["targets"]["segment_semantic"] for b in batches])[:7].numpy()
    pred = out["segment_semantic"][0].argmax(0).numpy()
    ignore = get_task("segment_semantic").ignore_index
    for i in range(4):
        for j in range(5):
            counts = np.bincount(labels[:, i, j], minlength=get_task("segment_semantic").channels)
            counts[ignore] = -1
            assert counts[pred[i, j]] == counts.max()  # a majority class (ties: any of them)
    assert out["depth_zbuffer"].shape == (3, 1, 4, 5)


def test_median_beats_other_constants_on_its_own_data():
    batches = list(_batches(4, seed=1))
    model = fit_constant(batches, ["depth_zbuffer"])
    y = torch.cat([b["targets"]["depth_zbuffer"] for b in batches])
    valid = torch.cat([b["valid"]["depth_zbuffer"] for b in batches])
    best = masked_l1(model(torch.zeros(len(y), 3, 4, 5))["depth_zbuffer"], y, valid)
    for other in (y[valid.unsqueeze(1)].mean(), torch.tensor(0.5)):
        assert best <= masked_l1(other.expand_as(y), y, valid) + 1e-6


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="no samples"):
        fit_constant([], ["depth_zbuffer"])
    with pytest.raises(ValueError, match="no training sample has a normal target"):
        fit_constant(_batches(1, 0), ["normal"])
    with pytest.raises(ValueError, match="fitted at"):
        ConstantPredictor({"depth_zbuffer": torch.zeros(1, 4, 5)})(torch.zeros(1, 3, 8, 8))
