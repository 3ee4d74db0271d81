"""Infrastructure errors are never data errors: the loader, storage operations and Ray's
checkpoint filesystem against a real S3 server (moto) behind a fault-injecting proxy
(tests/faultproxy.py) that answers with S3's real error bodies, resets connections and stalls.

Nothing is mocked: the faults are real HTTP answers and real TCP resets on 127.0.0.1.
botocore's own retries are off (``AWS_MAX_ATTEMPTS=1``: one attempt per call) so that every
fault reaches the layer under test, and timeouts and retry bounds are seconds, set through
:class:`RetryPolicy` as ``data.storage_timeout_s`` / ``data.storage_retry_s`` would.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
from pathlib import Path
from typing import Iterator

import pytest

from faultproxy import Fault, FaultProxy
from mult.data import shards as sh
from mult.data.loader import BadSampleError, make_loader
from mult.data.retry import RetryPolicy
from mult.data.s3 import S3Storage
from mult.data.samples import read_manifest
from mult.data.storage import StorageUnavailableError, open_storage
from mult.launch.local import MotoServer
from noiseshards import noise_shard

FAST = RetryPolicy(max_retry_s=30, timeout_s=1, base_delay_s=0.05, max_delay_s=0.5)
BUCKET = "faults"


@pytest.fixture
def proxy(s3_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    """The proxy in front of the session's moto server; clients of this test go through it."""
    s3_server.make_bucket(BUCKET)
    with FaultProxy(s3_server.endpoint) as fp:
        monkeypatch.setenv("AWS_ENDPOINT_URL", fp.endpoint)
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
        yield fp


def _upload_dir(server: MotoServer, local: str | Path, url: str) -> None:
    """Copy a local tree to S3 directly (not through the proxy)."""
    bucket, _, prefix = url[len("s3://"):].partition("/")
    client = server.client()
    for path in sorted(Path(local).rglob("*")):
        if path.is_file():
            client.put_object(Bucket=bucket, Key=f"{prefix}/{path.relative_to(local).as_posix()}",
                              Body=path.read_bytes())


