"""``python -m bench.gpu``: the one-command GPU validation, run here on the CPU as its smoke test.

The smoke test runs every part as the GPU run does (each in its own process): the training step
of every shared-attention mode, activation checkpointing, compile (``aot_eager`` on a CPU), the
generated shards and the loader, and Ray Train through the training stage's path on the
session's Ray head, with a checkpoint restored.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from mult.config import SHARED_ATTENTION_MODES

REPO = Path(__file__).resolve().parents[1]
PARTS = ["probe", *(f"step/{m}" for m in SHARED_ATTENTION_MODES), "checkpointing", "data", "loader",
         "ray_train", "compile"]


def _bench(out: Path, *args: str, timeout: float = 840) -> tuple[subprocess.CompletedProcess, dict]:
    proc = subprocess.run([sys.executable, "-m", "bench.gpu", "--out", str(out), "--device", "cpu", "--smoke-test",
                           *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    report = json.loads((out / "gpu.json").read_text()) if (out / "gpu.json").exists() else {}
    return proc, report


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_smoke_run_has_every_part_with_numbers(ray_head, tmp_path: Path) -> None:
    proc, report = _bench(tmp_path / "out", "--budget-s", "780")  # inside the subprocess's 840 s
    assert proc.returncode == 0, proc.stderr[-4000:]
    parts = report["parts"]
    assert list(parts) == PARTS
    assert {n: (p["status"], p["error"]) for n, p in parts.items()} == {n: ("ok", None) for n in PARTS}

    peak = parts["probe"]["result"]["peak"]
    assert _number(peak["tflops"]) and peak["tflops"] > 0 and peak["source"].startswith("measured")
    for name in (*(f"step/{m}" for m in SHARED_ATTENTION_MODES), "checkpointing", "compile"):
        res = parts[name]["result"]
        assert res["precision"] == "fp32"  # the step's rule on a CPU, though paper.yaml says bf16
        batches = res["batches"]
        assert [b["batch"] for b in batches] == ([2] if name == "compile" else [1, 2])
        for b in batches:
            assert b["fits"]
            for key in ("samples_per_s", "peak_memory_bytes", "flops_per_sample", "achieved_tflops", "mfu"):
                assert _number(b[key]) and b[key] > 0, (name, key, b)
            if name.startswith("step/"):
                assert b["flops_per_step"] == b["flops_per_sample"] * b["batch"]
            else:
                assert _number(b["speed_vs_eager"]) and _number(b["memory_vs_eager"])
    assert parts["compile"]["result"]["compile_backend"] == "aot_eager"
    # sharing the attention map saves FLOPs (BENCHMARKS.md, Model)
    per_sample = {m: parts[f"step/{m}"]["result"]["batches"][0]["flops_per_sample"] for m in SHARED_ATTENTION_MODES}
    assert per_sample["reference"] < per_sample["none"]

    assert parts["data"]["result"]["train_samples"] == 32
    loader = parts["loader"]["result"]["batches"]
    assert [b["batch"] for b in loader] == [1, 2]
    assert all(_number(b["samples_per_s"]) and _number(b["loader_over_step"]) for b in loader)

    ray = parts["ray_train"]["result"]
    assert (ray["backend"], ray["world_size"]) == ("gloo", 1)
    assert ray["first"]["step"] == 2 and ray["first"]["checkpoint"]
    assert ray["resumed"]["resumed_from_step"] == 2 and ray["resumed"]["step"] == 4
    assert ray["resumed"]["run_name"] == ray["first"]["run_name"]
    assert ray["all_reduce"] == {"sum": 1.0, "backend": "gloo"}

    md = (tmp_path / "out" / "gpu.md").read_text()
    assert "smoke test, not a benchmark" in md
    for name in PARTS:
        assert f"| {name} | ok |" in md
    assert list((tmp_path / "out" / "logs").glob("*.log"))


def test_a_failing_part_is_recorded_and_the_others_run(tmp_path: Path) -> None:
    """A bad override breaks every part that reads the config; the probe does not, and still
    runs; the error names the key; the exit code says something failed."""
    proc, report = _bench(tmp_path / "out", "--parts", "probe,step/none", "model.no_such_key=1", timeout=600)
    assert proc.returncode == 1
    parts = report["parts"]
    assert parts["probe"]["status"] == "ok" and _number(parts["probe"]["result"]["peak"]["tflops"])
    assert parts["step/none"]["status"] == "error" and "no_such_key" in parts["step/none"]["error"]
    assert "| step/none | error |" in (tmp_path / "out" / "gpu.md").read_text()


def test_parts_that_do_not_fit_the_budget_are_skipped_and_reported(tmp_path: Path) -> None:
    proc, report = _bench(tmp_path / "out", "--parts", "probe,data,loader", "--budget-s", "1", timeout=300)
    assert proc.returncode == 1
    parts = report["parts"]
    assert parts["probe"]["status"] == "skipped" and "skipped for time" in parts["probe"]["error"]
    assert parts["data"]["status"] == "skipped"
    assert parts["loader"]["status"] == "error" and "the data part: skipped" in parts["loader"]["error"]


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H200", 989.0), ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L4", 121.0), ("NVIDIA A10G", 125.0), ("Tesla V100-SXM2-16GB", None),
])
def test_peak_table(name: str, tflops: float | None) -> None:
    from bench.gpu import table_peak

    found = table_peak(name)
    assert (found[0] if found else None) == tflops


def test_smoke_dataset_sizes(tmp_path: Path) -> None:
    from mult.data.samples import read_manifest
    from mult.data.smoke import make_smoke_dataset

    train, val = make_smoke_dataset(str(tmp_path), size=16, splits={"train": (1, 3), "val": (1, 1)})
    assert (read_manifest(train)["num_samples"], read_manifest(val)["num_samples"]) == (3, 1)
    assert "train1x3" in train  # not the default dataset's directory, which it would be reused as
    with pytest.raises(ValueError, match="splits must give"):
        make_smoke_dataset(str(tmp_path), size=16, splits={"train": (1, 0), "val": (1, 1)})
