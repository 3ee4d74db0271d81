"""The shard writer, the manifest, ``pipelines.shard`` (convert + inspect) on generated data."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from mult.data import shards as sh
from mult.data.datasets import get_dataset
from mult.data.loader import make_loader
from mult.data.png import CorruptFileError, check_png, encode_png, read_png
from mult.data.samples import decode_sample, read_manifest
from mult.data.storage import TMP_MARKER, open_storage
from mult.data.tarfiles import verify_shards
from mult.tasks import TASKS
from pipelines import shard as cli

FORMATS = ("taskonomy", "replica", "nyu", "cocodoom")
REPO = Path(__file__).resolve().parents[1]


def _settings(fmt: str, source: Path, **kw) -> sh.ShardSettings:
    return sh.ShardSettings(format=fmt, source=str(source), **kw)


def _tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def _copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _taskonomy_file(root: Path, folder: str, building: str, point: int, view: int) -> Path:
    domain = TASKS[folder].file_domain if folder in TASKS else folder
    hits = list(root.glob(f"{folder}/**/{building}/point_{point}_view_{view}_domain_{domain}.png"))
    assert len(hits) == 1, hits
    return hits[0]


# ---------------------------------------------------------------------------------------------
def test_check_png() -> None:
    data = encode_png(np.arange(64, dtype=np.uint16).reshape(8, 8))
    check_png(data)
    with pytest.raises(CorruptFileError, match="truncated"):
        check_png(data[:-20], "x.png")
    flipped = bytearray(data)
    flipped[40] ^= 0xFF
    with pytest.raises(CorruptFileError, match="bad CRC"):
        check_png(bytes(flipped), "x.png")
    with pytest.raises(CorruptFileError, match="signature"):
        check_png(b"GIF89a" + data, "x.png")


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="valid datasets"):
        sh.ShardSettings(format="kitti", source="/x")
    with pytest.raises(ValueError, match="samples_per_shard"):
        sh.ShardSettings(format="nyu", source="/x", samples_per_shard=0)
    with pytest.raises(ValueError, match="valid checks"):
        sh.ShardSettings(format="nyu", source="/x", check="full")


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_is_byte_exact(fmt: str, synth_tree, tmp_path: Path) -> None:
    source = synth_tree(fmt)
    out = tmp_path / "shards"
    manifest = sh.convert(_settings(fmt, source, samples_per_shard=2), str(out))
    reader = get_dataset(fmt).load_reader()(str(source))
    views = {v.key: v for g in reader.groups() for v in reader.views(g)}
    assert manifest["format"] == fmt and manifest["encoding"] == "original"
    assert manifest["format_version"] == sh.FORMAT_VERSION
    assert manifest["num_samples"] == len(views) == sum(s["samples"] for s in manifest["shards"])
    assert set(manifest["tasks"]) <= set(TASKS) and "depth_zbuffer" in manifest["tasks"]
    assert verify_shards(str(out), read_manifest(str(out))["shards"]) == []
    seen = {}
    for shard in manifest["shards"]:
        members = _tar_members(out / shard["name"])
        assert len({n.split(".")[0] for n in members}) == shard["samples"]
        seen.update(members)
    expected = {f"{k}.{d}.{m.ext}": m.read() for k, v in views.items() for d, m in v.members.items()}
    assert seen.keys() == expected.keys()
    assert all(seen[n] == expected[n] for n in expected), "shard members differ from the source bytes"
    # Listing holds exactly the manifest's shards (nothing half-written or duplicated).
    tars = [p for p in open_storage(out).list() if p.endswith(".tar")]
    assert tars == sorted(s["name"] for s in manifest["shards"])


def test_conversion_is_deterministic(synth_tree, tmp_path: Path) -> None:
    source = synth_tree("taskonomy")
    a = sh.convert(_settings("taskonomy", source, samples_per_shard=2), str(tmp_path / "a"))
    b = sh.convert(_settings("taskonomy", source, samples_per_shard=2), str(tmp_path / "b"))
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]


def test_rerun_with_other_settings_is_refused(synth_tree, tmp_path: Path) -> None:
    source = synth_tree("taskonomy")
    sh.convert(_settings("taskonomy", source, samples_per_shard=2), str(tmp_path / "o"))
    with pytest.raises(sh.ConversionError, match="samples_per_shard"):
        sh.convert(_settings("taskonomy", source, samples_per_shard=3), str(tmp_path / "o"))
    m = sh.convert(_settings("taskonomy", source, samples_per_shard=3), str(tmp_path / "o"), overwrite=True)
    assert all(s["samples"] <= 3 for s in m["shards"])


_KILL_SCRIPT = """
import os, signal, sys
from mult.data import shards as sh
published = []
def on_shard(record):
    published.append(record["name"])
    if len(published) == 2:
        os.kill(os.getpid(), signal.SIGKILL)   # a real kill, between two shards of one group
