"""pipelines.ablate: command-line errors, and one real tiny ablation end to end (Ray tasks on the
session's Ray head, generated data, 2 tasks x 2 seeds x 4 steps) that is then resumed."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines import ablate

REPO = Path(__file__).resolve().parents[1]


def test_bad_input_exits_2_with_a_message(tmp_path, caplog):
    caplog.set_level(logging.ERROR)
    assert ablate.main(["--config", "configs/cpu-small.yaml", "--out", str(tmp_path)]) == 2
    assert "data.train" in caplog.text  # no data and no --smoke-test
    caplog.clear()
    assert ablate.main(["--config", "configs/cpu-small.yaml", "--out", str(tmp_path), "tasks=[normals]"]) == 2
    assert "normals" in caplog.text and "valid tasks" in caplog.text
    with pytest.raises(SystemExit):
        ablate.main(["--config", "configs/cpu-small.yaml", "--out", str(tmp_path), "--seeds", "0,x"])
    with pytest.raises(SystemExit):
        ablate.main(["--config", "configs/cpu-small.yaml", "--out", str(tmp_path), "--modes", "shared"])


def _ablate(out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pipelines.ablate", "--config", "configs/cpu-small.yaml", "--smoke-test",
           "--out", str(out), "--seeds", "0,1", "tasks=[normal,depth_zbuffer]", *extra]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


@pytest.mark.timeout(900)
def test_smoke_ablation_end_to_end_and_resume(ray_head, tmp_path):
    out = tmp_path / "ablation"
    first = _ablate(out)
    assert "12 runs (0 finished, 12 to train)" in first.stderr
    runs = sorted((out / "runs").glob("*.json"))
    # 2 tasks x 2 seeds baselines + 4 modes x 2 seeds; the pair and num-tasks k=2 are the modes'
    # reference run, trained once
    assert len(runs) == 12
    for name in ("report.md", "results.json", "baselines.json", "modes.md", "pairwise.md", "num_tasks.md",
                 "modes.png", "pairwise.png", "num_tasks.png"):
        assert (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    assert results["missing_runs"] == []
    for mode in ("reference", "official", "encoder", "none"):
        dm = results["modes"]["modes"][mode]["delta_m"]
        assert dm["n"] == 2 and dm["mean"] is not None
    table = results["pairwise"]["table"]
    assert table["normal"]["depth_zbuffer"]["n"] == 2 and table["depth_zbuffer"]["normal"]["n"] == 2
    assert [r["k"] for r in results["num_tasks"]["rows"]] == [2]
    floor = results["modes"]["constant"]  # the constant predictor on the same validation batches
    assert set(floor) == {"normal", "depth_zbuffer"} and "mean_angle" in floor["normal"]
    report = (out / "report.md").read_text()
    assert "| constant predictor (the floor) |" in report
    assert "| mode | Delta-m % |" in report and "| tested \\ partner |" in report and "| k | added |" in report
    baselines = json.loads((out / "baselines.json").read_text())
    assert set(baselines) == {"normal", "depth_zbuffer"} and "mean_angle" in baselines["normal"]

    # Resume: one result removed -> only that run trains; the others are untouched.
    removed = out / "runs" / "normal+depth_zbuffer-encoder-seed1.json"
    removed.unlink()
    stamps = {p.name: p.stat().st_mtime_ns for p in runs if p != removed}
    second = _ablate(out)
    assert "12 runs (11 finished, 1 to train)" in second.stderr
    assert removed.is_file()
    assert {p.name: p.stat().st_mtime_ns for p in runs if p != removed} == stamps
    assert json.loads((out / "results.json").read_text())["missing_runs"] == []
