"""``python -m bench.learn``: the learning benchmark's smoke run, and its reference U-Net."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mult.config import SHARED_ATTENTION_MODES, load_config
from mult.tasks import get_task

REPO = Path(__file__).resolve().parents[1]
TASKS = load_config(REPO / "configs" / "cpu-small.yaml").tasks


def test_unet_outputs_every_task_at_input_size() -> None:
    from bench.learn import UNet

    model = UNet(TASKS)
    out = model(torch.randn(2, 3, 32, 48))
    assert list(out) == TASKS
    for task, y in out.items():
        assert y.shape == (2, get_task(task).channels, 32, 48), task
    assert 0.2e6 < sum(p.numel() for p in model.parameters()) < 0.3e6
    with pytest.raises(ValueError, match="divisible by 4"):
        model(torch.randn(1, 3, 30, 32))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_smoke_run_reports_every_model_with_ratios(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "bench.learn", "--smoke-test", "--out", str(out)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=840)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((out / "learn.json").read_text())
    models = report["models"]
    assert list(models) == [*SHARED_ATTENTION_MODES, "unet", "constant"]
    assert report["tasks"] == TASKS
    assert report["data"]["shared_buildings"] == []

    for name, model in models.items():
        assert set(model["runs"]) == {"0"}
        for task in TASKS:
            loss = model["final"][task]["loss"]
            assert math.isfinite(loss["mean"]) and loss["per_seed"]["0"] == loss["mean"], (name, task)
        run = model["runs"]["0"]
        if name == "constant":
            assert model["parameters"] == 0 and not model["trained"]
            assert run["train_curve"] == [] and run["val_curve"] == []
            continue
        assert model["parameters"] > 0 and model["step_s"]["mean"] > 0
        assert [p["step"] for p in run["train_curve"]] == [2, 4]
        assert [p["step"] for p in run["val_curve"]] == [2, 4]
        for point in run["train_curve"]:
            assert set(point["tasks"]) == set(TASKS) and all(math.isfinite(v) for v in point["tasks"].values())
        for point in run["val_curve"]:
            assert all(math.isfinite(point["metrics"][t]["loss"]) for t in TASKS)
        assert run["val_curve"][-1]["metrics"] == run["final"]

    ratios = report["ratios"]
    for task in TASKS:
        expected = {f"{m}/constant" for m in SHARED_ATTENTION_MODES} | {f"{m}/unet" for m in SHARED_ATTENTION_MODES}
        assert set(ratios[task]) == expected | {"unet/constant"}
    task = TASKS[1]
    mode = SHARED_ATTENTION_MODES[0]
    mean = models[mode]["final"][task]["loss"]["mean"] / models["constant"]["final"][task]["loss"]["mean"]
    assert ratios[task][f"{mode}/constant"]["ratio"] == pytest.approx(mean, rel=1e-12)
    unet, floor = models["unet"]["final"][task]["loss"], models["constant"]["final"][task]["loss"]
    assert ratios[task]["unet/constant"]["per_seed"]["0"] == pytest.approx(unet["per_seed"]["0"] / floor["mean"],
                                                                            rel=1e-12)

    segmentation = report["classification"]["segment_semantic"]
    assert segmentation["constant"]["constant_maps"] and segmentation["constant"]["equals_constant"]
    assert segmentation["constant"]["agree_with_constant"] == 1.0

    md = (out / "learn.md").read_text()
    assert "## Ratios of final validation loss" in md
    assert f"| {mode} / constant |" in md and "| unet / constant |" in md
    assert "smoke test, not a benchmark" in md


@pytest.mark.parametrize("argv, message", [
    (["--models", "reference,resnet"], "--models: unknown ['resnet']"),
    (["--models", "constant"], "the constant predictor is always scored"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--seeds", "0,a"], "--seeds must be comma-separated integers"),
    (["--eval-every", "-1"], "--eval-every must be >= 1"),
])
def test_bad_flags_are_refused_by_name(tmp_path: Path, capsys: pytest.CaptureFixture, argv: list[str],
                                       message: str) -> None:
    from bench.learn import main

    with pytest.raises(SystemExit) as err:
        main(["--out", str(tmp_path), *argv])
    assert err.value.code == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before any data is generated
