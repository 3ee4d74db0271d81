"""Metrics against hand-computed values, the exact reduce (split == whole, also through a real
two-process gloo all_reduce), Delta-m and the baselines file."""

from __future__ import annotations

import json
import math
import multiprocessing

import pytest
import torch

from mult.accumulators import (
    NORMAL_HIST_BIN_DEG,
    DepthAccumulator,
    L1Accumulator,
    NormalAccumulator,
    SegmentationAccumulator,
)
from mult.encodings import DEPTH_UNITS_PER_METRE
from mult.metrics import MetricSuite, delta_m, relative_change
from mult.training.plan import load_baselines
from mult.tasks import TASK_NAMES, TASKS, task_losses


def _batches(n, b=2, h=6, w=6, seed=0, tasks=TASK_NAMES):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        preds, targets, valid = {}, {}, {}
        for task in tasks:
            spec = TASKS[task]
            preds[task] = torch.randn(b, spec.channels, h, w, generator=gen)
            if spec.kind == "classification":
                targets[task] = torch.randint(0, spec.channels, (b, h, w), generator=gen)
            else:
                targets[task] = torch.randn(b, spec.channels, h, w, generator=gen)
            valid[task] = torch.rand(b, h, w, generator=gen) > 0.2
        out.append((preds, targets, valid))
    return out


def _depth_target(metres):
    """Metres -> depth target units (the inverse of depth_from_target), float64."""
    return (torch.as_tensor(metres, dtype=torch.float64) * DEPTH_UNITS_PER_METRE - 1500.0) / 1000.0


# -- segmentation ---------------------------------------------------------------------------
def test_segmentation_hand_computed():
    acc = SegmentationAccumulator(num_classes=3, ignore_index=0)
    labels = torch.tensor([[[1, 1, 2, 0, 2]]])
    predicted = torch.tensor([[[1, 2, 2, 1, 0]]])
    valid = torch.tensor([[[True, True, True, True, False]]])
    acc.update(predicted, labels, valid)
    # scored: (1->1), (1->2), (2->2). IoU_1 = 1/2, IoU_2 = 1/2; 2 of 3 correct
    assert acc.compute() == pytest.approx({"miou": 50.0, "pixel_acc": 200.0 / 3.0})
    # logits give the same result through argmax
    logits = torch.nn.functional.one_hot(predicted, 3).permute(0, 3, 1, 2).float()
    acc2 = SegmentationAccumulator(num_classes=3)
    acc2.update(logits, labels, valid)
    assert torch.equal(acc.state(), acc2.state())


def test_segmentation_miou_skips_classes_never_seen_and_rejects_bad_labels():
    acc = SegmentationAccumulator(num_classes=4)
    acc.update(torch.tensor([[[1, 1]]]), torch.tensor([[[1, 1]]]))
    assert acc.compute() == {"miou": 100.0, "pixel_acc": 100.0}  # classes 2, 3 absent: not averaged
    with pytest.raises(ValueError, match=r"labels must lie in 0\.\.3"):
        acc.update(torch.tensor([[[1]]]), torch.tensor([[[7]]]))
    with pytest.raises(ValueError, match="4 channels"):
        acc.update(torch.zeros(1, 3, 1, 1), torch.tensor([[[1]]]))


