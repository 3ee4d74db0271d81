"""mult.experiments.ablation (run planning, per-run configs, the resumable result store) and
.ablation_report (Delta-m, mean +- std, affinity entries and signs, the num-tasks curve) on
hand-computed numbers."""

from __future__ import annotations

import json
import math
import statistics

import pytest

from mult.config import load_config
from mult.experiments import ablation as st
from mult.experiments import ablation_report as rep
from mult.metrics import delta_m
from mult.outputs import json_safe

ALL6 = ["normal", "depth_zbuffer", "segment_semantic", "keypoints2d", "edge_texture", "reshading"]


# --------------------------------------------------------------------------------------------
# Planning.
# --------------------------------------------------------------------------------------------
def test_baselines_are_single_task_without_sharing():
    runs = st.baseline_runs(["normal", "depth_zbuffer"], [0, 1, 2])
    assert len(runs) == 6
    assert all(r.is_baseline and r.mode == "none" for r in runs)
    assert {(r.tasks, r.seed) for r in runs} == {((t,), s) for t in ("normal", "depth_zbuffer") for s in (0, 1, 2)}


def test_modes_plan_is_all_tasks_per_mode_and_seed():
    runs = st.plan_modes(ALL6[:3], [0, 1, 2])
    assert len(runs) == 12  # reference, official, encoder, none x 3 seeds
    assert {r.mode for r in runs} == set(st.MODES)
    assert all(r.tasks == tuple(ALL6[:3]) for r in runs)


def test_pairwise_plan_is_every_unordered_pair():
    runs = st.plan_pairwise(ALL6, [0, 1])
    pairs = {r.tasks for r in runs}
    assert len(pairs) == 15 and len(runs) == 30
    assert {frozenset(p) for p in pairs} == {frozenset((a, b)) for a in ALL6 for b in ALL6 if a != b}
    # each pair keeps the configured order (no (b, a) duplicates)
    assert all(ALL6.index(a) < ALL6.index(b) for a, b in pairs)


def test_num_tasks_subsets_are_nested_prefixes():
    subsets = st.num_task_subsets(ALL6)
    assert [len(s) for s in subsets] == [2, 3, 4, 5, 6]
    assert subsets[0] == ("normal", "depth_zbuffer")
    for small, big in zip(subsets, subsets[1:]):
        assert big[: len(small)] == small  # each step adds exactly one task
    runs = st.plan_num_tasks(ALL6, [0, 1, 2], mode="encoder")
    assert len(runs) == 15 and all(r.mode == "encoder" for r in runs)


def test_plan_runs_shares_baselines_and_deduplicates():
    tasks = ALL6[:3]
    runs = st.plan_runs(list(st.STUDIES), tasks, [0, 1, 2])
    assert len(runs) == len(set(runs))
    # 9 baselines + 12 modes + 9 pairs; the first pair is num-tasks k=2 and k=3 is the modes
    # reference run, so num-tasks adds nothing new.
    assert len(runs) == 30
    assert all(r.is_baseline for r in runs[:9])  # baselines first
    only_pairs = st.plan_runs(["pairwise"], tasks, [0])
    assert len(only_pairs) == 3 + 3


def test_parse_studies_and_bad_input():
    assert st.parse_studies("all") == list(st.STUDIES)
    assert st.parse_studies("pairwise") == ["pairwise"]
    with pytest.raises(st.StudyError, match="choose from"):
        st.parse_studies("pairs")
    with pytest.raises(st.StudyError, match="choose from"):
        st.plan_modes(ALL6[:2], [0], modes=["shared"])
    with pytest.raises(st.StudyError, match="at least 2 tasks"):
        st.plan_pairwise(["normal"], [0])
    with pytest.raises(st.StudyError, match="duplicates"):
        st.baseline_runs(["normal"], [1, 1])
    with pytest.raises(KeyError, match="valid tasks"):
        st.baseline_runs(["normals"], [0])


def test_reference_rule():
    assert st.reference_for(("depth_zbuffer", "normal"), "normal") == "normal"
    assert st.reference_for(("depth_zbuffer", "segment_semantic"), "normal") == "depth_zbuffer"


# --------------------------------------------------------------------------------------------
# Per-run configs and fingerprints.
# --------------------------------------------------------------------------------------------
@pytest.fixture()
def base_cfg():
    return load_config("configs/cpu-small.yaml", ["tasks=[normal,depth_zbuffer,segment_semantic]",
                                                  "loss_weights.normal=2.0", "loss_weights.segment_semantic=0.5"])


def test_run_config_narrows_tasks_weights_mode_seed(base_cfg):
    cfg = st.run_config(base_cfg, st.RunSpec(("depth_zbuffer", "segment_semantic"), "reference", 4))
    assert cfg.tasks == ["depth_zbuffer", "segment_semantic"]
    assert cfg.loss_weights == {"segment_semantic": 0.5}
    assert cfg.model.shared_attention == "reference"
    assert cfg.model.reference_task == "depth_zbuffer"  # normal is not in the run
    assert cfg.train.seed == 4
    single = st.run_config(base_cfg, st.RunSpec(("normal",), "none", 0))
    assert single.model.shared_attention == "none" and single.loss_weights == {"normal": 2.0}


