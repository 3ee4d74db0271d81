"""Losses and loss weighting: hand-computed values on tiny tensors, rotate-loss properties,
the non-finite error, and the learned weightings (uncertainty, DWA)."""

from __future__ import annotations

import math

import pytest
import torch

from mult.config import load_config
from mult.losses import masked_l1, rotate_l1, segmentation_ce
from mult.tasks import TASK_NAMES, TASKS, task_losses
from mult.weighting import LossCombiner, build_loss_combiner, describe_losses


def _batch(tasks=TASK_NAMES, b=2, h=6, w=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    preds, targets, valid = {}, {}, {}
    for task in tasks:
        spec = TASKS[task]
        preds[task] = torch.randn(b, spec.channels, h, w, generator=gen, requires_grad=True)
        if spec.kind == "classification":
            targets[task] = torch.randint(0, spec.channels, (b, h, w), generator=gen)
        else:
            targets[task] = torch.randn(b, spec.channels, h, w, generator=gen)
        valid[task] = torch.rand(b, h, w, generator=gen) > 0.2
    return preds, targets, valid


# -- masked L1 ----------------------------------------------------------------------------
def test_masked_l1_hand_computed_and_ignores_invalid_garbage():
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], requires_grad=True)
    target = torch.tensor([[[[0.0, float("nan")], [0.0, 0.0]]]])
    valid = torch.tensor([[[True, False], [True, True]]])
    loss = masked_l1(pred, target, valid)
    assert loss.item() == pytest.approx(8.0 / 3.0)
    loss.backward()
    assert torch.equal(pred.grad, torch.tensor([[[[1 / 3, 0.0], [1 / 3, 1 / 3]]]]))


def test_normalize_all_divides_by_every_pixel():
    """loss.normalize=all (the task-grouping code: l1 * mask, then the mean over everything):
    the same error sums as "valid", divided by every pixel and channel."""
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    target = torch.tensor([[[[0.0, float("nan")], [0.0, 0.0]]]])
    valid = torch.tensor([[[True, False], [True, True]]])
    assert masked_l1(pred, target, valid, normalize="all").item() == pytest.approx(8.0 / 4.0)
    # rotate: sample 0 has 1 valid pixel of 4 with error 3 at every shift; sample 1 none
    pred2 = torch.full((2, 1, 2, 2), 3.0)
    valid2 = torch.tensor([[[True, False], [False, False]], [[False, False], [False, False]]])
    target2 = torch.zeros(2, 1, 2, 2)
    assert rotate_l1(pred2, target2, valid2).item() == pytest.approx(3.0)  # mean over samples with pixels
    assert rotate_l1(pred2, target2, valid2, normalize="all").item() == pytest.approx((3.0 / 4 + 0.0) / 2)
    labels = torch.tensor([[[0, 1], [2, 1]]])
    logits = torch.randn(1, 3, 2, 2)
    assert segmentation_ce(logits, labels, normalize="all").item() == pytest.approx(
        segmentation_ce(logits, labels).item())  # cross-entropy: labelled pixels in both
    with pytest.raises(ValueError, match=r"loss.normalize: 'mean' is not allowed"):
        masked_l1(pred, target, valid, normalize="mean")


def test_normalize_reaches_the_task_losses_from_the_config():
    cfg = load_config(None, ["tasks=[normal]", "loss.normalize=all"])
    preds, targets, valid = _batch(["normal"])
    got = task_losses(preds, targets, valid, cfg.tasks, cfg.loss.normalize)["normal"]
    assert got.item() == pytest.approx(masked_l1(preds["normal"], targets["normal"], valid["normal"],
                                                 normalize="all").item())
    assert got.item() < task_losses(preds, targets, valid, cfg.tasks)["normal"].item()  # 20 % masked


