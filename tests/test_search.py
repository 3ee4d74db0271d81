"""The loss-weight search without Ray (mult.experiments.search, .search_report)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from mult.config import ConfigError, load_config
from mult.experiments.search import (
    DELTA_M,
    FALLBACK,
    SearchSpace,
    TrialRecord,
    best_record,
    build_search_space,
    choose_objective,
    compute_objective,
    normalized_loss,
    read_records,
)
from mult.experiments.search_report import write_outputs
from mult.training.loop import val_metrics

TASKS3 = "tasks=[normal,depth_zbuffer,segment_semantic]"


def _cfg(*overrides: str):
    return load_config(None, [TASKS3, *overrides])


# ---------------------------------------------------------------------------------------------
# Search space.
# ---------------------------------------------------------------------------------------------
def test_space_searches_every_task_but_the_fixed_one() -> None:
    space = build_search_space(_cfg("tune.fixed_task=normal", "tune.weight_range=[0.5,4]",
                                    "tune.weight_ranges={depth_zbuffer: [0.1, 2]}", "loss_weights.normal=1.5"))
    assert space.fixed == {"normal": 1.5}
    assert space.searched == {"depth_zbuffer": (0.1, 2.0), "segment_semantic": (0.5, 4.0)}
    assert space.weights({"depth_zbuffer": 0.3, "segment_semantic": 2.0}) == {
        "depth_zbuffer": 0.3, "segment_semantic": 2.0, "normal": 1.5}
    with pytest.raises(KeyError, match="segment_semantic"):
        space.weights({"depth_zbuffer": 0.3})


def test_space_without_fixed_task_searches_all() -> None:
    space = build_search_space(_cfg())
    assert set(space.searched) == {"normal", "depth_zbuffer", "segment_semantic"} and not space.fixed


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["tune.fixed_task=reshading"], "tune.fixed_task: 'reshading' is not among tasks"),
        (["tasks=[normal]", "tune.fixed_task=normal"], "nothing to search"),
        (["tune.weight_ranges={normal: [1, 2]}", "tune.fixed_task=normal"], "is the fixed reference task"),
        (["tune.weight_ranges={edge_texture: [1, 2]}"], "'edge_texture' is not among tasks"),
        (["tune.weight_ranges={normal: [2, 1]}"], r"0 < low < high"),
        (["tune.weight_ranges={normal: [0, 1]}"], r"0 < low < high"),
        (["tune.weight_ranges={normal: [1]}"], r"need \[low, high\]"),
        (["tune.trial_driver_cpus=0"], "Ray refuses a trial asking for 0 CPUs"),
        (["tune.reduction_factor=1"], "reduction_factor: must be >= 2"),
        (["tune.grace_period=0"], "grace_period"),
        (["tune.extra_arms=[dwa, dwa]"], "duplicates"),
        (["tune.trial_num_workers=3", "train.global_batch_size=8", "train.micro_batch_size=2"],
         "multiple of micro_batch_size x trial_num_workers"),
    ],
)
def test_bad_space_is_a_clear_error(overrides: list[str], message: str) -> None:
    cfg = load_config(None, [TASKS3, *overrides]) if overrides[0].startswith("tune") else load_config(None, overrides)
    with pytest.raises(ConfigError, match=message):
        build_search_space(cfg)


@pytest.mark.parametrize(
    ("override", "message"),
    [("tune.weight_range=[5, 1]", "0 < low < high"), ("tune.extra_arms=[gradnorm]", "choose from"),
     ("tune.search=grid", "choose one of"), ("tune.weight_rnage=[1, 2]", "did you mean 'tune.weight_range'")],
)
def test_bad_tune_keys_fail_when_the_config_loads(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


# ---------------------------------------------------------------------------------------------
# Objective.
# ---------------------------------------------------------------------------------------------
def test_val_metrics_ignores_other_keys() -> None:
    flat = {"val/normal/loss": 0.5, "val/normal/mean_angle": 30, "loss/normal": 9.0, "val_objective": 1.0,
            "step": 4}
    assert val_metrics(flat) == {"normal": {"loss": 0.5, "mean_angle": 30.0}}


def test_fallback_objective_is_the_mean_normalised_loss() -> None:
    reference = {"normal": 2.0, "depth_zbuffer": 4.0}
    metrics = {"normal": {"loss": 1.0}, "depth_zbuffer": {"loss": 4.0}}
    assert normalized_loss(metrics, reference, ["normal", "depth_zbuffer"]) == pytest.approx(0.75)
    # The first validation of any trial is its own reference: exactly 1.
    first = {t: {"loss": v} for t, v in reference.items()}
    assert compute_objective(FALLBACK, first, list(reference), reference=reference) == 1.0
    assert math.isnan(normalized_loss({"normal": {"loss": 1.0}}, reference, ["normal", "depth_zbuffer"]))
    # The weights being searched do not enter: scaling one weight changes nothing here, unlike
    # the weighted total loss.
    with pytest.raises(ValueError, match="reference"):
        compute_objective(FALLBACK, metrics, list(reference))


def test_delta_m_objective_uses_primary_metrics_and_baselines() -> None:
    baselines = {"normal": {"mean_angle": 20.0}, "segment_semantic": {"miou": 40.0}}
    metrics = {"normal": {"mean_angle": 18.0}, "segment_semantic": {"miou": 44.0}}
    # normal: lower is better, 10 % better; miou: higher is better, 10 % better.
    assert compute_objective(DELTA_M, metrics, ["normal", "segment_semantic"], baselines=baselines) == pytest.approx(10.0)
    assert choose_objective(True) is DELTA_M and choose_objective(False) is FALLBACK
    assert DELTA_M.better(2.0, 1.0) and FALLBACK.better(0.5, 0.9)


# ---------------------------------------------------------------------------------------------
# Outputs.
# ---------------------------------------------------------------------------------------------
def _records() -> list[TrialRecord]:
    def rec(tid, w, obj, step, arm="search", status="TERMINATED"):
        return TrialRecord(
            tid, arm, status, {"normal": 1.0, "depth_zbuffer": w}, step=step, objective=obj,
            metrics={"normal": {"mean_angle": 30 * obj, "loss": obj}, "depth_zbuffer": {"l1_m": obj, "loss": obj}},
            history=[(s, obj + 0.1 * (8 - s)) for s in range(2, step + 1, 2)],
        )

    return [rec("a0001", 0.5, 0.80, 8), rec("a0002", 2.0, 0.95, 4), rec("a0003", 1.5, 0.70, 8),
            rec("a0004", 4.0, math.nan, 2, status="ERROR"), rec("b0001", 1.0, 0.60, 8, arm="dwa")]


def test_best_record_skips_errors_and_arms() -> None:
    records = _records()
    assert best_record(records, FALLBACK).trial_id == "a0003"
    assert best_record(records, FALLBACK, "dwa").trial_id == "b0001"
    assert best_record(records, DELTA_M).trial_id == "a0002"  # max mode


def test_outputs_tables_best_yaml_plots(tmp_path: Path) -> None:
    space = SearchSpace({"depth_zbuffer": (0.2, 5.0)}, {"normal": 1.0})
    paths = write_outputs(_records(), tmp_path, space=space, objective=FALLBACK, max_steps=8)
    names = {p.relative_to(tmp_path).as_posix() for p in paths}
    assert names == {"trials.csv", "trials.json", "best.yaml", "report.md", "plots/objective_vs_weights.png",
                     "plots/task_metrics.png", "plots/asha.png"}
    for png in tmp_path.glob("plots/*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000

    rows = list(csv.DictReader(open(tmp_path / "trials.csv")))
    assert [r["trial_id"] for r in rows] == ["a0001", "a0002", "a0003", "a0004", "b0001"]
    by_id = {r["trial_id"]: r for r in rows}
    assert by_id["a0002"]["stopped_early"] == "True" and by_id["a0001"]["stopped_early"] == "False"
    assert by_id["a0004"]["stopped_early"] == "False"  # errored, not stopped
    assert float(by_id["a0003"]["weight/depth_zbuffer"]) == 1.5
    assert float(by_id["a0003"]["val/normal/mean_angle"]) == pytest.approx(21.0)
    assert "mean_normalized_val_loss" in rows[0]

    objective, back = read_records(tmp_path / "trials.json")
    assert objective == FALLBACK and [r.trial_id for r in back] == [r.trial_id for r in _records()]
    assert back[0].history[0] == (2, pytest.approx(1.4))
    assert json.loads((tmp_path / "trials.json").read_text())["objective"]["name"] == "mean_normalized_val_loss"

    report = (tmp_path / "report.md").read_text()
    assert "best searched weights | a0003" in report and "dwa weighting | b0001" in report
    assert "1 stopped early by ASHA, 1 errored" in report


def test_best_yaml_is_an_override_file_the_config_loader_accepts(tmp_path: Path) -> None:
    space = SearchSpace({"depth_zbuffer": (0.2, 5.0)}, {"normal": 1.0})
    write_outputs(_records(), tmp_path, space=space, objective=FALLBACK, max_steps=8)
    cfg = load_config(Path(__file__).parents[1] / "configs/cpu-small.yaml",
                      ["tasks=[normal,depth_zbuffer]", f"@{tmp_path / 'best.yaml'}"])
    assert cfg.loss_weights == {"normal": 1.0, "depth_zbuffer": 1.5}
    assert cfg.loss.weighting == "fixed"


def test_no_finished_trial_means_no_best_yaml(tmp_path: Path) -> None:
    records = [TrialRecord("x1", "search", "ERROR", {"normal": 1.0}, error="boom")]
    write_outputs(records, tmp_path, space=SearchSpace({"normal": (0.1, 1.0)}, {}), objective=FALLBACK, max_steps=8)
    assert not (tmp_path / "best.yaml").exists()
    assert "No trial finished" in (tmp_path / "report.md").read_text()
