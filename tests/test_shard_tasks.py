"""Conversion keyed on the tasks a user trains: Taskonomy's own layout (no ``mask_valid`` or
``point_info``), ``--tasks`` subsets, what counts toward ``--max-bad``, per-shard tasks in the
manifest, and the training pre-flight that refuses a task the shards lack."""

from __future__ import annotations

import json
import logging
import shutil
import tarfile
from pathlib import Path

import pytest

from mult.data import shards as sh
from mult.data.datasets import get_dataset
from mult.data.loader import make_loader
from mult.data.samples import read_manifest
from mult.tasks import TASKS
from pipelines import shard as cli

ALL_TASKS = list(TASKS)
REPO = Path(__file__).resolve().parents[1]


def _generate(root: Path, *, auxiliary: bool) -> Path:
    """A small plain-layout Taskonomy tree; the same seed renders the same views either way."""
    get_dataset("taskonomy").generate(root, scenes=2, views=2, size=32, seed=3, layout="plain", workers=1,
                                      auxiliary=auxiliary)
    return root


def _convert(source: Path, out: Path, *extra: str) -> dict:
    return cli.main(["--executor", "local", "--format", "taskonomy", "--source", str(source),
                     "--out", str(out), *extra])


def _eval_batch(url: Path) -> dict:
    (batch,) = list(make_loader(str(url), tasks=ALL_TASKS, image_size=32, batch_size=4, mode="eval"))
    return batch


def test_original_layout_converts_with_default_flags(tmp_path: Path) -> None:
    from pipelines.synth import main as synth

    original = tmp_path / "original"
    synth(["--format", "taskonomy", "--out", str(original), "--scenes", "2", "--views", "2", "--size", "32",
           "--seed", "3", "--layout", "plain", "--workers", "1", "--no-auxiliary"])
    assert not (original / "mask_valid").exists() and not (original / "point_info").exists()
    manifest = _convert(original, tmp_path / "o")  # default --max-bad-fraction 0.05
    assert manifest["bad_count"] == 0 and manifest["num_samples"] == 4
    assert manifest["tasks"] == ALL_TASKS and "mask_valid" not in manifest["domains"]
    assert all(s["tasks"] == ALL_TASKS for s in manifest["shards"])
    report = json.loads((tmp_path / "o" / sh.REPORT_NAME).read_text())
    assert report["bad_count"] == 0 and report["counted_tasks"] == ALL_TASKS
    resized = _convert(original, tmp_path / "r", "--resize", "16")  # decodes every view, no mask to respect
    assert resized["bad_count"] == 0 and resized["tasks"] == ALL_TASKS
    assert len(_eval_batch(tmp_path / "r")["key"]) == 4

    # Without mask_valid each target's validity comes from its own encoding. On the same views
    # rendered with the mask, depth (65535 = no surface), normals (128,128,128 holes) and labels
    # (0 where nothing was hit) give exactly the masks mask_valid gives.
    with_mask = _convert(_generate(tmp_path / "omnidata", auxiliary=True), tmp_path / "m")
    assert with_mask["domains"]["mask_valid"] == 4
    bare, masked = _eval_batch(tmp_path / "o"), _eval_batch(tmp_path / "m")
    assert bare["key"] == masked["key"]
    for task in ("depth_zbuffer", "normal", "segment_semantic"):
        assert (bare["valid"][task] == masked["valid"][task]).all(), task
        assert (bare["targets"][task] == masked["targets"][task]).all(), task
    assert not masked["valid"]["normal"].all()  # the views do have holes, so this compared something
    for task in ("keypoints2d", "edge_texture", "reshading"):  # no hole value in these encodings
        inside = masked["valid"][task].unsqueeze(1).expand_as(bare["targets"][task])
        assert bare["valid"][task].all(), task
        assert (bare["targets"][task] == masked["targets"][task])[inside].all(), task


def test_a_tree_without_a_task_folder_converts_by_default(synth_tree, tmp_path: Path) -> None:
    source = shutil.copytree(synth_tree("taskonomy"), tmp_path / "src")
    shutil.rmtree(source / "segment_semantic")  # a download that left it out
    shutil.rmtree(source / "point_info" / "taskonomy")  # an empty folder is no folder
    manifest = _convert(source, tmp_path / "o")
    assert manifest["bad_count"] == 0
    assert manifest["tasks"] == [t for t in ALL_TASKS if t != "segment_semantic"]


def test_task_subset(synth_tree, tmp_path: Path) -> None:
    source = synth_tree("taskonomy")
    manifest = _convert(source, tmp_path / "o", "--tasks", "normal,depth_zbuffer", "--samples-per-shard", "1")
    assert manifest["tasks"] == ["depth_zbuffer", "normal"]
    assert all(s["tasks"] == ["depth_zbuffer", "normal"] for s in manifest["shards"])
    with tarfile.open(tmp_path / "o" / manifest["shards"][0]["name"]) as tar:
        domains = {name.split(".")[1] for name in tar.getnames()}
    assert domains == {"rgb", "depth_zbuffer", "normal", "mask_valid", "point_info"}  # auxiliaries kept
    # A rerun into the same output with another task list is refused (the shards would differ).
    with pytest.raises(sh.ConversionError, match="tasks"):
        _convert(source, tmp_path / "o", "--tasks", "normal")


