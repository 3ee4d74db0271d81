"""Evaluation: the library pieces (mult.experiments.transfer, .transfer_report) and pipelines.evaluate.

The end-to-end tests generate data in all four formats with ``pipelines.synth``, shard it with
``pipelines.shard`` and evaluate a small constant-prediction model (it stands in for a trained
network, so the expected numbers can be computed by hand from the decoded targets).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mult.data.datasets import DATASETS
from mult.experiments.transfer import (
    EvaluationError,
    compute_metrics,
    evaluate_batches,
    finetune,
    gaussian_blur,
    merge_grids,
    plan_sets,
    select_tasks,
    sum_states,
)
from mult.experiments.transfer_report import attach_baselines, markdown_report, summary_table, write_report
from mult.experiments.viz import GridSample
from pipelines import evaluate as ev


# --------------------------------------------------------------------------------------------
# Pure pieces.
# --------------------------------------------------------------------------------------------
def test_select_tasks_intersection_and_reasons():
    tasks, skipped = select_tasks(["normal", "depth_zbuffer", "edge_texture"], ["depth_zbuffer", "segment_semantic"], "nyu")
    assert tasks == ["depth_zbuffer"]
    assert set(skipped) == {"normal", "edge_texture", "segment_semantic"}
    assert "nyu shards carry no normal" in skipped["normal"]
    assert "checkpoint was not trained" in skipped["segment_semantic"]


def test_gaussian_blur_matches_direct_convolution():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(2, 3, 12, 11))).double()
    sigma = 1.3
    out = gaussian_blur(x, sigma).numpy()
    r = math.ceil(3 * sigma)
    k1 = np.exp(-np.arange(-r, r + 1) ** 2 / (2 * sigma**2))
    k2 = np.outer(k1, k1) / k1.sum() ** 2
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (r, r), (r, r)), mode="reflect")
    i, j = 5, 4  # one output pixel, by the 2-D definition
    expected = (padded[:, :, i : i + 2 * r + 1, j : j + 2 * r + 1] * k2).sum(axis=(2, 3))
    np.testing.assert_allclose(out[:, :, i, j], expected, rtol=1e-12)
    # A constant image stays constant; so blurring commutes with the affine normalisation.
    const = torch.full((1, 3, 8, 8), 0.7, dtype=torch.float64)
    torch.testing.assert_close(gaussian_blur(const, 2.0), const)
    with pytest.raises(EvaluationError, match="sigma"):
        gaussian_blur(x, 0.0)


def test_sum_states_and_shape_check():
    a, b = torch.tensor([1.0, 2.0], dtype=torch.float64), np.array([0.5, 4.0])
    torch.testing.assert_close(sum_states([a, b]), torch.tensor([1.5, 6.0], dtype=torch.float64))
    with pytest.raises(EvaluationError, match="shape"):
        sum_states([a, torch.zeros(3)])
    with pytest.raises(EvaluationError, match="no worker"):
        sum_states([])


def test_merge_grids_independent_of_split():
    samples = [GridSample(f"k{i:02d}", np.zeros((3, 2, 2), np.float32)) for i in range(9)]
    parts_a = [samples[:5], samples[5:]]
    parts_b = [samples[::3], samples[1::3], samples[2::3]]
    keys = lambda parts: [s.key for s in merge_grids(parts, 4)]  # noqa: E731
    assert keys(parts_a) == keys(parts_b) == ["k00", "k01", "k02", "k03"]


def _results():
    return {
        "checkpoint": "ckpt",
        "model_tasks": ["depth_zbuffer", "normal"],
        "sets": [
            {
                "label": "taskonomy", "name": "taskonomy", "url": "/x", "num_samples": 3,
                "tasks": ["depth_zbuffer", "normal"], "skipped": {},
                "metrics": {"depth_zbuffer": {"abs_rel": 0.2, "delta1": 0.75}, "normal": {"mean_angle": float("nan")}},
                "alignment": "native", "finetune": None, "corruption": None,
            },
            {
                "label": "nyu+ft", "name": "nyu", "url": "/y", "num_samples": 2, "tasks": ["depth_zbuffer"],
                "skipped": {"normal": "the nyu shards carry no normal labels"},
                "metrics": {"depth_zbuffer": {"abs_rel": 0.3}}, "alignment": "metres",
                "finetune": {"url": "/t", "steps": 3, "lr": 1e-4}, "corruption": None,
            },
        ],
        "label_map": "| NYU40 id | ... |",
    }


def test_report_with_baselines(tmp_path):
    results = _results()
    attach_baselines(results, {"taskonomy": {"depth_zbuffer": {"abs_rel": 0.25, "delta1": 0.5}}})
    assert results["sets"][0]["relative_change"]["depth_zbuffer"] == pytest.approx({"abs_rel": 20.0, "delta1": 50.0})
    assert "baselines" not in results["sets"][1]
    json_path, md_path = write_report(results, tmp_path)
    data = json.loads(json_path.read_text())  # NaN written as null: valid JSON
    assert data["sets"][0]["metrics"]["normal"]["mean_angle"] is None
    md = md_path.read_text()
    assert "| taskonomy | depth_zbuffer | abs_rel ↓ | 0.2 | 0.25 | +20.00% |" in md
    assert "| taskonomy | depth_zbuffer | delta1 ↑ | 0.75 | 0.5 | +50.00% |" in md
    assert "| nyu+ft | depth_zbuffer | abs_rel ↓ | 0.3 | – | – |" in md
    assert "skipped normal: the nyu shards carry no normal labels" in md
    assert "fine-tuned first on `/t` for 3 steps" in md
    assert "NYU40 -> Taskonomy" in md and "| NYU40 id | ... |" in md


def test_report_without_baselines_has_no_baseline_columns():
    md = markdown_report(_results())
    assert "| set | task | metric | value |\n" in md
    assert "baseline |" not in md.split("## Sets")[0]


# --------------------------------------------------------------------------------------------
# Argument checking (no data needed).
# --------------------------------------------------------------------------------------------
def _plan(*extra: str):
    args = ev.get_args_parser().parse_args(["--checkpoint", "c", "--out", "o", *extra])
    return plan_sets(args.data, args.finetune, args.blur)


def test_plan_runs_rows():
    runs = _plan("--data", "taskonomy=/t", "nyu=/n", "--finetune", "nyu=/nt", "--blur", "2", "0.5")
    assert [(r.label, r.name, r.url) for r in runs] == [
        ("taskonomy", "taskonomy", "/t"), ("nyu", "nyu", "/n"), ("nyu+ft", "nyu", "/n"),
        ("taskonomy+blur2", "taskonomy", "/t"), ("taskonomy+blur0.5", "taskonomy", "/t"),
    ]
    assert runs[2].finetune_url == "/nt" and runs[3].blur_sigma == 2.0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--data", "kitti=/k"], "unknown evaluation set 'kitti'"),
        (["--data", "taskonomy"], "expected NAME=URL"),
        (["--data", "nyu="], "empty URL"),
        (["--data", "nyu=/a", "nyu=/b"], "given twice"),
        (["--data", "nyu=/a", "--finetune", "replica=/r"], "give its test shards"),
        (["--data", "nyu=/a", "--blur", "1"], "give --data taskonomy"),
        (["--data", "taskonomy=/a", "--blur", "-1"], "sigma must be a finite number > 0"),
        (["--data", "taskonomy=/a", "--blur", "nan"], "sigma must be a finite number > 0"),
    ],
)
def test_plan_runs_errors(extra, message):
    with pytest.raises(EvaluationError, match=message):
        _plan(*extra)


def test_only_cocodoom_lacks_metric_depth():
    assert [n for n, spec in DATASETS.items() if not spec.metric_depth] == ["cocodoom"]


# --------------------------------------------------------------------------------------------
# evaluate_batches with a constant model, numbers computed by hand.
# --------------------------------------------------------------------------------------------
CONST = {"depth_zbuffer": 0.5, "keypoints2d": 0.2, "edge_texture": -0.1, "reshading": 0.3}
ALL_TASKS = ["segment_semantic", "depth_zbuffer", "normal", "keypoints2d", "edge_texture", "reshading"]


class ConstantModel(torch.nn.Module):
    """Stands in for a trained MulT with known outputs: constant depth/keypoints/edges/shading
    (target units), normals (0, 0, -1) (facing the camera), segmentation class 1 everywhere."""

    def __init__(self, tasks=ALL_TASKS):
        super().__init__()
        self.tasks = list(tasks)
        self.bias = torch.nn.Parameter(torch.zeros(()))  # so .to() and fine-tuning have a parameter

    def forward(self, x):
        b, _, h, w = x.shape
        out = {}
        for t in self.tasks:
            if t == "segment_semantic":
                y = torch.zeros(b, 18, h, w)
                y[:, 1] = 1.0
            elif t == "normal":
                y = torch.zeros(b, 3, h, w)
                y[:, 2] = -1.0
            else:
                y = torch.full((b, 1, h, w), CONST[t])
            out[t] = y + 0 * self.bias
        return out


def expected_metrics(targets: dict, valid: dict) -> dict:
    """The constant model's metrics, computed with numpy from the targets of every sample
    (``targets[t]``: list of per-sample arrays, ``valid[t]``: list of bool masks)."""
    exp = {}
    if "depth_zbuffer" in targets:
        p = (CONST["depth_zbuffer"] * 1000 + 1500) / 512  # metres
        errs, si = [], []
        for tgt, ok in zip(targets["depth_zbuffer"], valid["depth_zbuffer"]):
            t = (tgt[0].astype(np.float64) * 1000 + 1500) / 512
            t = t[ok & (t > 1e-3)]
            if t.size == 0:
                continue
            errs.append(t)
            med = np.sort(t)[(t.size - 1) // 2]  # torch's lower median; p is constant
            si.append((t, med))
        t = np.concatenate(errs)
        exp["depth_zbuffer"] = {
            "l1_m": np.abs(p - t).mean(), "abs_rel": (np.abs(p - t) / t).mean(),
            "rmse_m": np.sqrt(((p - t) ** 2).mean()),
            "delta1": 100 * (np.maximum(p / t, t / p) < 1.25).mean(),
            "si_abs_rel": np.concatenate([np.abs(m - t) / t for t, m in si]).mean(),
            "si_delta1": 100 * np.concatenate([np.maximum(m / t, t / m) < 1.25 for t, m in si]).mean(),
        }
    if "normal" in targets:
        angles = []
        for tgt, ok in zip(targets["normal"], valid["normal"]):
            v = tgt.astype(np.float64)[:, ok]
            cos = -v[2] / np.linalg.norm(v, axis=0)
            angles.append(np.degrees(np.arccos(np.clip(cos, -1, 1))))
        a = np.concatenate(angles)
        exp["normal"] = {"mean_angle": a.mean(), "within_30": 100 * (a < 30).mean()}
    if "segment_semantic" in targets:
        labels = np.concatenate([t[ok & (t != 0)] for t, ok in zip(targets["segment_semantic"], valid["segment_semantic"])])
        present = np.unique(labels)
        n1 = (labels == 1).sum()
        exp["segment_semantic"] = {
            "pixel_acc": 100 * n1 / labels.size,
            "miou": 100 * (n1 / labels.size) / len(present) if 1 in present else 100 * 0 / (len(present) + 1),
        }
    for task in ("keypoints2d", "edge_texture", "reshading"):
        if task in targets:
            diffs = [np.abs(CONST[task] - t.astype(np.float64))[:, ok] for t, ok in zip(targets[task], valid[task])]
            exp[task] = {"l1": np.concatenate([d.reshape(-1) for d in diffs]).mean()}
    return exp


def assert_metrics_match(got: dict, exp: dict) -> None:
    for task, metrics in exp.items():
        for name, value in metrics.items():
            assert got[task][name] == pytest.approx(value, rel=1e-6, abs=1e-9), (task, name)


def _fake_batches(n_batches=2, b=2, h=8, w=8, seed=0):
    """Loader-shaped batches with random targets (stand in for decoded shards)."""
    rng = np.random.default_rng(seed)
    batches = []
    for i in range(n_batches):
        depth = rng.uniform(-1.4, 5.0, size=(b, 1, h, w)).astype(np.float32)
        normal = rng.normal(size=(b, 3, h, w)).astype(np.float32)
        seg = rng.integers(0, 5, size=(b, h, w))
        targets = {
            "depth_zbuffer": torch.from_numpy(depth), "normal": torch.from_numpy(normal),
            "segment_semantic": torch.from_numpy(seg),
            **{t: torch.from_numpy(rng.normal(size=(b, 1, h, w)).astype(np.float32)) for t in ("keypoints2d", "edge_texture", "reshading")},
        }
        valid = {t: torch.from_numpy(rng.random((b, h, w)) > 0.2) for t in targets}
        batches.append({"key": [f"s{i}-{j}" for j in range(b)], "rgb": torch.randn(b, 3, h, w), "targets": targets, "valid": valid})
    return batches


def _collect(batches, tasks):
    targets = {t: [x.numpy() for bt in batches for x in bt["targets"][t]] for t in tasks}
    valid = {t: [x.numpy() for bt in batches for x in bt["valid"][t]] for t in tasks}
    return targets, valid


def test_evaluate_batches_constant_model_by_hand():
    batches = _fake_batches()
    out = evaluate_batches(ConstantModel(), batches, ALL_TASKS, grid_samples=3)
    assert out.num_samples == 4
    assert [s.key for s in out.grid] == ["s0-0", "s0-1", "s1-0"]
    got = compute_metrics(ALL_TASKS, out.state, "taskonomy")
    assert_metrics_match(got, expected_metrics(*_collect(batches, ALL_TASKS)))
    # CocoDoom keeps only the scale-invariant depth metrics.
    doom = compute_metrics(ALL_TASKS, out.state, "cocodoom")
    assert set(doom["depth_zbuffer"]) == {"si_abs_rel", "si_rmse_m", "si_delta1"}


def test_split_states_sum_to_the_whole():
    batches = _fake_batches(n_batches=3)
    whole = evaluate_batches(ConstantModel(), batches, ALL_TASKS).state
    parts = [evaluate_batches(ConstantModel(), [bt], ALL_TASKS).state for bt in batches]
    torch.testing.assert_close(sum_states(parts), whole, rtol=1e-13, atol=0)


def test_evaluate_batches_absent_targets_and_predictions():
    batches = _fake_batches(1)
    del batches[0]["targets"]["edge_texture"]
    out = evaluate_batches(ConstantModel(), batches, ["depth_zbuffer", "edge_texture"])
    got = compute_metrics(["depth_zbuffer", "edge_texture"], out.state, "taskonomy")
    assert set(got) == {"depth_zbuffer"}  # a task without labels in the data gets no numbers
    with pytest.raises(KeyError, match="'depth_zbuffer' has a target but no prediction"):
        evaluate_batches(ConstantModel(["normal"]), _fake_batches(1), ["depth_zbuffer"])


def test_finetune_lowers_the_loss():
    class Affine(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 1, 1)

        def forward(self, x):
            return {"keypoints2d": self.conv(x)}

    torch.manual_seed(0)
    batches = _fake_batches(2)
    for bt in batches:  # a learnable target: a fixed linear map of the input
        bt["targets"]["keypoints2d"] = 0.5 * bt["rgb"][:, :1] - 0.2
    model = Affine()
    history = finetune(model, lambda: batches, ["keypoints2d"], steps=30, lr=0.05, weight_decay=0.0)
    assert len(history) == 30 and history[-1] < 0.5 * history[0]
    assert not model.training
    with pytest.raises(EvaluationError, match="no batches"):
        finetune(model, lambda: [], ["keypoints2d"], steps=2)


def test_delta_m_in_report():
    results = _results()
    results["sets"][1]["metrics"]["depth_zbuffer"]["l1_m"] = 0.4
    attach_baselines(results, {"nyu": {"depth_zbuffer": {"l1_m": 0.5}}, "taskonomy": {"depth_zbuffer": {"abs_rel": 0.1}}})
    assert results["sets"][1]["delta_m"] == pytest.approx(20.0)  # lower l1 is better: +20 %
    assert results["sets"][0]["delta_m"] is None  # baselines lack the primary metrics
    md = markdown_report(results)
    assert "Delta-m vs single-task baselines (primary metrics): +20.00%" in md
    assert "no Delta-m: cannot compute delta_m" in md


# --------------------------------------------------------------------------------------------
# End to end on generated data in all four formats.
# --------------------------------------------------------------------------------------------
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SPLITS = {"taskonomy": "test", "replica": None, "nyu": "test", "cocodoom": "run-test"}


def _shard(source: Path, out: str, fmt: str, split: str | None) -> str:
    cmd = [sys.executable, "-m", "pipelines.shard", "--format", fmt, "--source", str(source), "--out", out,
           "--executor", "local", "--samples-per-shard", "2"]
    if split:
        cmd += ["--split", split]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return out


@pytest.fixture(scope="module")
def shard_sets(synth_tree, tmp_path_factory):
    """Test-split shards of a generated dataset per format: ``{name: url}``, plus NYU train."""
    root = tmp_path_factory.mktemp("eval-shards")
    urls = {}
    for fmt, split in SPLITS.items():
        urls[fmt] = _shard(synth_tree(fmt, scenes=2, views=2, size=32), str(root / fmt), fmt, split)
    urls["nyu-train"] = _shard(synth_tree("nyu", scenes=2, views=2, size=32), str(root / "nyu-train"), "nyu", "train")
    return urls


def _loader_targets(url: str, tasks: list[str], size: int):
    """Every test sample's decoded targets, read in one process (the reference for by-hand)."""
    from mult.data.loader import make_loader

    batches = list(make_loader(url, tasks=tasks, image_size=size, batch_size=4, mode="eval"))
    present = [t for t in tasks if t in batches[0]["targets"]]
    return _collect(batches, present), sum(len(b["key"]) for b in batches), sorted(k for b in batches for k in b["key"])