# -- depth ---------------------------------------------------------------------------------
def test_depth_hand_computed_in_metres_with_scale_invariant_variants():
    acc = DepthAccumulator()
    target_m = [[1.0, 2.0, 4.0, 3.0], [1.0, 2.0, 4.0, 0.0]]  # last pixels: invalid / zero depth
    pred_m = [[2.0, 2.0, 2.0, 99.0], [2.0, 4.0, 8.0, 5.0]]  # image 2 = 2 x target
    valid = torch.tensor([[True, True, True, False], [True, True, True, True]])
    acc.update(
        _depth_target(pred_m)[:, None, None], _depth_target(target_m)[:, None, None], valid[:, None]
    )
    got = acc.compute()
    # image 1: |e| = 1, 0, 2; rel = 1, 0, .5; ratio 2, 1, 2.  image 2: |e| = 1, 2, 4; rel = 1, 1, 1
    # scale-invariant: image 1 medians 2/2 -> unchanged; image 2 scaled by 1/2 -> exact
    expected = {
        "l1_m": 10 / 6,
        "abs_rel": 4.5 / 6,
        "sq_rel": 9 / 6,  # (p - t)^2 / t: 1, 0, 1 and 1, 2, 4
        "rmse_m": math.sqrt(26 / 6),
        "log_rmse": math.sqrt(5 / 6) * math.log(2),  # |ln p - ln t|: ln 2, 0, ln 2 and ln 2 x 3
        "delta1": 100 / 6,
        "delta2": 100 / 6,
        "delta3": 100 / 6,
        "si_abs_rel": 1.5 / 6,
        "si_rmse_m": math.sqrt(5 / 6),
        "si_delta1": 400 / 6,
    }
    assert got == pytest.approx(expected, rel=1e-9)


def test_depth_thresholds_and_log_error():
    """delta_k counts ratios below 1.25^k: 1.2 passes all three, 1.5 delta2 and delta3, 1.9
    delta3 only (1.25^3 = 1.953), 3.0 none."""
    acc = DepthAccumulator()
    pred = [[1.2, 1.5, 1.9, 3.0]]
    acc.update(_depth_target(pred)[:, None, None], _depth_target([[1.0, 1.0, 1.0, 1.0]])[:, None, None])
    got = acc.compute()
    assert (got["delta1"], got["delta2"], got["delta3"]) == pytest.approx((25.0, 50.0, 75.0))
    assert got["sq_rel"] == pytest.approx((0.04 + 0.25 + 0.81 + 4.0) / 4, rel=1e-9)
    logs = [math.log(p) ** 2 for p in pred[0]]
    assert got["log_rmse"] == pytest.approx(math.sqrt(sum(logs) / 4), rel=1e-9)


def test_depth_clamps_predictions_before_ratios():
    acc = DepthAccumulator()
    acc.update(_depth_target([[-5.0]])[:, None, None], _depth_target([[2.0]])[:, None, None])
    got = acc.compute()
    assert got["abs_rel"] == pytest.approx((2.0 - 1e-3) / 2.0) and math.isfinite(got["si_abs_rel"])


# -- normals --------------------------------------------------------------------------------
def _rotated(degrees, length=1.0):
    """A vector at ``degrees`` from (0, 0, -1), in the x-z plane."""
    r = math.radians(degrees)
    return [length * math.sin(r), 0.0, -length * math.cos(r)]


def test_normals_hand_computed():
    acc = NormalAccumulator()
    angles = [0.0, 10.0, 20.0, 90.0, 180.0]
    pred = torch.tensor(
        [_rotated(a, length=0.5 + i) for i, a in enumerate(angles)] + [_rotated(45.0)],
        dtype=torch.float64,
    )
    target = torch.tensor([[0.0, 0.0, -1.0]] * 6, dtype=torch.float64)
    valid = torch.tensor([True] * 5 + [False])
    acc.update(pred.T[None, :, None], target.T[None, :, None], valid[None, None])
    got = acc.compute()
    assert got["mean_angle"] == pytest.approx(60.0, rel=1e-9)
    assert got["median_angle"] == pytest.approx(20.0, abs=NORMAL_HIST_BIN_DEG)
    assert got["within_11_25"] == pytest.approx(40.0)
    assert got["within_22_5"] == pytest.approx(60.0)
    assert got["within_30"] == pytest.approx(60.0)


def test_normal_median_resolution_on_many_angles():
    acc = NormalAccumulator()
    angles = torch.linspace(0.0, 50.0, 1001)
    vectors = torch.tensor([_rotated(float(a)) for a in angles], dtype=torch.float64)
    target = torch.tensor([[0.0, 0.0, -1.0]], dtype=torch.float64).expand(len(angles), 3)
    acc.update(vectors.T[None, :, None], target.T[None, :, None])
    assert acc.compute()["median_angle"] == pytest.approx(25.0, abs=NORMAL_HIST_BIN_DEG)


