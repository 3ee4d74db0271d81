"""The shard reader: exact targets, rank/worker splitting, determinism, bad samples, S3."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mult.data import shards as sh
from mult.data.loader import BadSampleError, make_loader
from mult.data.png import read_png
from mult.data.samples import decode_members, load_members, read_manifest
from mult.data.storage import open_storage
from mult.data.transforms import normalize_rgb
from mult.tasks import TASKS
from mult.launch.local import MotoServer
from noiseshards import noise_shard

TASK_LIST = list(TASKS)


def _convert(source: Path, out: Path, per_shard: int, fmt: str = "taskonomy") -> str:
    sh.convert(sh.ShardSettings(format=fmt, source=str(source), samples_per_shard=per_shard), str(out))
    return str(out)


@pytest.fixture(scope="module")
def tree(synth_tree) -> Path:
    return synth_tree("taskonomy", scenes=2, views=4)  # 8 views of 32 x 32


@pytest.fixture(scope="module")
def many(tree: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """8 shards of one sample."""
    return _convert(tree, tmp_path_factory.mktemp("many") / "s", 1)


@pytest.fixture(scope="module")
def few(tree: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """2 shards of four samples: fewer shards than 2 ranks x 2 workers."""
    return _convert(tree, tmp_path_factory.mktemp("few") / "s", 4)


def _keys(loader) -> list[list[str]]:
    return [b["key"] for b in loader]


def _rewrite_shard(path: Path, edit) -> None:
    """Rebuild a tar with ``edit(members: dict[name, bytes])`` applied (order kept)."""
    with tarfile.open(path) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    edit(members)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())


def _copy_shards(src: str, dst: Path) -> str:
    import shutil

    shutil.copytree(src, dst)
    return str(dst)


# ---------------------------------------------------------------------------------------------
def test_targets_are_exact(many: str, tree: Path) -> None:
    batch = next(iter(make_loader(many, tasks=TASK_LIST, image_size=32, batch_size=8, mode="eval")))
    assert batch["rgb"].dtype == torch.float32 and batch["rgb"].shape == (8, 3, 32, 32)
    assert batch["targets"]["segment_semantic"].dtype == torch.int64
    assert batch["targets"]["normal"].shape == (8, 3, 32, 32)
    assert all(v.dtype == torch.bool and v.shape == (8, 32, 32) for v in batch["valid"].values())
    assert batch["bad_samples"] == 0
    for i, key in enumerate(batch["key"]):
        building, p, v = key.rsplit("-", 2)
        name = f"point_{p[1:]}_view_{v[1:]}_domain_"
        raw = read_png(next(tree.glob(f"depth_zbuffer/**/{building}/{name}depth_zbuffer.png")))
        mask = read_png(next(tree.glob(f"mask_valid/**/{building}/{name}mask_valid.png"))) > 0
        rgb = read_png(next(tree.glob(f"rgb/**/{building}/{name}rgb.png")))
        assert raw.dtype == np.uint16 and raw.max() > 255  # 16-bit values survive exactly
        expected = (raw.astype(np.float32) - 1500.0) / 1000.0
        assert torch.equal(batch["targets"]["depth_zbuffer"][i, 0], torch.from_numpy(expected))
        assert torch.equal(batch["valid"]["depth_zbuffer"][i], torch.from_numpy((raw < 8192) & mask))
        assert torch.equal(batch["rgb"][i], torch.from_numpy(normalize_rgb(rgb)))


def test_absent_tasks_are_left_out(tmp_path: Path, synth_tree) -> None:
    url = _convert(synth_tree("cocodoom"), tmp_path / "s", 4, "cocodoom")
    batch = next(iter(make_loader(url, tasks=["normal", "depth_zbuffer"], image_size=16, batch_size=2, mode="eval")))
    assert set(batch["targets"]) == set(batch["valid"]) == {"depth_zbuffer"}


def test_hflip_negates_normal_x(many: str) -> None:
    manifest = read_manifest(many)
    key = manifest["shards"][0]["first_key"]
    members = load_members(many, key, manifest)
    plain = decode_members(members, key, manifest, TASK_LIST, 16)
    flipped = decode_members(members, key, manifest, TASK_LIST, 16, flip=True)
    n, nf = plain["targets"]["normal"], flipped["targets"]["normal"]
    assert np.array_equal(nf[0], -n[0][:, ::-1]) and np.array_equal(nf[1:], n[1:][:, :, ::-1])
    assert np.array_equal(flipped["targets"]["depth_zbuffer"], plain["targets"]["depth_zbuffer"][..., ::-1])
    assert np.array_equal(flipped["valid"]["normal"], plain["valid"]["normal"][:, ::-1])
    assert np.array_equal(flipped["rgb"], plain["rgb"][:, :, ::-1])


@pytest.mark.parametrize("fixture", ["many", "few"])
def test_two_ranks_two_workers_train(fixture: str, request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue(fixture)
    per_rank = []
    for rank in range(2):
        loader = make_loader(url, tasks=["depth_zbuffer"], image_size=8, batch_size=1, mode="train",
                             steps_per_epoch=2, rank=rank, world_size=2, num_workers=2, seed=1)
        keys = _keys(loader)
        assert len(keys) == len(loader) == 2  # the same number of steps on every rank
        per_rank.append({k for b in keys for k in b})
    assert len(per_rank[0]) == len(per_rank[1]) == 2
    assert not per_rank[0] & per_rank[1], "ranks must see disjoint samples"


def test_train_epoch_longer_than_data_stays_disjoint(many: str) -> None:
    seen = []
    for rank in range(2):
        loader = make_loader(many, tasks=["normal"], image_size=8, batch_size=2, mode="train",
                             steps_per_epoch=5, rank=rank, world_size=2, num_workers=2)
        batches = list(loader)
        assert len(batches) == 5 and all(len(b["key"]) == 2 for b in batches)
        seen.append({k for b in batches for k in b["key"]})
    assert not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) == 8


@pytest.mark.parametrize("fixture", ["many", "few"])
def test_eval_every_sample_exactly_once(fixture: str, request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue(fixture)
    keys, expected = [], 0
    for rank in range(2):
        loader = make_loader(url, tasks=TASK_LIST, image_size=8, batch_size=3, mode="eval",
                             rank=rank, world_size=2, num_workers=2)
        keys += [k for b in loader for k in b["key"]]
        expected += loader.num_samples
    assert len(keys) == len(set(keys)) == 8 == expected


def test_deterministic_and_resumable(many: str) -> None:
    def run(**kw):
        loader = make_loader(many, tasks=["normal"], image_size=8, batch_size=1, mode="train",
                             steps_per_epoch=7, num_workers=2, seed=3, hflip=True, **kw)
        return [(b["key"][0], b["targets"]["normal"]) for b in loader]

    full = run()
    again = run()
    assert [k for k, _ in full] == [k for k, _ in again]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(full, again))  # flips included
    for skip in (3, 4):  # resuming at (epoch 0, step) gives the rest of the same epoch
        tail = run(skip=skip)
        assert [k for k, _ in tail] == [k for k, _ in full[skip:]]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(tail, full[skip:]))
    assert [k for k, _ in run(epoch=1)] != [k for k, _ in full]


def test_corrupt_member_policies(many: str, tmp_path: Path) -> None:
    url = _copy_shards(many, tmp_path / "s")
    shard = read_manifest(url)["shards"][2]

    def corrupt(members: dict[str, bytes]) -> None:
        name = next(n for n in members if n.endswith(".depth_zbuffer.png"))
        members[name] = members[name][:40]

    _rewrite_shard(Path(url) / shard["name"], corrupt)
    batches = list(make_loader(url, tasks=TASK_LIST, image_size=8, batch_size=2, mode="eval"))
    assert sum(len(b["key"]) for b in batches) == 7 and sum(b["bad_samples"] for b in batches) == 1
    train = list(make_loader(url, tasks=TASK_LIST, image_size=8, batch_size=2, mode="train", steps_per_epoch=6))
    assert len(train) == 6  # a bad sample never shortens the epoch
    assert shard["first_key"] not in {k for b in train for k in b["key"]}
    with pytest.raises(BadSampleError, match=f"shard {shard['name']}: sample '{shard['first_key']}'"):
        list(make_loader(url, tasks=TASK_LIST, image_size=8, batch_size=2, mode="eval", bad_sample_policy="fail"))


def test_pickle_members_are_refused(many: str, tmp_path: Path) -> None:
    url = _copy_shards(many, tmp_path / "s")
    shard = read_manifest(url)["shards"][0]
    _rewrite_shard(Path(url) / shard["name"],
                   lambda m: m.__setitem__(f"{shard['first_key']}.extra.pyd", b"\x80\x04K\x01."))
    batches = list(make_loader(url, tasks=["normal"], image_size=8, batch_size=8, mode="eval"))
    assert sum(b["bad_samples"] for b in batches) == 1 and sum(len(b["key"]) for b in batches) == 7
    with pytest.raises(BadSampleError, match="pickle members are refused"):
        list(make_loader(url, tasks=["normal"], image_size=8, batch_size=8, mode="eval", bad_sample_policy="fail"))


def test_truncated_shard(few: str, tmp_path: Path) -> None:
    url = _copy_shards(few, tmp_path / "s")
    shard = read_manifest(url)["shards"][1]
    path = Path(url) / shard["name"]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 100])
    batches = list(make_loader(url, tasks=["depth_zbuffer"], image_size=8, batch_size=4, mode="eval"))
    got = sum(len(b["key"]) for b in batches)
    assert 4 <= got < 8 and got + sum(b["bad_samples"] for b in batches) == 8
    with pytest.raises(BadSampleError, match=shard["name"]):
        list(make_loader(url, tasks=["depth_zbuffer"], image_size=8, batch_size=4, mode="eval",
                         bad_sample_policy="fail"))


def test_missing_shard_counts_its_samples(few: str, tmp_path: Path) -> None:
    url = _copy_shards(few, tmp_path / "s")
    (Path(url) / read_manifest(url)["shards"][0]["name"]).unlink()
    batches = list(make_loader(url, tasks=["depth_zbuffer"], image_size=8, batch_size=4, mode="eval"))
    assert sum(len(b["key"]) for b in batches) == 4 and sum(b["bad_samples"] for b in batches) == 4


def test_arguments_are_checked(many: str) -> None:
    common = dict(tasks=["normal"], image_size=8, batch_size=1)
    with pytest.raises(ValueError, match="valid modes: train, eval"):
        make_loader(many, mode="test", **common)
    with pytest.raises(ValueError, match="valid: skip, fail"):
        make_loader(many, mode="eval", bad_sample_policy="ignore", **common)
    with pytest.raises(KeyError, match="valid tasks"):
        make_loader(many, mode="eval", tasks=["depth"], image_size=8, batch_size=1)
    with pytest.raises(ValueError, match="rank must be in 0..1"):
        make_loader(many, mode="eval", rank=2, world_size=2, **common)
    with pytest.raises(ValueError, match="past the end"):
        make_loader(many, mode="train", steps_per_epoch=3, skip=4, **common)
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        make_loader(str(Path(many).parent / "nothing"), mode="eval", **common)


def test_s3_matches_local(many: str, s3_server: MotoServer) -> None:
    s3_server.make_bucket("loader")
    store = open_storage("s3://loader/many")
    for rel in open_storage(many).list():
        store.upload_file(Path(many) / rel, rel)
    kw = dict(tasks=TASK_LIST, image_size=16, batch_size=2, mode="train", steps_per_epoch=4,
              num_workers=2, world_size=2, rank=1, hflip=True)
    local, remote = list(make_loader(many, **kw)), list(make_loader("s3://loader/many", **kw))
    assert [b["key"] for b in local] == [b["key"] for b in remote]
    assert all(torch.equal(a["targets"]["normal"], b["targets"]["normal"]) for a, b in zip(local, remote))


def test_server_restart_mid_shard(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """moto is restarted (and its data re-uploaded) while the loader is in the middle of a
    ~40 MB shard: the read resumes where it broke and the epoch is complete."""
    local = str(noise_shard(tmp_path / "big", views=10, size=1024, name="big"))
    server = MotoServer(log_dir=tmp_path).start()

    def upload() -> None:
        server.make_bucket("restart")
        store = open_storage("s3://restart/big")
        for rel in open_storage(local).list():
            store.write_bytes(rel, (Path(local) / rel).read_bytes())

    try:
        with server.environment():
            upload()
            loader = make_loader("s3://restart/big", tasks=["depth_zbuffer"], image_size=8, batch_size=1,
                                 mode="eval", bad_sample_policy="fail")
            it = iter(loader)
            first = next(it)
            server.restart()
            upload()
            rest = list(it)
    finally:
        server.stop()
    keys = first["key"] + [k for b in rest for k in b["key"]]
    assert keys == [f"big-p{i}-v0" for i in range(10)]
    assert "resuming" in caplog.text, "the restart should have broken the stream at least once"
    depth = [float(b["targets"]["depth_zbuffer"][0, 0, 0, 0]) for b in [first, *rest]]
    assert depth == pytest.approx([(3000 + i - 1500) / 1000 for i in range(10)])