def _patch_model(monkeypatch, model, tasks, img_size):
    from mult.config import Config
    from mult.training import checkpoint

    cfg = Config(tasks=list(tasks))
    cfg.model.img_size = img_size
    monkeypatch.setattr(checkpoint, "load_model", lambda url, map_location="cpu": (model, cfg))


def test_evaluate_four_formats_by_hand(shard_sets, tmp_path, monkeypatch):
    """No Ray: every set, the constant model, expected numbers from the decoded targets."""
    _patch_model(monkeypatch, ConstantModel(), ALL_TASKS, 32)
    out = tmp_path / "out"
    data = [f"{n}={shard_sets[n]}" for n in SPLITS]
    results = ev.main(["--checkpoint", "const", "--data", *data, "--out", str(out), "--no-ray", "--grid-samples", "2"])
    sets = {e["label"]: e for e in results["sets"]}
    assert list(sets) == list(SPLITS)
    from mult.data.samples import read_manifest

    for name, entry in sets.items():
        manifest_tasks = read_manifest(shard_sets[name])["tasks"]
        assert entry["tasks"] == [t for t in ALL_TASKS if t in manifest_tasks], name
        assert set(entry["skipped"]) == set(ALL_TASKS) - set(entry["tasks"])
        (targets, valid), n, keys = _loader_targets(shard_sets[name], entry["tasks"], 32)
        assert entry["num_samples"] == n > 0
        exp = expected_metrics(targets, valid)
        if name == "cocodoom":
            exp["depth_zbuffer"] = {k: v for k, v in exp["depth_zbuffer"].items() if k.startswith("si_")}
            assert set(entry["metrics"]["depth_zbuffer"]) == {"si_abs_rel", "si_rmse_m", "si_delta1"}
        assert_metrics_match(entry["metrics"], exp)
        for task in entry["tasks"]:
            assert (out / "grids" / f"{name}_{task}.png").is_file()
    assert "depth_zbuffer" in sets["nyu"]["tasks"] and "segment_semantic" in sets["nyu"]["tasks"]
    assert {"depth_zbuffer", "normal", "reshading"} <= set(sets["replica"]["tasks"])
    saved = json.loads((out / "results.json").read_text())
    assert [e["label"] for e in saved["sets"]] == list(SPLITS)
    md = (out / "report.md").read_text()
    assert "| nyu | segment_semantic | miou ↑ |" in md
    assert "| cocodoom | depth_zbuffer | si_abs_rel ↓ |" in md and "| cocodoom | depth_zbuffer | abs_rel" not in md
    assert "NYU40 -> Taskonomy" in md and "| 6 | sofa | 4 | couch |" in md
    assert "unit alignment: depth in Doom map units" in md


