"""The main job, `python -m pipelines.demo`, end to end at its smallest setting.

It runs as a real subprocess: it starts its own S3-compatible server (moto) and runs every
stage's entry point as a subprocess. It joins the session's Ray head through ``RAY_ADDRESS``
(the demo's documented behaviour when a cluster is given) rather than starting a second Ray
instance on this host, which would break Ray's clean-up of the other one.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _port_is_closed(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        return sock.connect_ex(("127.0.0.1", port)) != 0


def test_demo_runs_the_whole_chain(ray_head, tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.demo", "--out", str(out), "--smallest"],
        cwd=REPO, capture_output=True, text=True, timeout=840,  # under pytest-timeout's 900 s
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]

    # Every stage ran, in order, and said so.
    for stage in range(1, 8):
        assert f"[{stage}/7]" in log
    assert "using the Ray cluster at RAY_ADDRESS" in log

    # The data went through the demo's own S3 server, which is gone afterwards.
    port = int(re.search(r"listening on http://127\.0\.0\.1:(\d+)", log).group(1))
    assert _port_is_closed(port)

    # Tune's best weights are an override file the training stage accepted.
    best = yaml.safe_load((out / "tune" / "best.yaml").read_text())
    assert set(best["loss_weights"]) >= {"depth_zbuffer", "segment_semantic"}
    retrain = json.loads((out / "retrain" / "summary.json").read_text())
    assert retrain["run_url"].startswith("s3://mult-demo/runs/demo-best-")

    # Domain transfer on all four sets, plus the blurred Taskonomy row, with grids.
    results = json.loads((out / "eval" / "results.json").read_text())
    text = json.dumps(results)
    for name in ("taskonomy", "replica", "nyu", "cocodoom", "taskonomy+blur"):
        assert f'"{name}' in text, name
    assert list((out / "eval" / "grids").glob("*.png"))

    labels = [e["label"] for e in results["sets"]]
    for name in ("taskonomy", "replica", "nyu", "cocodoom"):  # each plain set is followed by its floor
        assert labels[labels.index(name) + 1] == f"{name}: constant predictor"

    report = (out / "report.md").read_text()
    for heading in ("## Stages", "## Training (default weights)", "## Loss-weight search",
                    "## The model against the floor (taskonomy test)", "## Domain transfer"):
        assert heading in report


def test_demo_refuses_a_non_empty_output_directory(tmp_path):
    (tmp_path / "keep.txt").write_text("precious")
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.demo", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "is not empty" in proc.stderr + proc.stdout
    assert (tmp_path / "keep.txt").read_text() == "precious"