@pytest.fixture(scope="module")
def shards(synth_tree, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Local shards of the same 8 views, one and four samples per shard."""
    tree = synth_tree("taskonomy", scenes=2, views=4)
    out = {}
    for per_shard in (1, 4):
        root = tmp_path_factory.mktemp(f"faults-{per_shard}") / "s"
        sh.convert(sh.ShardSettings(format="taskonomy", source=str(tree), samples_per_shard=per_shard), str(root))
        out[per_shard] = root
    return out


def _in_s3(server: MotoServer, local: Path, name: str) -> tuple[str, list[dict]]:
    url = f"s3://{BUCKET}/{name}"
    _upload_dir(server, local, url)
    return url, read_manifest(str(local))["shards"]


def _eval(url: str, **kw) -> list[dict]:
    return list(make_loader(url, tasks=["depth_zbuffer", "normal"], image_size=8, batch_size=2, mode="eval",
                            retry=kw.pop("retry", FAST), **kw))


# ---------------------------------------------------------------------------------------------
# (a) The loader.
# ---------------------------------------------------------------------------------------------
def test_transient_faults_lose_no_sample(proxy: FaultProxy, s3_server: MotoServer, shards) -> None:
    url, listed = _in_s3(s3_server, shards[1], "transient")
    names = [s["name"] for s in listed]
    plan = proxy.add(
        Fault("slowdown", "GET", names[0], times=3),
        Fault("internal", "GET", names[1], times=2),
        Fault("reset", "GET", names[2], ranged=False, body_bytes=3000),  # then resumed at byte 3000 ...
        Fault("slowdown", "GET", names[2], ranged=True, times=2),  # ... after two throttled resumes
        Fault("expired", "GET", names[3], times=2),
        Fault("stall", "GET", names[4], ranged=False, body_bytes=2000, stall_s=5),  # > timeout_s: mid-body
        Fault("stall", "GET", names[5], stall_s=5),  # no answer at all
    )
    batches = _eval(url)
    keys = [k for b in batches for k in b["key"]]
    assert sorted(keys) == sorted(s["first_key"] for s in listed) and len(keys) == 8  # each exactly once
    assert sum(b["bad_samples"] for b in batches) == 0
    assert [f.fired for f in plan] == [3, 2, 1, 2, 2, 1, 1]
    assert any(r.ranged for r in proxy.records(names[4])), "the stalled read should resume with a ranged GET"


def test_persistent_403_mid_shard_fails_naming_shard_key_and_error(proxy: FaultProxy, s3_server: MotoServer,
                                                                     tmp_path: Path) -> None:
    """Under the default `skip` policy, credentials that stay expired are not bad samples: the
    loader (here in a DataLoader worker process) raises once the bound is spent."""
    url, listed = _in_s3(s3_server, noise_shard(tmp_path / "noise", views=4, size=360), "expired")
    shard = listed[0]
    # A stall (not a reset, whose RST may discard bytes the client had not read yet) puts the
    # break at a known byte, well past the first samples.
    proxy.add(Fault("stall", "GET", shard["name"], ranged=False, body_bytes=shard["bytes"] * 9 // 10, stall_s=5),
              Fault("expired", "GET", shard["name"], ranged=True, times=None))
    policy = RetryPolicy(max_retry_s=1.5, timeout_s=1, base_delay_s=0.05, max_delay_s=0.3)
    loader = make_loader(url, tasks=["depth_zbuffer"], image_size=8, batch_size=1, mode="eval",
                         retry=policy, num_workers=1, bad_sample_policy="skip")
    got = []
    with pytest.raises(StorageUnavailableError) as info:
        for batch in loader:
            got.append(batch)
    text = str(info.value)
    assert f"shard {url}/{shard['name']}: reading after sample key 'noise-p" in text
    assert "ExpiredToken (HTTP 403)" in text and "data.storage_retry_s=1.5" in text
    assert got and all(b["bad_samples"] == 0 for b in got)  # what arrived before is whole; nothing counted


def test_corrupt_member_is_still_a_data_error(proxy: FaultProxy, s3_server: MotoServer, shards,
                                              tmp_path: Path) -> None:
    import shutil

    local = tmp_path / "s"
    shutil.copytree(shards[1], local)
    listed = read_manifest(str(local))["shards"]
    path = local / listed[2]["name"]
    with tarfile.open(path) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    depth = next(n for n in members if n.endswith(".depth_zbuffer.png"))
    members[depth] = members[depth][:40]  # a truncated PNG: the bytes themselves are bad
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    url, _ = _in_s3(s3_server, local, "corrupt")
    proxy.add(Fault("slowdown", "GET", listed[0]["name"], times=2),
              Fault("reset", "GET", listed[2]["name"], ranged=False, body_bytes=1000))
    batches = _eval(url)
    assert sum(len(b["key"]) for b in batches) == 7 and sum(b["bad_samples"] for b in batches) == 1
    with pytest.raises(BadSampleError, match=f"shard {listed[2]['name']}: sample '{listed[2]['first_key']}'"):
        _eval(url, bad_sample_policy="fail")


# ---------------------------------------------------------------------------------------------
# Storage operations: downloads resume at the byte, uploads retry part by part.
# ---------------------------------------------------------------------------------------------
def test_download_resumes_and_never_leaves_a_partial_file(proxy: FaultProxy, s3_server: MotoServer,
                                                          tmp_path: Path) -> None:
    data = os.urandom(6 * 2**20)
    s3_server.client().put_object(Bucket=BUCKET, Key="dl/blob.bin", Body=data)
    store = open_storage(f"s3://{BUCKET}/dl", retry=FAST)
    plan = proxy.add(Fault("reset", "GET", "blob.bin", ranged=False, body_bytes=2**20),
                     Fault("expired", "GET", "blob.bin", ranged=True, times=1),
                     Fault("slowdown", "GET", "blob.bin", ranged=True, times=1))
    store.download_file("blob.bin", tmp_path / "out" / "blob.bin")
    assert (tmp_path / "out" / "blob.bin").read_bytes() == data
    assert [f.fired for f in plan] == [1, 1, 1]
    assert any(r.ranged for r in proxy.records("blob.bin") if r.action is None)
    proxy.clear()
    proxy.add(Fault("reset", "GET", "blob.bin", ranged=False, body_bytes=2**20),
              Fault("internal", "GET", "blob.bin", ranged=True, times=None))
    store = open_storage(f"s3://{BUCKET}/dl", retry=RetryPolicy(max_retry_s=1, timeout_s=1, base_delay_s=0.05))
    with pytest.raises(StorageUnavailableError, match=r"s3://faults/dl/blob.bin at byte \d+ of 6291456.*InternalError"):
        store.download_file("blob.bin", tmp_path / "out2" / "blob.bin")
    assert list((tmp_path / "out2").iterdir()) == []  # no partial file, no temporary left


def test_multipart_upload_retries_parts_not_the_file(proxy: FaultProxy, s3_server: MotoServer, tmp_path: Path) -> None:
    data = os.urandom(11 * 2**20)
    (tmp_path / "big.bin").write_bytes(data)
    store = S3Storage(BUCKET, "up", retry=FAST, multipart_threshold=5 * 2**20, multipart_chunksize=5 * 2**20,
                      max_concurrency=1)
    plan = proxy.add(Fault("slowdown", "PUT", r"partNumber=2\b", times=2),
                     Fault("stall", "PUT", r"partNumber=3\b", stall_s=5),
                     Fault("expired", "POST", r"uploadId=", times=1))  # CompleteMultipartUpload
    store.upload_file(tmp_path / "big.bin", "big.bin")
    assert [f.fired for f in plan] == [2, 1, 1]
    assert hashlib.sha256(s3_server.client().get_object(Bucket=BUCKET, Key="up/big.bin")["Body"].read()).digest() \
        == hashlib.sha256(data).digest()
    part_puts = [r for r in proxy.records(r"partNumber=") if r.method == "PUT"]
    assert len([r for r in part_puts if "partNumber=1&" in r.path or r.path.endswith("partNumber=1")]) == 1


def test_small_operations_retry(proxy: FaultProxy) -> None:
    store = open_storage(f"s3://{BUCKET}/small", retry=FAST)
    proxy.add(Fault("slowdown", "PUT", "small/a.json", times=2), Fault("internal", "HEAD", "small/a.json"),
              Fault("expired", "GET", r"list-type=2", times=1), Fault("slowdown", "DELETE", "small/a.json"))
    store.write_bytes("a.json", b"{}")
    assert store.size("a.json") == 2 and store.list() == ["a.json"]
    store.delete("a.json")
    assert store.size("a.json") is None


# ---------------------------------------------------------------------------------------------
# Ray Train's checkpoint filesystem (pyarrow), built by storage_args.
# ---------------------------------------------------------------------------------------------
def test_ray_checkpoint_filesystem_keeps_its_retries_across_pickling(proxy: FaultProxy, tmp_path: Path) -> None:
    """Ray pickles the filesystem to its workers; pyarrow's own pickling drops the retry
    strategy (back to 3 attempts). Three 503s on one upload need a fourth attempt."""
    import pyarrow.fs

    from mult.launch.trainer import storage_args

    args = storage_args(f"s3://{BUCKET}/runs", retry=RetryPolicy(max_retry_s=60, timeout_s=5))
    fs = pickle.loads(pickle.dumps(args["storage_filesystem"]))
    src = tmp_path / "checkpoint_x"
    src.mkdir()
    payload = os.urandom(300_000)
    (src / "model.pt").write_bytes(payload)
    plan = proxy.add(Fault("slowdown", "PUT", r"checkpoint_x/model\.pt", times=3))
    pyarrow.fs.copy_files(str(src), f"{args['storage_path']}/checkpoint_x", destination_filesystem=fs,
                          use_threads=False)
    assert plan[0].fired == 3
    assert open_storage(f"s3://{BUCKET}/runs/checkpoint_x").read_bytes("model.pt") == payload


def test_checkpoint_download_through_faults(proxy: FaultProxy, s3_server: MotoServer, tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    """``load_model`` on a run in S3: the listing is throttled, ``model.pt`` breaks mid-body and
    its resume meets an expired token, a ``meta.json`` read gets a 500; the weights arrive whole,
    and a newer checkpoint cut off mid-upload is skipped."""
    import torch

    from mult.config import load_config
    from mult.model import build_model
    from mult.training import checkpoint

    cfg = load_config("configs/cpu-small.yaml", ["tasks=[normal,depth_zbuffer]", "model.img_size=32",
                                                 "model.embed_dim=12", "model.num_heads=[1,1,1,1]"])
    model = build_model(cfg)
    for name, step in (("checkpoint_a", 4), ("checkpoint_b", 8)):
        directory = checkpoint.save_checkpoint(tmp_path / name, model=model, config=cfg, step=step)
        if name == "checkpoint_b":
            (directory / checkpoint.MODEL_FILE).unlink()  # its upload never got this far
    _upload_dir(s3_server, tmp_path, f"s3://{BUCKET}/ckpt-run")
    size = (tmp_path / "checkpoint_a" / checkpoint.MODEL_FILE).stat().st_size
    plan = proxy.add(Fault("slowdown", "GET", r"list-type=2", times=2),
                     Fault("internal", "GET", r"checkpoint_a/meta\.json"),
                     Fault("stall", "GET", r"checkpoint_a/model\.pt", ranged=False, body_bytes=size // 2, stall_s=5),
                     Fault("expired", "GET", r"checkpoint_a/model\.pt", ranged=True))
    loaded, _ = checkpoint.load_model(f"s3://{BUCKET}/ckpt-run", prefer="latest", retry=FAST)
    assert [f.fired for f in plan] == [2, 1, 1, 1]
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)
    assert "skipping incomplete checkpoint s3://faults/ckpt-run/checkpoint_b: model.pt is missing" in caplog.text


def test_a_file_pyarrow_failed_to_upload_keeps_the_checkpoint_unregistered(proxy: FaultProxy, tmp_path: Path) -> None:
    """pyarrow's copy_files (Ray's uploader) logs and drops a file whose upload failed after its
    retries, without raising; the check run before Ray registers a checkpoint catches it."""
    import pyarrow.fs

    from mult.config import load_config
    from mult.launch.trainer import storage_args, verify_persisted
    from mult.model import build_model
    from mult.training.checkpoint import CheckpointError, save_checkpoint

    cfg = load_config("configs/cpu-small.yaml", ["tasks=[normal]", "model.img_size=32", "model.embed_dim=12",
                                                 "model.num_heads=[1,1,1,1]", "model.shared_attention=none"])
    local = save_checkpoint(tmp_path / "checkpoint_y", model=build_model(cfg), config=cfg, step=1)
    args = storage_args(f"s3://{BUCKET}/runs", retry=RetryPolicy(max_retry_s=1, timeout_s=5))  # 3 attempts
    fs, dest = args["storage_filesystem"], f"{args['storage_path']}/checkpoint_y"
    proxy.add(Fault("slowdown", "PUT", r"checkpoint_y/model\.pt", times=None))
    pyarrow.fs.copy_files(str(local), dest, destination_filesystem=fs, use_threads=False)  # no error raised
    with pytest.raises(CheckpointError, match=r"checkpoint upload to .*checkpoint_y is incomplete: model.pt is missing"):
        verify_persisted(local, fs, dest)
    proxy.clear()
    pyarrow.fs.copy_files(str(local), dest, destination_filesystem=fs, use_threads=False)
    verify_persisted(local, fs, dest)  # whole now