def test_bad_dataset_urls(shard_sets, tmp_path, monkeypatch):
    _patch_model(monkeypatch, ConstantModel(), ALL_TASKS, 32)
    base = ["--checkpoint", "const", "--out", str(tmp_path), "--no-ray"]
    with pytest.raises(EvaluationError, match=r"--data taskonomy=.*nowhere: cannot read a shard manifest"):
        ev.main([*base, "--data", f"taskonomy={tmp_path / 'nowhere'}"])
    with pytest.raises(EvaluationError, match="in the 'taskonomy' format, not 'nyu'"):
        ev.main([*base, "--data", f"nyu={shard_sets['taskonomy']}"])
    with pytest.raises(EvaluationError, match="--finetune nyu=.*cannot read a shard manifest"):
        ev.main([*base, "--data", f"nyu={shard_sets['nyu']}", "--finetune", f"nyu={tmp_path / 'none'}", "--finetune-steps", "1"])


def _tiny_checkpoint(directory: Path, tasks: list[str]) -> Path:
    """A real (untrained) MulT checkpoint on fewer tasks, written by the trainer's code."""
    from mult import load_config
    from mult.model import build_model
    from mult.training.checkpoint import save_checkpoint

    cfg = load_config(REPO / "configs" / "cpu-small.yaml", [f"tasks=[{','.join(tasks)}]", "model.reference_task=normal"])
    torch.manual_seed(0)
    return save_checkpoint(directory, model=build_model(cfg), config=cfg, step=0)