def test_fingerprint_tracks_what_changes_results(base_cfg):
    spec = st.RunSpec(("normal",), "none", 0)
    fp = st.fingerprint(st.run_config(base_cfg, spec))
    moved = load_config("configs/cpu-small.yaml", ["tasks=[normal,depth_zbuffer,segment_semantic]",
                                                   "loss_weights.normal=2.0", "loss_weights.segment_semantic=0.5",
                                                   "train.storage_path=/elsewhere", "scaling.num_workers=1",
                                                   "data.num_workers=0", "train.val_every=5"])
    assert st.fingerprint(st.run_config(moved, spec)) == fp
    longer = load_config("configs/cpu-small.yaml", ["tasks=[normal,depth_zbuffer,segment_semantic]",
                                                    "loss_weights.normal=2.0", "loss_weights.segment_semantic=0.5",
                                                    "train.max_steps=41"])
    assert st.fingerprint(st.run_config(longer, spec)) != fp
    assert st.fingerprint(st.run_config(base_cfg, st.RunSpec(("normal",), "none", 1))) != fp


# --------------------------------------------------------------------------------------------
# Results store and resume.
# --------------------------------------------------------------------------------------------
def _result(tasks, mode, seed, values, fp="fp"):
    """values: {task: primary metric value}."""
    from mult.tasks import get_task

    metrics = {t: {get_task(t).primary_metric.name: float(v)} for t, v in values.items()}
    return st.RunResult(st.RunSpec(tuple(tasks), mode, seed), metrics, fp, seconds=1.0, steps=3)


def test_store_roundtrip_and_resume_skip(tmp_path):
    store = st.ResultStore(tmp_path)
    a = _result(["normal"], "none", 0, {"normal": 40.0}, fp="aaa")
    b_spec = st.RunSpec(("normal",), "none", 1)
    c = _result(["normal", "depth_zbuffer"], "reference", 0, {"normal": 39.0, "depth_zbuffer": 1.0}, fp="ccc")
    store.save(a)
    store.save(c)
    loaded = store.load(a.spec, "aaa")
    assert loaded is not None and loaded.metrics == a.metrics and loaded.steps == 3
    fps = {a.spec: "aaa", b_spec: "bbb", c.spec: "changed"}
    done, pending = st.split_finished([a.spec, b_spec, c.spec], store, fps)
    assert list(done) == [a.spec]  # finished with the same settings: skipped
    assert pending == [b_spec, c.spec]  # never run; run with other settings: trained again
    store.path(a.spec).write_text("{not json")
    assert store.load(a.spec, "aaa") is None  # a corrupt file is not a finished run
    assert not list(store.dir.glob("*.tmp*"))


def test_metrics_from_report():
    report = {"val/normal/mean_angle": 30.0, "val/normal/within_30": 50.0, "val/depth_zbuffer/l1_m": 0.5,
              "loss/total": 1.0, "val_objective": 2.0, "val/segment_semantic/miou": 9.0}
    out = st.metrics_from_report(report, ["normal", "depth_zbuffer"])
    assert out == {"normal": {"mean_angle": 30.0, "within_30": 50.0}, "depth_zbuffer": {"l1_m": 0.5}}
    with pytest.raises(st.StudyError, match="depth_zbuffer.l1_m"):
        st.metrics_from_report({"val/normal/mean_angle": 1.0}, ["normal", "depth_zbuffer"])


# --------------------------------------------------------------------------------------------
# Aggregation with hand-computed numbers.
# --------------------------------------------------------------------------------------------
T3 = ["normal", "depth_zbuffer", "segment_semantic"]  # mean_angle ↓, l1_m ↓, miou ↑


@pytest.fixture()
def results():
    rs = [
        # baselines: seed 0 and seed 1
        _result(["normal"], "none", 0, {"normal": 40.0}),
        _result(["depth_zbuffer"], "none", 0, {"depth_zbuffer": 2.0}),
        _result(["segment_semantic"], "none", 0, {"segment_semantic": 20.0}),
        _result(["normal"], "none", 1, {"normal": 50.0}),
        _result(["depth_zbuffer"], "none", 1, {"depth_zbuffer": 1.0}),
        _result(["segment_semantic"], "none", 1, {"segment_semantic": 25.0}),
        # all three tasks, reference mode
        # seed 0: normal 36 (+10 %), depth 2.2 (-10 %), seg 24 (+20 %) -> Delta-m +20/3
        _result(T3, "reference", 0, {"normal": 36.0, "depth_zbuffer": 2.2, "segment_semantic": 24.0}),
        # seed 1: normal 55 (-10 %), depth 0.9 (+10 %), seg 25 (0 %) -> Delta-m 0
        _result(T3, "reference", 1, {"normal": 55.0, "depth_zbuffer": 0.9, "segment_semantic": 25.0}),
        # "none" mode: only seed 0 finished: normal 44 (-10), depth 2.0 (0), seg 20 (0) -> -10/3
        _result(T3, "none", 0, {"normal": 44.0, "depth_zbuffer": 2.0, "segment_semantic": 20.0}),
        # pairs (seed 0 only)
        _result(["normal", "depth_zbuffer"], "reference", 0, {"normal": 30.0, "depth_zbuffer": 2.5}),  # +25, -25
        _result(["normal", "segment_semantic"], "reference", 0, {"normal": 42.0, "segment_semantic": 22.0}),  # -5, +10
    ]
    return {r.spec: r for r in rs}


