"""mult.training.optim and mult.training.step: optimizer/schedule, the train step (accumulation,
clipping), the evaluation loop, precision."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from mult.config import OptimConfig
from mult.losses import NonFiniteLossError
from mult.metrics import MetricSuite
from mult.training import optim as engine_optim
from mult.training import step as engine
from mult.weighting import LossCombiner

TASKS = ["normal", "depth_zbuffer", "segment_semantic"]
CHANNELS = {"normal": 3, "depth_zbuffer": 1, "segment_semantic": 18}


class TinyNet(nn.Module):
    """A per-pixel linear model with MulT's interface: ``rgb [B,3,H,W] -> {task: [B,C,H,W]}``.

    No batch statistics, so a batch split into micro-batches must give the same gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Conv2d(3, 8, 1)
        self.norm = nn.GroupNorm(1, 8)
        self.heads = nn.ModuleDict({t: nn.Conv2d(8, c, 1) for t, c in CHANNELS.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.relu(self.norm(self.trunk(x)))
        return {t: head(h) for t, head in self.heads.items()}


def make_batch(n: int, seed: int, size: int = 8) -> dict:
    g = torch.Generator().manual_seed(seed)
    rgb = torch.rand(n, 3, size, size, generator=g)
    targets = {
        "normal": rgb * 2 - 1,  # learnable from the input, so training can make progress
        "depth_zbuffer": rgb.mean(dim=1, keepdim=True) * 3,
        "segment_semantic": torch.randint(1, 18, (n, size, size), generator=g),
    }
    valid = {t: torch.ones(n, size, size, dtype=torch.bool) for t in TASKS}
    return {"rgb": rgb, "targets": targets, "valid": valid, "bad_samples": 1, "key": [str(i) for i in range(n)]}


def split(batch: dict, parts: int) -> list[dict]:
    n = batch["rgb"].shape[0] // parts
    out = []
    for i in range(parts):
        sl = slice(i * n, (i + 1) * n)
        out.append({
            "rgb": batch["rgb"][sl],
            "targets": {t: v[sl] for t, v in batch["targets"].items()},
            "valid": {t: v[sl] for t, v in batch["valid"].items()},
            "bad_samples": 0,
        })
    return out


# ---------------------------------------------------------------------------------------------
# Schedule and optimizer.
# ---------------------------------------------------------------------------------------------
def test_warmup_cosine_shape() -> None:
    f = [engine_optim.warmup_cosine(s, warmup_steps=10, max_steps=100, min_lr_ratio=0.1) for s in range(101)]
    assert f[0] == pytest.approx(0.1)  # (0 + 1) / 10
    assert f[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(f[:10], f[1:10]))  # rising during warm-up
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # then never rising
    assert f[10] == pytest.approx(1.0)
    assert f[55] == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert f[100] == pytest.approx(0.1)


def test_scheduler_drives_optimizer_lr() -> None:
    model = TinyNet()
    opt = engine_optim.build_optimizer(model, OptimConfig(lr=1e-2, warmup_steps=2))
    sched = engine_optim.build_scheduler(opt, OptimConfig(lr=1e-2, warmup_steps=2, min_lr_ratio=0.0), max_steps=6)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(5e-3) and lrs[1] == pytest.approx(1e-2)
    assert lrs[-1] < lrs[2]


def test_param_groups_skip_decay_for_norms_and_biases() -> None:
    model = TinyNet()
    combiner = LossCombiner(TASKS, weighting="uncertainty")
    opt = engine_optim.build_optimizer(model, OptimConfig(weight_decay=0.05), combiner)
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.05 and plain["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decayed["params"])
    ids = {id(p) for p in plain["params"]}
    assert id(model.norm.weight) in ids and id(model.trunk.bias) in ids
    assert all(id(p) in ids for p in combiner.parameters())  # log-variances: never decayed
    total = sum(len(g["params"]) for g in opt.param_groups)
    assert total == len(list(model.parameters())) + len(list(combiner.parameters()))


@pytest.mark.parametrize("betas", [[0.9], [0.9, 1.0]])
def test_build_optimizer_rejects_bad_betas(betas: list[float]) -> None:
    with pytest.raises(ValueError, match="optim.betas"):
        engine_optim.build_optimizer(TinyNet(), OptimConfig(betas=betas))


def test_accumulation_steps() -> None:
    from mult.config import TrainConfig

    assert TrainConfig(global_batch_size=32, micro_batch_size=1).accumulation(32) == 1
    assert TrainConfig(global_batch_size=8, micro_batch_size=2).accumulation(2) == 2
    with pytest.raises(ValueError, match="global_batch_size"):
        TrainConfig(global_batch_size=6, micro_batch_size=4).accumulation(2)


# ---------------------------------------------------------------------------------------------
# Train step.
# ---------------------------------------------------------------------------------------------
def _step(model, micro_batches, accumulation, *, grad_clip=None, optimizer=None, combiner=None):
    combiner = combiner or LossCombiner(TASKS)
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=0.1)
    return engine.train_step(
        model, combiner, optimizer, None, iter(micro_batches), tasks=TASKS,
        accumulation=accumulation, grad_clip=grad_clip, device=torch.device("cpu"),
    )


def test_accumulation_matches_one_big_batch() -> None:
    torch.manual_seed(0)
    a = TinyNet()
    b = copy.deepcopy(a)
    batch = make_batch(4, seed=1)
    big = _step(a, [batch], accumulation=1)
    small = _step(b, split(batch, 2), accumulation=2)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    assert small.samples == big.samples == 4
    assert small.grad_norm == pytest.approx(big.grad_norm, rel=1e-4)
    assert set(small.task_losses) == set(TASKS)
    assert small.loss == pytest.approx(sum(small.task_losses.values()), rel=1e-5)


def test_step_consumes_exactly_accumulation_batches() -> None:
    batches = iter(split(make_batch(6, seed=2), 3))
    _step(TinyNet(), batches, accumulation=2)  # type: ignore[arg-type]
    assert len(list(batches)) == 1


def test_gradient_clipping_bounds_the_update() -> None:
    torch.manual_seed(0)
    model = TinyNet()
    before = [p.detach().clone() for p in model.parameters()]
    result = _step(model, [make_batch(2, seed=3)], 1, grad_clip=1e-3,
                   optimizer=torch.optim.SGD(model.parameters(), lr=1.0))
    moved = math.sqrt(sum(float((p.detach() - q).pow(2).sum()) for p, q in zip(model.parameters(), before)))
    assert result.grad_norm > 1e-3  # the raw norm is reported ...
    assert moved == pytest.approx(1e-3, rel=1e-3)  # ... the update used the clipped gradient


def test_training_reduces_the_loss_and_learns_uncertainty() -> None:
    torch.manual_seed(0)
    model = TinyNet()
    combiner = LossCombiner(TASKS, weighting="uncertainty")
    opt = engine_optim.build_optimizer(model, OptimConfig(lr=0.05, weight_decay=0.0), combiner)
    start = [p.detach().clone() for p in combiner.parameters()]
    batch = make_batch(4, seed=4)
    losses = [_step(model, [batch], 1, optimizer=opt, combiner=combiner).task_losses["normal"] for _ in range(30)]
    assert losses[-1] < 0.7 * losses[0]
    assert any(not torch.equal(p, q) for p, q in zip(combiner.parameters(), start))


def test_non_finite_loss_raises_with_task_names() -> None:
    batch = make_batch(2, seed=5)
    batch["targets"]["normal"] = torch.full_like(batch["targets"]["normal"], float("inf"))
    batch["targets"]["depth_zbuffer"] = batch["targets"]["depth_zbuffer"] * float("nan")
    model = TinyNet()
    with torch.no_grad():
        model.heads["segment_semantic"].bias.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="segment_semantic"):
        _step(model, [batch], 1)


def test_timed_iterator_counts_bad_samples_and_batches() -> None:
    it = engine.TimedIterator([make_batch(2, seed=s) for s in range(3)])
    assert len(list(it)) == 3
    assert it.bad_samples == 3 and it.batches == 3 and it.wait_seconds >= 0.0


# ---------------------------------------------------------------------------------------------
# Validation.
# ---------------------------------------------------------------------------------------------
def test_evaluate_fills_suite_and_restores_mode() -> None:
    model = TinyNet().train()
    suite = MetricSuite(TASKS)
    batches = [make_batch(2, seed=s) for s in range(5)]
    counts = engine.evaluate(model, batches, suite, tasks=TASKS, device=torch.device("cpu"), max_batches=3)
    assert counts.samples == 6 and counts.bad_samples == 3
    assert model.training
    metrics = suite.compute()
    assert set(metrics) == set(TASKS)
    assert metrics["normal"]["loss"] > 0 and 0.0 <= metrics["segment_semantic"]["miou"] <= 1.0
    objective = engine.weighted_objective(metrics, {"normal": 2.0, "depth_zbuffer": 1.0})
    assert objective == pytest.approx(2 * metrics["normal"]["loss"] + metrics["depth_zbuffer"]["loss"])
    with pytest.raises(KeyError, match="reshading"):
        engine.weighted_objective(metrics, {"reshading": 1.0})


def test_unwrap_and_autocast_on_cpu() -> None:
    model = TinyNet()
    assert engine.unwrap(model) is model
    with engine.autocast(torch.device("cpu"), "bf16"):
        out = model(torch.rand(1, 3, 4, 4))
    assert out["normal"].dtype == torch.float32  # bf16 autocast is GPU-only by design