def test_missing_files_count_only_for_rgb_and_requested_tasks(synth_tree, tmp_path: Path) -> None:
    source = shutil.copytree(synth_tree("taskonomy"), tmp_path / "src")
    building = sorted(p.name for p in (source / "rgb" / "taskonomy").iterdir())[0]
    for folder, name in (("normal", "normal"), ("mask_valid", "mask_valid"), ("point_info", "point_info")):
        victim = next((source / folder / "taskonomy" / building).glob(f"point_0_view_0_domain_{name}.*"))
        victim.unlink()
    settings = sh.ShardSettings(format="taskonomy", source=str(source), tasks=["normal"])
    with pytest.raises(sh.ConversionError, match=r"1 bad file\(s\) \(\{'missing': 1\}; 1 > max_bad 0"):
        sh.convert(settings, str(tmp_path / "n"), max_bad=0)
    report = json.loads((tmp_path / "n" / sh.REPORT_NAME).read_text())
    assert [(b["domain"], b["kind"]) for b in report["items"]] == [("normal", "missing")]
    # Not asked for: the missing normal is no loss, the missing auxiliaries never count.
    manifest = sh.convert(sh.ShardSettings(format="taskonomy", source=str(source), tasks=["depth_zbuffer"]),
                          str(tmp_path / "d"), max_bad=0)
    assert manifest["bad_count"] == 0 and manifest["num_samples"] == 4
    # A missing rgb still counts whatever the tasks: the view is dropped and reported.
    next((source / "rgb" / "taskonomy" / building).glob("point_0_view_0_*")).unlink()
    with pytest.raises(sh.ConversionError, match="1 > max_bad 0"):
        sh.convert(sh.ShardSettings(format="taskonomy", source=str(source), tasks=["depth_zbuffer"]),
                   str(tmp_path / "r"), max_bad=0)


def test_tasks_are_checked(synth_tree, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        _convert(synth_tree("taskonomy"), tmp_path / "a", "--tasks", "normal,depth")
    assert "valid tasks" in capsys.readouterr().err
    with pytest.raises(ValueError, match="valid tasks"):
        sh.ShardSettings(format="taskonomy", source="/x", tasks=["depth"])
    with pytest.raises(sh.ConversionError, match="cocodoom has no labels for them"):
        sh.convert(sh.ShardSettings(format="cocodoom", source=str(synth_tree("cocodoom")), tasks=["normal"]),
                   str(tmp_path / "c"))
    source = shutil.copytree(synth_tree("taskonomy"), tmp_path / "src")
    shutil.rmtree(source / "reshading")
    with pytest.raises(sh.ConversionError, match=r"\['reshading'\]: not found under"):
        sh.convert(sh.ShardSettings(format="taskonomy", source=str(source), tasks=["reshading"]),
                   str(tmp_path / "t"))


def test_training_refuses_a_task_the_shards_lack(synth_tree, tmp_path: Path) -> None:
    from mult.config import load_config
    from mult.training.plan import PreflightError, prepare

    url = str(tmp_path / "shards")
    _convert(synth_tree("taskonomy"), Path(url), "--tasks", "normal,depth_zbuffer")
    cfg = load_config(REPO / "configs" / "cpu-small.yaml", [
        "tasks=[normal,segment_semantic]", f"data.train={url}", "data.val=null",
        f"train.storage_path={tmp_path / 'runs'}", "train.baselines=null",
    ])
    with pytest.raises(PreflightError, match=rf"data.train: the shards at '{url}' have no segment_semantic"):
        prepare(cfg)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # no run was started
    from mult.config import derive

    assert prepare(derive(cfg, {"tasks": ["normal", "depth_zbuffer"]})).cfg.tasks == ["normal", "depth_zbuffer"]


def test_shards_lacking_a_task_warn_and_old_manifests_load(synth_tree, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    from mult.data.samples import shard_tasks, task_coverage
    from mult.training.plan import check_shards

    url = tmp_path / "shards"
    manifest = _convert(synth_tree("taskonomy"), url, "--samples-per-shard", "1")
    # One shard whose views had no keypoints2d: allowed, with a warning naming it.
    manifest["shards"][0]["tasks"] = [t for t in ALL_TASKS if t != "keypoints2d"]
    (url / sh.MANIFEST_NAME).write_text(json.dumps(manifest))
    absent, partial = task_coverage(read_manifest(str(url)), ["keypoints2d", "normal"])
    assert absent == [] and partial == {"keypoints2d": [manifest["shards"][0]["name"]]}
    with caplog.at_level(logging.WARNING, logger="mult.training.plan"):
        assert check_shards(str(url), "data.train", ["keypoints2d"]) == 4
    assert f"1 of 4 shard(s) at {url} have no keypoints2d" in caplog.text

    # A manifest written before per-shard tasks were recorded: every shard has the manifest's.
    for shard in manifest["shards"]:
        del shard["tasks"]
    (url / sh.MANIFEST_NAME).write_text(json.dumps(manifest))
    old = read_manifest(str(url))
    assert set(map(tuple, shard_tasks(old).values())) == {tuple(ALL_TASKS)}
    assert check_shards(str(url), "data.train", ALL_TASKS) == 4
    assert len(_eval_batch(url)["key"]) == 4

    manifest["shards"][0]["tasks"] = ["normal", "curvature"]
    (url / sh.MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="curvature"):
        read_manifest(str(url))