def test_fewer_tasks_finetune_and_blur(shard_sets, tmp_path):
    """A real checkpoint on two tasks: only those are scored; fine-tuning and blur add rows."""
    ckpt = _tiny_checkpoint(tmp_path / "ckpt", ["depth_zbuffer", "normal"])
    results = ev.main([
        "--checkpoint", str(ckpt), "--out", str(tmp_path / "out"), "--no-ray", "--batch-size", "2",
        "--data", f"taskonomy={shard_sets['taskonomy']}", f"nyu={shard_sets['nyu']}",
        "--finetune", f"nyu={shard_sets['nyu-train']}", "--finetune-steps", "2", "--blur", "3",
    ])
    sets = {e["label"]: e for e in results["sets"]}
    assert list(sets) == ["taskonomy", "nyu", "nyu+ft", "taskonomy+blur3"]
    assert sets["taskonomy"]["tasks"] == ["depth_zbuffer", "normal"]
    assert set(sets["taskonomy"]["metrics"]) == {"depth_zbuffer", "normal"}
    for task in ("segment_semantic", "keypoints2d", "edge_texture", "reshading"):
        assert sets["taskonomy"]["skipped"][task] == "the checkpoint was not trained on it"
    assert sets["nyu"]["tasks"] == ["depth_zbuffer"] and "normal" in sets["nyu"]["skipped"]
    assert sets["nyu+ft"]["finetune"]["steps"] == 2
    assert sets["nyu+ft"]["metrics"]["depth_zbuffer"] != sets["nyu"]["metrics"]["depth_zbuffer"]
    assert sets["taskonomy+blur3"]["corruption"] == {"type": "gaussian_blur", "sigma": 3.0}
    assert sets["taskonomy+blur3"]["metrics"] != sets["taskonomy"]["metrics"]
    assert results["label_map"] is None  # NYU segmentation was not scored