# -- L1 -------------------------------------------------------------------------------------
def test_l1_hand_computed():
    acc = L1Accumulator()
    acc.update(
        torch.tensor([[[[1.0, 3.0]]]]),
        torch.tensor([[[[0.0, 0.0]]]]),
        torch.tensor([[[True, False]]]),
    )
    acc.update(torch.tensor([[[[2.0, 2.0]]]]), torch.tensor([[[[0.0, 0.0]]]]))
    assert acc.compute() == {"l1": pytest.approx(5.0 / 3.0)}


# -- the suite ------------------------------------------------------------------------------
@pytest.mark.parametrize("task", TASK_NAMES)
def test_suite_reports_exactly_the_task_table_metrics(task):
    suite = MetricSuite([task])
    ((preds, targets, valid),) = _batches(1, tasks=[task])
    suite.update(preds, targets, valid)
    got = suite.compute()[task]
    assert set(got) == {m.name for m in TASKS[task].metrics}
    assert all(math.isfinite(v) for v in got.values())
    assert isinstance(TASKS[task].accumulator(), type(suite.accumulators[task]))


def test_suite_loss_is_the_batch_size_weighted_mean_and_absent_tasks_are_left_out():
    suite = MetricSuite(["normal", "reshading"])
    batches = _batches(2, tasks=["normal"])
    losses = []
    for preds, targets, valid in batches:
        losses.append(task_losses(preds, targets, valid, ["normal"])["normal"].item())
        suite.update(preds, targets, valid)  # losses computed by the suite
    suite.update(
        *_batches(1, b=4, tasks=["normal"], seed=5)[0], losses={"normal": torch.tensor(10.0)}
    )
    got = suite.compute()
    assert set(got) == {"normal"}
    assert got["normal"]["loss"] == pytest.approx((2 * losses[0] + 2 * losses[1] + 4 * 10.0) / 8)
    with pytest.raises(KeyError, match="no prediction"):
        suite.update({}, batches[0][1], batches[0][2])


def test_split_states_sum_to_the_whole():
    batches = _batches(4)
    whole, first, second = (MetricSuite(TASK_NAMES) for _ in range(3))
    for i, batch in enumerate(batches):
        whole.update(*batch)
        (first if i < 2 else second).update(*batch)
    merged = MetricSuite(TASK_NAMES)
    merged.load_state(first.state() + second.state())
    assert torch.allclose(merged.state(), whole.state(), rtol=1e-13, atol=0)
    got, want = merged.compute(), whole.compute()
    assert got.keys() == want.keys()
    for task in want:
        assert got[task] == pytest.approx(want[task], rel=1e-12), task
    # counts, confusion matrix and histogram are integers: exactly equal
    assert got["segment_semantic"] == want["segment_semantic"]
    assert got["normal"]["median_angle"] == want["normal"]["median_angle"]


def test_state_round_trip_and_size_check():
    suite = MetricSuite(["depth_zbuffer", "normal"])
    suite.update(*_batches(1, tasks=["depth_zbuffer", "normal"])[0])
    clone = MetricSuite(["depth_zbuffer", "normal"])
    clone.load_state(suite.state())
    assert clone.compute() == suite.compute()
    with pytest.raises(ValueError, match="expected"):
        clone.load_state(torch.zeros(3, dtype=torch.float64))
    suite.reduce_()  # no process group: a no-op
    assert clone.compute() == suite.compute()
    suite.reset()
    assert suite.compute() == {}