def test_masked_l1_without_valid_pixels_is_zero_and_differentiable():
    pred = torch.randn(2, 1, 3, 3, requires_grad=True)
    loss = masked_l1(pred, torch.zeros(2, 1, 3, 3), torch.zeros(2, 3, 3, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(pred.grad, torch.zeros_like(pred))


@pytest.mark.parametrize(
    "pred_shape, target_shape, valid_shape",
    [
        ((1, 1, 4, 4), (1, 1, 4, 5), (1, 4, 4)),
        ((1, 1, 4, 4), (1, 1, 4, 4), (1, 4, 5)),
        ((1, 4, 4), (1, 4, 4), (1, 4, 4)),
    ],
)
def test_dense_losses_reject_mismatched_shapes(pred_shape, target_shape, valid_shape):
    for fn in (masked_l1, rotate_l1):
        with pytest.raises(ValueError, match="must"):
            fn(
                torch.zeros(pred_shape),
                torch.zeros(target_shape),
                torch.ones(valid_shape, dtype=torch.bool),
            )


# -- rotate loss --------------------------------------------------------------------------
def test_rotate_equals_masked_l1_when_no_shift_helps():
    gen = torch.Generator().manual_seed(1)
    # A rough target (std 10) with small noise on the prediction: any shift misaligns the
    # target by far more than the noise, so the unshifted comparison wins for every sample.
    target = 10.0 * torch.randn(2, 1, 8, 8, generator=gen)
    pred = target + 0.1 * torch.randn(2, 1, 8, 8, generator=gen)
    valid = torch.ones(2, 8, 8, dtype=torch.bool)
    valid[:, 0, :3] = False  # same count in both samples: per-sample mean == pooled mean
    assert rotate_l1(pred, target, valid).item() == pytest.approx(
        masked_l1(pred, target, valid).item(), rel=1e-6
    )


def test_rotate_is_lower_for_a_prediction_shifted_by_one_pixel():
    gen = torch.Generator().manual_seed(2)
    target = torch.randn(1, 1, 6, 6, generator=gen)
    pred = torch.cat([target[:, :, :1], target[:, :, :-1]], dim=2)  # pred[y] = target[y - 1]
    rotate = rotate_l1(pred, target).item()
    plain = masked_l1(pred, target).item()
    # The best shift reads pred[y + 1] = target[y]; only the last row (edge-replicated) errs.
    expected = (target[0, 0, -1] - target[0, 0, -2]).abs().sum().item() / 36.0
    assert rotate == pytest.approx(expected, rel=1e-6)
    assert rotate < plain / 2


def test_rotate_picks_the_best_shift_per_sample_and_passes_gradient():
    gen = torch.Generator().manual_seed(3)
    target = torch.randn(2, 1, 5, 5, generator=gen)
    pred = target.clone()
    pred[0] = torch.cat(
        [target[0, :, :, :1], target[0, :, :, :-1]], dim=2
    )  # sample 0: shifted in x
    pred[1] = target[1] + 0.5  # sample 1: no shift helps a constant offset
    pred.requires_grad_(True)
    loss = rotate_l1(pred, target)
    sample0 = (target[0, 0, :, -1] - target[0, 0, :, -2]).abs().sum().item() / 25.0
    assert loss.item() == pytest.approx((sample0 + 0.5) / 2, rel=1e-5)
    loss.backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0


def test_rotate_skips_samples_without_valid_pixels():
    pred, target = torch.ones(2, 1, 3, 3), torch.zeros(2, 1, 3, 3)
    valid = torch.zeros(2, 3, 3, dtype=torch.bool)
    valid[1] = True
    pred[0] = 100.0
    assert rotate_l1(pred, target, valid).item() == pytest.approx(1.0)
    assert rotate_l1(pred, target, torch.zeros_like(valid)).item() == 0.0


# -- cross-entropy ------------------------------------------------------------------------
def test_segmentation_ce_hand_computed_ignores_label_zero_and_invalid():
    logits = torch.tensor(
        [[[[2.0, 0.0, 5.0]], [[0.0, 1.0, 5.0]], [[0.0, 0.0, 5.0]]]]
    )  # [1, 3, 1, 3]
    labels = torch.tensor([[[1, 2, 0]]])  # third pixel: "uncertain"
    expected = (
        -math.log(math.exp(0) / (math.exp(2) + 2)) - math.log(math.exp(0) / (1 + math.e + 1))
    ) / 2
    assert segmentation_ce(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    valid = torch.tensor([[[True, False, True]]])
    only_first = -math.log(1 / (math.exp(2) + 2))
    assert segmentation_ce(logits, labels, valid).item() == pytest.approx(only_first, rel=1e-6)


def test_segmentation_ce_rejects_labels_out_of_range():
    with pytest.raises(ValueError, match=r"0\.\.2"):
        segmentation_ce(torch.zeros(1, 3, 2, 2), torch.full((1, 2, 2), 3))
    with pytest.raises(ValueError, match="torch.long"):
        segmentation_ce(torch.zeros(1, 3, 2, 2), torch.ones(1, 2, 2, dtype=torch.int32))


# -- task_losses ----------------------------------------------------------------------------
@pytest.mark.parametrize("task", TASK_NAMES)
def test_task_losses_every_task_is_finite_and_differentiable(task):
    preds, targets, valid = _batch([task])
    losses = task_losses(preds, targets, valid, [task])
    assert set(losses) == {task} and losses[task].dim() == 0 and torch.isfinite(losses[task])
    losses[task].backward()
    assert preds[task].grad.abs().sum() > 0


def test_task_losses_dispatch_and_skip_absent_targets():
    preds, targets, valid = _batch()
    del targets["normal"]
    losses = task_losses(preds, targets, valid, TASK_NAMES)
    assert "normal" not in losses and len(losses) == 5
    t = "keypoints2d"
    assert losses[t].item() == pytest.approx(masked_l1(preds[t], targets[t], valid[t]).item())
    t = "depth_zbuffer"
    assert losses[t].item() == pytest.approx(rotate_l1(preds[t], targets[t], valid[t]).item())
    t = "segment_semantic"
    assert losses[t].item() == pytest.approx(
        segmentation_ce(preds[t], targets[t], valid[t], 0).item()
    )


def test_task_losses_errors():
    preds, targets, valid = _batch(["normal"])
    with pytest.raises(KeyError, match="no prediction"):
        task_losses({}, targets, valid, ["normal"])
    with pytest.raises(KeyError, match="unknown task"):
        task_losses(preds, targets, valid, ["normals"])


# -- combiner: fixed ----------------------------------------------------------------------
def _losses(**values):
    return {t: torch.tensor(v, requires_grad=True) for t, v in values.items()}


def test_fixed_combiner_total_and_details():
    combiner = LossCombiner(["depth_zbuffer", "normal"], {"normal": 2.0})
    total, details = combiner(_losses(depth_zbuffer=0.5, normal=0.25))
    assert total.item() == pytest.approx(0.5 + 2 * 0.25)
    assert details == pytest.approx(
        {
            "loss/total": 1.0,
            "loss/depth_zbuffer": 0.5,
            "weight/depth_zbuffer": 1.0,
            "loss/normal": 0.25,
            "weight/normal": 2.0,
        }
    )
    # a task absent from the batch is simply not summed
    total, details = combiner(_losses(normal=0.25))
    assert total.item() == pytest.approx(0.5) and "loss/depth_zbuffer" not in details


def test_combiner_rejects_bad_configuration():
    with pytest.raises(ValueError, match="not combined"):
        LossCombiner(["normal"], {"depth_zbuffer": 1.0})
    with pytest.raises(ValueError, match="finite and >= 0"):
        LossCombiner(["normal"], {"normal": -1.0})
    with pytest.raises(ValueError, match=r"choose from \['dwa', 'fixed', 'uncertainty'\]"):
        LossCombiner(["normal"], weighting="gradnorm")
    with pytest.raises(ValueError, match="dwa_temperature"):
        LossCombiner(["normal"], weighting="dwa", dwa_temperature=0.0)
    combiner = LossCombiner(["normal"])
    with pytest.raises(ValueError, match="no task losses"):
        combiner({})
    with pytest.raises(ValueError, match="not combined"):
        combiner(_losses(reshading=1.0))


@pytest.mark.parametrize("weighting", ["fixed", "uncertainty", "dwa"])
def test_non_finite_total_is_returned_and_described_naming_every_task(weighting):
    """The combiner returns a non-finite total (the step decides on every rank together what
    to do); :func:`describe_losses` words it for the error message."""
    combiner = LossCombiner(["depth_zbuffer", "normal", "reshading"], weighting=weighting)
    total, details = combiner(_losses(depth_zbuffer=0.75, normal=float("nan"), reshading=float("inf")))
    assert not torch.isfinite(total)
    message = describe_losses(details)
    assert message.startswith("total=nan")
    for part in ("depth_zbuffer=0.75", "normal=nan", "reshading=inf"):
        assert part in message


# -- combiner: uncertainty ----------------------------------------------------------------
def test_uncertainty_every_parameter_gets_a_gradient_even_for_absent_tasks():
    tasks = ["segment_semantic", "depth_zbuffer", "normal"]
    combiner = LossCombiner(tasks, weighting="uncertainty")
    losses = _losses(segment_semantic=2.0, depth_zbuffer=0.5)
    total, details = combiner(losses)
    total.backward()
    grad = combiner.strategy.log_vars.grad
    # d/ds of e^{-s} L + s/2 at s=0: 0.5 - L (classification); 0.5 * (1 - L) (regression)
    assert grad.tolist() == pytest.approx([0.5 - 2.0, 0.5 * (1 - 0.5), 0.0])
    assert all(loss.grad is not None for loss in losses.values())
    assert details["weight/segment_semantic"] == 1.0 and details["weight/depth_zbuffer"] == 0.5
    assert details["log_var/normal"] == 0.0


def test_uncertainty_learns_the_kendall_optimum():
    # Minimising w (c e^{-s} L + s/2) over s gives s* = log(2 c L): log L for regression
    # (c = 1/2), log 2L for classification (c = 1); the effective weight becomes 1 / (2L).
    combiner = LossCombiner(
        ["segment_semantic", "depth_zbuffer", "normal"], {"normal": 3.0}, weighting="uncertainty"
    )
    values = {"segment_semantic": 0.5, "depth_zbuffer": 4.0, "normal": 0.25}
    optimiser = torch.optim.SGD(combiner.parameters(), lr=0.3)
    for _ in range(300):
        optimiser.zero_grad()
        total, details = combiner({t: torch.tensor(v) for t, v in values.items()})
        total.backward()
        optimiser.step()
    log_vars = combiner.strategy.log_vars.detach().tolist()
    assert log_vars == pytest.approx([math.log(1.0), math.log(4.0), math.log(0.25)], abs=1e-3)
    assert details["weight/depth_zbuffer"] == pytest.approx(1 / 8, rel=1e-3)
    assert details["weight/normal"] == pytest.approx(3.0 / 0.5, rel=1e-3)  # static weight kept
    # the state (the log-variances) round-trips
    clone = LossCombiner(
        ["segment_semantic", "depth_zbuffer", "normal"], {"normal": 3.0}, weighting="uncertainty"
    )
    clone.load_state_dict(combiner.state_dict())
    assert torch.equal(clone.strategy.log_vars, combiner.strategy.log_vars)


# -- combiner: DWA --------------------------------------------------------------------------
def test_dwa_weights_follow_the_loss_ratio_and_checkpoint():
    tasks = ["depth_zbuffer", "normal"]
    combiner = LossCombiner(tasks, {"normal": 2.0}, weighting="dwa", dwa_temperature=2.0)
    batch = _losses(depth_zbuffer=1.0, normal=1.0)
    assert combiner(batch)[1]["weight/depth_zbuffer"] == 1.0
    combiner.end_epoch({"depth_zbuffer": 2.0, "normal": 2.0})
    assert combiner(batch)[1]["dwa_factor/normal"] == 1.0  # one epoch: no ratio yet
    combiner.end_epoch({"depth_zbuffer": 1.0, "normal": 2.0})  # depth halves, normal stalls
    _, details = combiner(batch)
    ea, eb = math.exp(0.5 / 2.0), math.exp(1.0 / 2.0)
    assert details["dwa_factor/depth_zbuffer"] == pytest.approx(2 * ea / (ea + eb), rel=1e-6)
    assert details["dwa_factor/normal"] == pytest.approx(2 * eb / (ea + eb), rel=1e-6)
    assert details["weight/normal"] == pytest.approx(2.0 * 2 * eb / (ea + eb), rel=1e-6)
    assert details["weight/normal"] > 2.0 and details["weight/depth_zbuffer"] < 1.0

    restored = LossCombiner(tasks, {"normal": 2.0}, weighting="dwa")
    restored.load_state_dict(combiner.state_dict())
    assert restored(batch)[1] == pytest.approx(details)
    restored.end_epoch({"depth_zbuffer": 1.0, "normal": 1.0})  # history kept: ratios 1 and 0.5
    assert restored.strategy.factors[0] > restored.strategy.factors[1]


def test_dwa_end_epoch_validates_input_and_tolerates_a_missing_task():
    combiner = LossCombiner(["depth_zbuffer", "normal", "reshading"], weighting="dwa")
    with pytest.raises(ValueError, match=r"\['segment_semantic'\] that are not combined"):
        combiner.end_epoch({"depth_zbuffer": 1.0, "segment_semantic": 1.0})
    with pytest.raises(ValueError, match="finite mean losses > 0"):
        combiner.end_epoch({"depth_zbuffer": 1.0, "normal": float("nan")})
    combiner.end_epoch({"depth_zbuffer": 4.0, "normal": 1.0, "reshading": 1.0})
    combiner.end_epoch({"depth_zbuffer": 2.0, "normal": 1.0})  # no reshading labels this epoch
    ratios = torch.tensor([0.5, 1.0, 1.0])  # reshading's unknown ratio counts as 1
    expected = 3 * torch.softmax(ratios / 2.0, dim=0)
    assert combiner.strategy.factors.tolist() == pytest.approx(expected.tolist(), rel=1e-6)


def test_build_loss_combiner_from_config():
    cfg = load_config(
        "configs/cpu-small.yaml", ["loss.weighting=uncertainty", "loss_weights.normal=2.5"]
    )
    combiner = build_loss_combiner(cfg)
    assert combiner.tasks == tuple(cfg.tasks) and combiner.weighting == "uncertainty"
    assert (
        combiner.weights["normal"] == 2.5
        and combiner.weights["reshading"] == TASKS["reshading"].default_weight
    )
    assert sum(p.numel() for p in combiner.parameters()) == len(cfg.tasks)