def test_summary_table_primary_metrics():
    lines = summary_table(_results()).splitlines()
    assert lines[0] == "| set | depth_zbuffer | normal |"
    # taskonomy has no l1_m: the first depth metric it reports is abs_rel; nyu+ft has no normals.
    assert lines[2] == "| taskonomy | 0.2 (abs_rel ↓) | – (mean_angle ↓) |"
    assert lines[3] == "| nyu+ft | 0.3 (abs_rel ↓) | – |"


def test_distributed_on_s3_equals_single_process(ray_head, s3_server, synth_tree, shard_sets, tmp_path):
    """Ray: checkpoint and shards on S3 (moto), 2 workers per set; the driver's sum of their
    MetricSuite states gives the numbers of one process over the local copy of the shards."""
    import ray

    from mult.data.storage import open_storage

    bucket = s3_server.make_bucket("eval-dist")
    ckpt = _tiny_checkpoint(tmp_path / "ckpt", ["segment_semantic", "depth_zbuffer", "normal"])
    remote_ckpt = open_storage(f"{bucket}/ckpt")
    for path in ckpt.iterdir():
        remote_ckpt.write_bytes(path.name, path.read_bytes())
    s3_data = {n: _shard(synth_tree(n, scenes=2, views=2, size=32), f"{bucket}/{n}", n, SPLITS[n]) for n in ("taskonomy", "nyu")}
    common = ["--batch-size", "1", "--grid-samples", "3"]
    try:
        dist = ev.main(["--checkpoint", f"{bucket}/ckpt", "--out", str(tmp_path / "dist"), "--num-workers", "2",
                        "--data", *(f"{n}={u}" for n, u in s3_data.items()), *common,
                        "--finetune", f"nyu={shard_sets['nyu-train']}", "--finetune-steps", "1"])
    finally:
        ray.shutdown()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the Ray workers, so float32 kernels sum in the same order
    try:
        single = ev.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "single"), "--num-workers", "1", "--no-ray",
                          "--data", *(f"{n}={shard_sets[n]}" for n in s3_data), *common])
    finally:
        torch.set_num_threads(threads)
    assert [d["label"] for d in dist["sets"]] == ["taskonomy", "nyu", "nyu+ft"]  # fine-tuned in a Ray task
    assert dist["sets"][2]["metrics"]["depth_zbuffer"] != dist["sets"][1]["metrics"]["depth_zbuffer"]
    for d, s in zip(dist["sets"], single["sets"]):
        assert d["workers"] == 2 and s["workers"] == 1
        assert d["num_samples"] == s["num_samples"] and d["tasks"] == s["tasks"]
        assert d["grid_keys"] == s["grid_keys"]
        for task, metrics in s["metrics"].items():
            for name, value in metrics.items():
                assert d["metrics"][task][name] == pytest.approx(value, rel=1e-12, abs=1e-12, nan_ok=True), (d["label"], task, name)
    assert (tmp_path / "dist" / "grids" / "nyu_segment_semantic.png").is_file()