settings = sh.ShardSettings(format="taskonomy", source=sys.argv[1], samples_per_shard=1)
sh.convert(settings, sys.argv[2], on_shard=on_shard)
"""


def test_kill_and_rerun(synth_tree, tmp_path: Path) -> None:
    source = synth_tree("taskonomy", scenes=2, views=3)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, str(source), str(out)], cwd=REPO,
                          capture_output=True, timeout=300)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    store = open_storage(out)
    assert not store.exists(sh.MANIFEST_NAME)
    assert len([p for p in store.list() if p.endswith(".tar")]) == 2
    # What a kill during an upload or a crash mid-write would leave: a temporary file, and a
    # garbage object under the name the next shard gets.
    first = sorted(p for p in store.list() if p.endswith(".tar"))[0]
    (out / f".{first}{TMP_MARKER}deadbeef").write_bytes(b"half a shard")
    stem = first.rsplit("-", 1)[0]
    (out / f"{stem}-000002.tar").write_bytes(b"\0" * 700)

    manifest = sh.convert(_settings("taskonomy", source, samples_per_shard=1), str(out))
    clean = sh.convert(_settings("taskonomy", source, samples_per_shard=1), str(tmp_path / "clean"))
    assert manifest["shards"] == clean["shards"], "a resumed run must equal an uninterrupted one"
    assert verify_shards(str(out), read_manifest(str(out))["shards"]) == []
    tars = [p for p in store.list() if p.endswith(".tar")]
    assert tars == sorted(s["name"] for s in manifest["shards"])
    keys = [k for s in manifest["shards"] for k in [s["first_key"]]]
    assert len(keys) == len(set(keys)) == 6


def test_rerun_after_completion_skips_every_group(synth_tree, tmp_path: Path) -> None:
    source = synth_tree("taskonomy")
    settings = _settings("taskonomy", source, samples_per_shard=2)
    sh.convert(settings, str(tmp_path / "o"))
    groups, todo = sh.prepare(settings, str(tmp_path / "o"))
    assert groups and todo == []
    # A published shard that disappeared makes its group be redone.
    first = read_manifest(str(tmp_path / "o"))["shards"][0]
    (tmp_path / "o" / first["name"]).unlink()
    assert sh.prepare(settings, str(tmp_path / "o"))[1] == [first["group"]]


def test_corrupt_and_missing_files_are_reported(synth_tree, tmp_path: Path) -> None:
    source = _copy_tree(synth_tree("taskonomy", scenes=2, views=3), tmp_path / "src")
    building = get_dataset("taskonomy").load_reader()(str(source)).groups()[0]
    depth = _taskonomy_file(source, "depth_zbuffer", building, 0, 0)
    depth.write_bytes(depth.read_bytes()[:-30])  # truncated PNG
    _taskonomy_file(source, "normal", building, 1, 0).unlink()  # a missing domain
    rgb = _taskonomy_file(source, "rgb", building, 1, 1)
    data = bytearray(rgb.read_bytes())
    data[60] ^= 0x55  # a flipped bit: CRC mismatch
    rgb.write_bytes(bytes(data))

    out = tmp_path / "out"
    with pytest.raises(sh.ConversionError, match="3 > max_bad 2"):
        sh.convert(_settings("taskonomy", source), str(out), max_bad=2)
    assert not (out / sh.MANIFEST_NAME).exists()
    report = json.loads((out / sh.REPORT_NAME).read_text())
    assert report["bad_count"] == 3
    assert report["by_kind"] == {"corrupt": 2, "missing": 1}
    keys = {(b["key"], b["domain"], b["kind"]) for b in report["items"]}
    stem = building.replace(".", "_")
    assert (f"{stem}-p0-v0", "depth_zbuffer", "corrupt") in keys
    assert (f"{stem}-p1-v0", "normal", "missing") in keys
    assert (f"{stem}-p1-v1", "rgb", "corrupt") in keys
    assert report["dropped_views"] == [f"{stem}-p1-v1"]  # no rgb: the view is left out

    manifest = sh.convert(_settings("taskonomy", source), str(out), max_bad=3, max_bad_fraction=None)
    assert manifest["num_samples"] == 5 and manifest["bad_count"] == 3
    # The view without its depth file trains on the other tasks; depth is all invalid there.
    sample = decode_sample(str(out), f"{stem}-p0-v0")
    assert not sample["valid"]["depth_zbuffer"].any() and sample["valid"]["normal"].any()
    batches = list(make_loader(str(out), tasks=["depth_zbuffer", "normal"], image_size=16, batch_size=5,
                               mode="eval"))
    assert sum(len(b["key"]) for b in batches) == 5


def test_resized_shards(synth_tree, tmp_path: Path) -> None:
    source = synth_tree("taskonomy")
    full, small = tmp_path / "full", tmp_path / "small"
    sh.convert(_settings("taskonomy", source), str(full))
    m = sh.convert(_settings("taskonomy", source, resize=16), str(small))
    assert m["encoding"] == "taskonomy" and m["image_size"] == 16 and m["format"] == "taskonomy"
    tasks = list(TASKS)
    a = next(iter(make_loader(str(full), tasks=tasks, image_size=16, batch_size=8, mode="eval")))
    b = next(iter(make_loader(str(small), tasks=tasks, image_size=16, batch_size=8, mode="eval")))
    assert a["key"] == b["key"]
    for task in tasks:
        assert a["targets"][task].shape == b["targets"][task].shape
        assert (a["valid"][task] == b["valid"][task]).all(), task
        if TASKS[task].resize == "nearest":  # labels, depth (with its holes) and normals: exact
            assert (a["targets"][task] == b["targets"][task]).all(), task
        else:  # smooth maps: identical up to rounding to the stored integers
            scale = {"keypoints2d": 100.0, "edge_texture": 1070.0, "reshading": 0.2846 * 255}[task]
            assert (a["targets"][task] - b["targets"][task]).abs().max() <= 0.51 / scale + 1e-6, task
    assert (a["rgb"] - b["rgb"]).abs().max() < 0.05


def test_resize_respects_masks() -> None:
    from mult.data.transforms import resize_raw, resize_smooth_masked

    depth = np.full((8, 8), 65535, np.uint16)
    depth[:, :4] = 1000
    small = resize_raw("depth_zbuffer", depth, 4)
    assert set(np.unique(small).tolist()) == {1000, 65535}  # never a blend of a hole and a surface
    valid = np.broadcast_to(np.arange(8) < 4, (8, 8)).copy()
    values = np.where(valid, 2.0, 1000.0).astype(np.float32)  # 1000: garbage under invalid pixels
    out, ok = resize_smooth_masked(values, valid, 4)
    assert np.allclose(out[ok], 2.0) and ok[:, :2].all() and not ok[:, 2:].any()


def test_cli_convert_inspect_and_stats(synth_tree, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    source = synth_tree("taskonomy")
    out = tmp_path / "out"
    manifest = cli.main(["--executor", "local", "--format", "taskonomy", "--source", str(source),
                         "--out", str(out), "--samples-per-shard", "3"])
    capsys.readouterr()
    summary = cli.main(["inspect", str(out)])
    assert json.loads(capsys.readouterr().out)["num_samples"] == manifest["num_samples"] == summary["num_samples"]

    key = manifest["shards"][0]["first_key"]
    cli.main(["inspect", str(out), "--key", key])
    stats = json.loads(capsys.readouterr().out.strip())
    assert stats["key"] == key
    building, p, v = key.rsplit("-", 2)
    raw = read_png(_taskonomy_file(source, "depth_zbuffer", manifest["shards"][0]["group"], int(p[1:]), int(v[1:])))
    mask = read_png(_taskonomy_file(source, "mask_valid", manifest["shards"][0]["group"], int(p[1:]), int(v[1:]))) > 0
    ok = (raw < 8192) & mask
    metres = raw[ok].astype(np.float64) / 512.0
    d = stats["domains"]["depth_zbuffer"]
    assert d["min"] == pytest.approx(metres.min()) and d["max"] == pytest.approx(metres.max())
    assert d["mean"] == pytest.approx(metres.mean(), rel=1e-5)
    assert d["valid_fraction"] == pytest.approx(ok.mean())
    n = stats["domains"]["normal"]
    assert -1.0 <= n["min"] < 0 < n["max"] <= 1.0
    seg = stats["domains"]["segment_semantic"]
    assert seg["min"] >= 1 and float(seg["max"]).is_integer() and seg["max"] < 18


def test_cli_exit_code_past_threshold(synth_tree, tmp_path: Path) -> None:
    source = _copy_tree(synth_tree("cocodoom"), tmp_path / "src")
    next(source.glob("run*/map*/depth/*.png")).unlink()
    cmd = [sys.executable, "-m", "pipelines.shard", "--executor", "local", "--format", "cocodoom",
           "--source", str(source), "--out", str(tmp_path / "o"), "--max-bad", "0"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "1 bad file(s)" in proc.stderr and "report.json" in proc.stderr
    assert json.loads((tmp_path / "o" / "report.json").read_text())["bad_count"] == 1


def test_ray_conversion_to_s3_matches_local(synth_tree, s3_server, ray_head, tmp_path: Path) -> None:
    source = synth_tree("taskonomy")
    bucket = s3_server.make_bucket("shards-ray")
    url = f"{bucket}/taskonomy/train"
    import ray

    try:
        manifest = cli.main(["--format", "taskonomy", "--source", str(source), "--out", url,
                             "--samples-per-shard", "2"])
    finally:
        ray.shutdown()
    local = sh.convert(_settings("taskonomy", source, samples_per_shard=2), str(tmp_path / "local"))
    assert manifest["shards"] == local["shards"]  # same bytes, same names, through Ray and S3
    assert read_manifest(url)["num_samples"] == local["num_samples"]
    assert verify_shards(url, read_manifest(url)["shards"]) == []
    # A rerun finds every group finished and leaves the shards alone.
    assert sh.prepare(_settings("taskonomy", source, samples_per_shard=2), url)[1] == []


def test_split_selects_buildings(synth_tree, tmp_path: Path) -> None:
    source = synth_tree("taskonomy", scenes=3)
    from mult.data.taskonomy import read_split_csv

    table = read_split_csv(next(source.glob("splits/*.csv")))
    total = 0
    for split, buildings in table.items():
        if not buildings:
            continue
        m = sh.convert(_settings("taskonomy", source, split=split), str(tmp_path / split))
        assert m["split"] == split and {s["group"] for s in m["shards"]} == set(buildings)
        total += m["num_samples"]
    assert total == 3 * 2