def _reduce_worker(rank: int, store_path: str, queue) -> None:
    """One rank of a 2-process gloo group (FileStore, no network): update on its half, reduce."""
    torch.distributed.init_process_group(
        "gloo", store=torch.distributed.FileStore(store_path, 2), rank=rank, world_size=2
    )
    try:
        suite = MetricSuite(TASK_NAMES)
        for i, batch in enumerate(_batches(4)):
            if i % 2 == rank:
                suite.update(*batch)
        suite.reduce_()
        queue.put(
            (rank, suite.state().numpy())
        )  # numpy pickles by value; a tensor would share memory
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.timeout(180)
def test_all_reduce_across_two_processes_equals_one_process(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_reduce_worker, args=(r, str(tmp_path / "store"), queue))
        for r in range(2)
    ]
    for p in procs:
        p.start()
    try:
        states = dict(queue.get(timeout=150) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    whole = MetricSuite(TASK_NAMES)
    for batch in _batches(4):
        whole.update(*batch)
    assert (states[0] == states[1]).all()
    reduced = MetricSuite(TASK_NAMES)
    reduced.load_state(torch.from_numpy(states[0]))
    for task, values in whole.compute().items():
        assert reduced.compute()[task] == pytest.approx(values, rel=1e-12)


# -- delta-m and baselines -------------------------------------------------------------------
def test_delta_m_signs_and_value():
    baselines = {"segment_semantic": {"miou": 40.0}, "depth_zbuffer": {"l1_m": 1.0}}
    better = {"segment_semantic": {"miou": 50.0}, "depth_zbuffer": {"l1_m": 0.9}}
    worse = {"segment_semantic": {"miou": 30.0}, "depth_zbuffer": {"l1_m": 1.2}}
    tasks = ["segment_semantic", "depth_zbuffer"]
    assert delta_m(better, baselines, tasks) == pytest.approx((25.0 + 10.0) / 2)
    assert delta_m(worse, baselines, tasks) == pytest.approx((-25.0 - 20.0) / 2)
    assert delta_m(baselines, baselines, tasks) == 0.0


def test_relative_change_is_positive_when_better_whatever_the_sign():
    assert relative_change(0.8, 0.5, higher_is_better=True) == pytest.approx(60.0)
    assert relative_change(0.4, 0.5, higher_is_better=False) == pytest.approx(20.0)
    # a negative baseline: moving up is still better for a higher-is-better metric
    assert relative_change(-0.5, -1.0, higher_is_better=True) == pytest.approx(50.0)
    assert relative_change(-1.5, -1.0, higher_is_better=False) == pytest.approx(50.0)
    assert math.isnan(relative_change(1.0, 0.0, higher_is_better=True))


def test_delta_m_names_everything_missing():
    with pytest.raises(ValueError) as info:
        delta_m(
            {"normal": {"mean_angle": 20.0}},
            {"depth_zbuffer": {"l1_m": 0.0}},
            ["normal", "depth_zbuffer"],
        )
    message = str(info.value)
    for part in (
        "baselines lack normal.mean_angle",
        "metrics lack depth_zbuffer.l1_m",
        "depth_zbuffer.l1_m = 0.0",
    ):
        assert part in message


def test_load_baselines(tmp_path):
    path = tmp_path / "baselines.json"
    path.write_text(
        json.dumps({"normal": {"mean_angle": 20, "median_angle": 15.5}, "reshading": {"l1": 0.3}})
    )
    baselines = load_baselines(str(path), tasks=["normal", "reshading"])
    assert baselines == {
        "normal": {"mean_angle": 20.0, "median_angle": 15.5},
        "reshading": {"l1": 0.3},
    }
    with pytest.raises(ValueError, match=r"lack depth_zbuffer\.l1_m, edge_texture\.l1"):
        load_baselines(str(path), tasks=["normal", "depth_zbuffer", "edge_texture"])
    path.write_text('{"normal": {"mean_angle": "twenty"}}')
    with pytest.raises(ValueError, match="not a number"):
        load_baselines(str(path))
    path.write_text('{"depth": {"l1_m": 1.0}}')
    with pytest.raises(ValueError, match="unknown task 'depth'"):
        load_baselines(str(path))
    path.write_text('{"depth_zbuffer": {"absrel": 1.0}}')
    with pytest.raises(ValueError, match="unknown metric 'absrel'"):
        load_baselines(str(path))
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_baselines(str(path))