def test_ray_job_submit_smoke(ray_head, shard_sets, tmp_path):
    """The same command as a Ray job (``ray job submit``), in smoke-test mode."""
    ckpt = _tiny_checkpoint(tmp_path / "ckpt", ["depth_zbuffer", "normal"])
    out = tmp_path / "out"
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", ray_head.dashboard_url, "--",
           sys.executable, "-m", "pipelines.evaluate", "--checkpoint", str(ckpt), "--out", str(out),
           "--data", f"replica={shard_sets['replica']}", "--smoke-test"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    saved = json.loads((out / "results.json").read_text())
    assert saved["partial"] is True and "**Partial run**" in (out / "report.md").read_text()
    entry = saved["sets"][0]
    assert entry["label"] == "replica" and entry["tasks"] == ["depth_zbuffer", "normal"]
    assert entry["num_samples"] > 0 and (out / "grids" / "replica_normal.png").is_file()


def test_constant_predictor_rows_follow_each_plain_set(shard_sets, tmp_path):
    """The floor: each plain set's row is followed by the constant predictor's, fitted on the
    checkpoint's training shards; its loss is the L1 of the per-pixel median (numpy's) there."""
    from mult import load_config
    from mult.losses import masked_l1
    from mult.model import build_model
    from mult.training.checkpoint import save_checkpoint

    train = shard_sets["taskonomy"]  # fitted and scored on the same shards: the median's own loss
    cfg = load_config(REPO / "configs" / "cpu-small.yaml", ["tasks=[normal,depth_zbuffer]", "model.img_size=32",
                                                            "model.reference_task=normal", f"data.train={train}"])
    ckpt = save_checkpoint(tmp_path / "ckpt", model=build_model(cfg), config=cfg, step=0)
    results = ev.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "out"), "--no-ray", "--batch-size", "2",
                       "--data", f"taskonomy={train}", f"nyu={shard_sets['nyu']}", "--blur", "2"])
    labels = [e["label"] for e in results["sets"]]
    assert labels == ["taskonomy", "taskonomy: constant predictor", "nyu", "nyu: constant predictor",
                      "taskonomy+blur2"]
    floor = results["sets"][1]
    assert floor["floor"] and sorted(floor["tasks"]) == ["depth_zbuffer", "normal"]
    (targets, valid), _, _ = _loader_targets(train, ["normal"], 32)
    y, v = np.stack(targets["normal"]), np.stack(valid["normal"])
    masked = np.where(v[:, None], y, np.nan)
    count = (~np.isnan(masked)).sum(axis=0)
    ordered = np.sort(masked, axis=0)  # NaN last
    median = np.take_along_axis(ordered, np.maximum(count - 1, 0)[None] // 2, axis=0)[0]
    expected = masked_l1(torch.from_numpy(median).float().expand(len(y), -1, -1, -1), torch.from_numpy(y),
                         torch.from_numpy(v))
    # the suite averages each batch's loss (over that batch's valid pixels), this pools them: a
    # hair apart (the median's own choice is checked against numpy in test_constant.py)
    assert floor["metrics"]["normal"]["loss"] == pytest.approx(float(expected), rel=1e-3)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| taskonomy: constant predictor |" in md and "Rows ending in *constant predictor* are the floor" in md
