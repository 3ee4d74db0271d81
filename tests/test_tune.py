"""The search stage end to end: ``python -m pipelines.tune`` against the session's Ray head.

One 4-trial ``--smoke-test`` search (2 CPUs, generated data) is interrupted with SIGINT once its
first trial has finished, then continued with ``--resume``; the tests below read what that
search left in its experiment directory. Nothing is mocked.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
CONFIG = str(REPO / "configs/cpu-small.yaml")
# A model small enough that a trial is mostly Ray Train start-up.
TINY = [
    "tasks=[normal,depth_zbuffer,segment_semantic]", "model.img_size=32",
    "model.embed_dim=12", "model.num_heads=[1,1,1,1]", "data.num_workers=1",
    "train.global_batch_size=4", "train.micro_batch_size=2", "optim.lr=3.0e-3", "optim.warmup_steps=2",
    "train.precision=fp32", "tune.search=optuna", "tune.fixed_task=normal", "tune.weight_range=[0.05,20]",
]


def _cmd(storage: Path, *extra: str) -> list[str]:
    return [PYTHON, "-m", "pipelines.tune", "--config", CONFIG, *TINY,
            f"train.storage_path={storage}", "train.run_name=tunetest", *extra]


def _trial_results(search_dir: Path) -> dict[str, list[dict]]:
    """Tune's per-trial ``result.json`` lines, by trial directory (= trial id)."""
    out = {}
    for path in sorted(search_dir.glob("*/result.json")):
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        out[path.parent.name] = lines
    return out


@pytest.fixture(scope="module")
def search(tmp_path_factory: pytest.TempPathFactory, ray_head) -> dict:
    """Start the smoke search, SIGINT it after its first trial finished, resume it to the end."""
    storage = tmp_path_factory.mktemp("tune")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log1 = storage / "first.log"
    with open(log1, "wb") as fh:
        proc = subprocess.Popen(_cmd(storage, "--smoke-test"), cwd=REPO, env=env, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # One trial at a time fits on 2 CPUs, so a second trial directory means the first ended.
        deadline = time.monotonic() + 420
        search_dir = None
        while time.monotonic() < deadline and proc.poll() is None:
            dirs = sorted(storage.glob("tune/tunetest-tune-*/search"))
            if dirs and len([p for p in dirs[0].iterdir() if (p / "result.json").exists()]) >= 2:
                search_dir = dirs[0]
                break
            time.sleep(1.0)
        assert search_dir is not None, f"no second trial started:\n{log1.read_text()[-4000:]}"
        proc.send_signal(signal.SIGINT)
        rc1 = proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    before = _trial_results(search_dir)
    first = json.loads((search_dir.parent / "trials.json").read_text())
    resumed = subprocess.run(_cmd(storage, "--resume"), cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=900)
    return {"storage": storage, "exp": search_dir.parent, "rc1": rc1, "log1": log1.read_text(),
            "first": first, "before": before, "resumed": resumed, "after": _trial_results(search_dir)}


def _trials(exp: Path) -> list[dict]:
    return json.loads((exp / "trials.json").read_text())["trials"]


@pytest.mark.slow
def test_sigint_stops_and_resume_does_not_rerun_finished_trials(search: dict) -> None:
    assert search["rc1"] == 130, search["log1"][-4000:]
    finished = {t["trial_id"] for t in search["first"]["trials"] if t["status"] == "TERMINATED"}
    assert finished, search["first"]
    resumed = search["resumed"]
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]
    for trial_id in finished:
        # Tune appended nothing to a finished trial, and the record is the same one.
        assert search["after"][trial_id] == search["before"][trial_id], trial_id
    final = {t["trial_id"]: t for t in _trials(search["exp"])}
    assert len(final) == 4 and finished <= set(final)
    for trial_id in finished:
        old = next(t for t in search["first"]["trials"] if t["trial_id"] == trial_id)
        assert final[trial_id]["history"] == old["history"]
    assert all(t["status"] == "TERMINATED" for t in final.values()), final


@pytest.mark.slow
def test_smoke_search_finishes_and_asha_stops_a_trial(search: dict) -> None:
    trials = _trials(search["exp"])
    assert len(trials) == 4
    stopped = [t for t in trials if t["stopped_early"]]
    full = [t for t in trials if not t["stopped_early"]]
    assert stopped, [(t["trial_id"], t["step"], t["history"]) for t in trials]
    assert all(t["step"] < 8 for t in stopped) and all(t["step"] == 8 for t in full)
    for t in trials:
        assert t["objective"] is not None and t["metrics"]["normal"]["mean_angle"] > 0
        assert t["weights"]["normal"] == 1.0  # the fixed reference
        assert 0.05 <= t["weights"]["depth_zbuffer"] <= 20
    # Every validation (steps 2, 4, 6, 8) reached Tune; the first is the fallback's reference.
    assert trials[0]["history"][0] == [2, 1.0]
    assert all(s % 2 == 0 for t in trials for s, _ in t["history"])
    report = (search["exp"] / "report.md").read_text()
    assert "mean_normalized_val_loss" in report and f"{len(stopped)} stopped early by ASHA" in report
    for name in ("trials.csv", "objective_vs_weights.png", "task_metrics.png", "asha.png"):
        assert list(search["exp"].rglob(name)), name