def test_mean_std():
    assert rep.mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2.0)))
    mean, std = rep.mean_std([5.0, math.nan])
    assert mean == 5.0 and math.isnan(std)  # one value: no spread
    assert all(math.isnan(x) for x in rep.mean_std([]))


def test_modes_summary_delta_m_per_seed(results):
    s = rep.summarize_modes(results, T3, [0, 1], modes=["reference", "none"])
    ref = s["modes"]["reference"]
    assert ref["delta_m"]["values"] == pytest.approx([20.0 / 3, 0.0])
    assert ref["delta_m"]["mean"] == pytest.approx(10.0 / 3)
    assert ref["delta_m"]["std"] == pytest.approx(statistics.stdev([20.0 / 3, 0.0]))
    assert ref["relative"]["normal"]["values"] == pytest.approx([10.0, -10.0])
    assert ref["relative"]["depth_zbuffer"]["values"] == pytest.approx([-10.0, 10.0])
    assert ref["metrics"]["normal"]["mean_angle"]["mean"] == pytest.approx(45.5)
    # agrees with the library's Delta-m
    base0 = rep.baselines_by_seed(results, T3, [0, 1])[0]
    assert ref["delta_m"]["values"][0] == pytest.approx(
        delta_m(results[st.RunSpec(tuple(T3), "reference", 0)].metrics, base0, T3))
    none = s["modes"]["none"]
    assert none["delta_m"]["n"] == 1 and none["delta_m"]["mean"] == pytest.approx(-10.0 / 3)
    assert math.isnan(none["delta_m"]["values"][1]) and math.isnan(none["delta_m"]["std"])
    assert s["baselines"]["normal"]["mean_angle"]["mean"] == pytest.approx(45.0)


def test_affinity_entries_and_signs(results):
    aff = rep.affinity_table(results, T3, [0, 1])
    table = aff["table"]
    assert table["normal"]["depth_zbuffer"]["mean"] == pytest.approx(25.0)  # depth helps normal
    assert table["depth_zbuffer"]["normal"]["mean"] == pytest.approx(-25.0)  # normal hurts depth
    assert table["normal"]["segment_semantic"]["mean"] == pytest.approx(-5.0)
    assert table["segment_semantic"]["normal"]["mean"] == pytest.approx(10.0)
    assert table["normal"]["depth_zbuffer"]["n"] == 1  # seed 1 pair missing: averaged over 1
    assert "normal" not in table["normal"]  # no diagonal
    assert math.isnan(table["depth_zbuffer"]["segment_semantic"]["mean"])  # pair not run
    assert aff["pair_delta_m"]["normal+depth_zbuffer"]["mean"] == pytest.approx(0.0)
    assert aff["pair_delta_m"]["normal+segment_semantic"]["mean"] == pytest.approx(2.5)
    md = rep.markdown_affinity(aff)
    assert "| normal | — | +25.00 | -5.00 |" in md
    assert "| depth_zbuffer | -25.00 | — | n/a |" in md


def test_num_tasks_curve(results):
    curve = rep.num_tasks_curve(results, T3, [0, 1])
    assert [r["k"] for r in curve["rows"]] == [2, 3]
    k2, k3 = curve["rows"]
    assert k2["tasks"] == ["normal", "depth_zbuffer"] and k2["delta_m"]["mean"] == pytest.approx(0.0)
    assert k3["delta_m"]["mean"] == pytest.approx(10.0 / 3)
    assert set(k2["relative"]) == {"normal", "depth_zbuffer"}
    md = rep.markdown_num_tasks(curve)
    assert "| 3 | segment_semantic | +3.33 ± 4.71 |" in md


def test_markdown_modes_and_plots(results, tmp_path):
    s = rep.summarize_modes(results, T3, [0, 1], modes=["reference", "none"])
    md = rep.markdown_modes(s)
    assert "| reference | +3.33 ± 4.71 | +0.00 ± 14.14 | +0.00 ± 14.14 | +10.00 ± 14.14 |" in md
    assert "| none | -3.33 | -10.00 | +0.00 | +0.00 |" in md  # one seed: no ± part
    assert "| single-task (none) | 45.000 ± 7.071 |" in md
    for fn, data, name in ((rep.plot_modes, s, "m.png"), (rep.plot_affinity, rep.affinity_table(results, T3, [0, 1]), "a.png"),
                           (rep.plot_num_tasks, rep.num_tasks_curve(results, T3, [0, 1]), "n.png")):
        path = fn(data, tmp_path / name)
        assert path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"
    json.dumps(json_safe(s), allow_nan=False)  # strict JSON: NaN became null