@pytest.mark.slow
def test_best_yaml_loads_into_the_training_stage(search: dict) -> None:
    from mult.config import load_config
    from mult.experiments.search import FALLBACK, best_record, read_records
    from mult.training.plan import prepare

    objective, records = read_records(search["exp"] / "trials.json")
    best = best_record(records, objective)
    assert objective == FALLBACK and best is not None
    saved = search["exp"] / "search_config.yaml"
    cfg = load_config(saved, [f"@{search['exp'] / 'best.yaml'}"])
    assert cfg.loss_weights == pytest.approx(best.weights)
    plan = prepare(cfg)  # the training stage's own checks: storage, shards, tasks
    assert plan.cfg.loss_weights == cfg.loss_weights


def test_bad_search_space_exits_with_a_clear_message(tmp_path: Path) -> None:
    for extra, message in (
        (["tune.weight_range=[5,1]"], "tune.weight_range: need [low, high] with 0 < low < high"),
        (["tune.fixed_task=reshading"], "tune.fixed_task: 'reshading' is not among tasks"),
        (["tune.weight_ranges={normal: [1, 2]}"], "tune.weight_ranges.normal: 'normal' is the fixed reference task"),
    ):
        result = subprocess.run([*_cmd(tmp_path), *extra], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, result.stderr[-2000:]
        assert message in result.stderr
        assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------
# Single-task baselines.
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_baselines_command_writes_what_load_baselines_reads(tmp_path: Path, ray_head) -> None:
    from mult.config import load_config
    from mult.experiments.search import experiment_root, find_baselines
    from mult.training.plan import PreflightError, load_baselines

    base = [PYTHON, "-m", "pipelines.baselines", "--config", CONFIG, *TINY, f"train.storage_path={tmp_path}",
            "train.run_name=basetest", "--tasks", "normal", "--smoke-test"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(base, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    out = tmp_path / "tune" / "baselines.json"
    values = load_baselines(str(out), ["normal"])
    assert set(values) == {"normal"} and 0 < values["normal"]["mean_angle"] < 180
    assert set(values["normal"]) == {"loss", "mean_angle", "median_angle", "within_11_25", "within_22_5", "within_30"}
    runs = json.loads((tmp_path / "tune" / "baselines_runs.json").read_text())
    assert runs["normal"]["step"] == 4 and "basetest-baseline-normal-" in runs["normal"]["run"]
    # Single-task runs: one task, no shared attention (the resolved config is saved with the run).
    import yaml

    saved = sorted((tmp_path / Path(runs["normal"]["run"]).name).glob("checkpoint_*/config.yaml"))
    assert saved, list((tmp_path / Path(runs["normal"]["run"]).name).iterdir())
    data = yaml.safe_load(saved[-1].read_text())
    assert data["tasks"] == ["normal"] and data["model"]["shared_attention"] == "none"
    # Run again: the task is already there, nothing is retrained (no Ray run needed).
    again = subprocess.run(base, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "baseline for normal already in" in again.stderr, again.stderr[-3000:]
    assert "starting run" not in again.stderr
    # The search finds them in its experiment root, and needs every task's primary metric.
    cfg = load_config(CONFIG, [*TINY, f"train.storage_path={tmp_path}", "tasks=[normal]",
                               "model.shared_attention=none"])
    url, found = find_baselines(cfg, experiment_root(cfg))
    assert url == f"{tmp_path}/tune/baselines.json" and found == values
    cfg3 = load_config(CONFIG, [*TINY, f"train.storage_path={tmp_path}"])
    with pytest.raises(PreflightError, match="lack depth_zbuffer.l1_m, segment_semantic.miou"):
        find_baselines(cfg3, experiment_root(cfg3))


def test_baselines_bad_tasks_exit_2(tmp_path: Path) -> None:
    cmd = [PYTHON, "-m", "pipelines.baselines", "--config", CONFIG, *TINY, f"train.storage_path={tmp_path}",
           "--tasks", "normal,edge_texture"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--tasks: ['edge_texture'] not among the config's tasks" in result.stderr


@pytest.mark.slow
def test_learned_weighting_arm_runs_beside_the_search(tmp_path: Path, ray_head) -> None:
    cmd = [*_cmd(tmp_path, "--smoke-test"), "tune.num_samples=1", "tune.extra_arms=[uncertainty]"]
    result = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    exp = next(tmp_path.glob("tune/tunetest-tune-*"))
    trials = _trials(exp)
    assert sorted(t["arm"] for t in trials) == ["search", "uncertainty"]
    arm = next(t for t in trials if t["arm"] == "uncertainty")
    assert arm["step"] == 8 and arm["weights"] == {"normal": 1.0, "depth_zbuffer": 1.0, "segment_semantic": 1.0}
    assert (exp / "arms").is_dir()
    report = (exp / "report.md").read_text()
    assert "| best searched weights |" in report and f"| uncertainty weighting | {arm['trial_id']} |" in report
    # The arm's training run really used uncertainty weighting.
    import yaml

    saved = sorted((exp / "runs" / arm["trial_id"]).glob("checkpoint_*/config.yaml"))
    assert yaml.safe_load(saved[-1].read_text())["loss"]["weighting"] == "uncertainty"
