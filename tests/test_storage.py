"""Storage: the same contract on a local directory and on a real S3-compatible server."""

from __future__ import annotations

import hashlib
import io
import logging
import os
from pathlib import Path

import pytest

from mult.data import s3 as s3mod
from mult.data import storage as st
from mult.data.retry import RetryPolicy
from mult.launch.local import MotoServer


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> st.Storage:
    if request.param == "local":
        return st.open_storage(tmp_path / "root")
    server = request.getfixturevalue("s3_server")
    bucket = server.make_bucket("storage-test")
    return st.open_storage(f"{bucket}/{request.node.name.replace('[', '-').rstrip(']')}")


def test_open_storage_dispatch(tmp_path: Path) -> None:
    assert isinstance(st.open_storage(tmp_path), st.LocalStorage)
    assert isinstance(st.open_storage(f"file://{tmp_path}"), st.LocalStorage)
    s3 = st.open_storage("s3://bucket/a/b/")
    assert isinstance(s3, s3mod.S3Storage) and s3.bucket == "bucket" and s3.prefix == "a/b"
    assert s3.url("x.tar") == "s3://bucket/a/b/x.tar"
    with pytest.raises(ValueError, match="no bucket"):
        st.open_storage("s3:///x")
    with pytest.raises(ValueError, match="unsupported storage URL"):
        st.open_storage("gs://bucket/x")


def test_round_trip(store: st.Storage, tmp_path: Path) -> None:
    data = os.urandom(300_000)
    store.write_bytes("a/b.bin", data)
    assert store.read_bytes("a/b.bin") == data
    with store.open_read("a/b.bin") as fh:
        assert fh.read(10) == data[:10]
        assert fh.read() == data[10:]
    assert store.exists("a/b.bin") and not store.exists("a/nope.bin")
    assert store.size("a/b.bin") == len(data) and store.size("nope") is None

    src = tmp_path / "src.bin"
    src.write_bytes(data[::-1])
    store.upload_file(src, "c.bin")
    store.download_file("c.bin", tmp_path / "dl" / "c.bin")
    assert (tmp_path / "dl" / "c.bin").read_bytes() == data[::-1]

    assert store.list() == ["a/b.bin", "c.bin"]
    assert store.list("a/") == ["a/b.bin"]
    store.delete("a/b.bin")
    store.delete("a/b.bin")  # deleting an absent object is fine
    assert store.list() == ["c.bin"]
    with pytest.raises(FileNotFoundError):
        store.read_bytes("a/b.bin")
    with pytest.raises(ValueError, match=r"'\.\.'"):
        store.read_bytes("../etc/passwd")


def test_local_writes_leave_no_temporaries(tmp_path: Path) -> None:
    store = st.LocalStorage(tmp_path)
    store.write_bytes("x/y.json", b"{}")
    store.write_bytes("x/y.json", b"[]")  # overwrite is atomic (os.replace)
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["y.json"]
    # a temporary left behind by a killed writer is never listed
    (tmp_path / "x" / f".z.tar{st.TMP_MARKER}abc").write_bytes(b"half")
    assert store.list() == ["x/y.json"]


def test_multipart_upload(s3_server: MotoServer, tmp_path: Path) -> None:
    bucket = s3_server.make_bucket("multipart")
    store = s3mod.S3Storage(bucket[5:], "mp", multipart_threshold=5 * 2**20, multipart_chunksize=5 * 2**20)
    data = os.urandom(11 * 2**20)
    (tmp_path / "big.bin").write_bytes(data)
    store.upload_file(tmp_path / "big.bin", "big.bin")
    head = s3_server.client().head_object(Bucket="multipart", Key="mp/big.bin")
    assert head["ETag"].strip('"').endswith("-3"), "expected a three-part multipart upload"
    assert hashlib.sha256(store.read_bytes("big.bin")).digest() == hashlib.sha256(data).digest()


def test_webdataset_opener(s3_server: MotoServer) -> None:
    import webdataset

    s3_server.make_bucket("wds")
    store = st.open_storage("s3://wds/p")
    store.write_bytes("obj.bin", b"hello shard")
    s3mod.register_webdataset_s3()
    with webdataset.gopen("s3://wds/p/obj.bin") as fh:
        assert fh.read() == b"hello shard"


def test_retry_mode_config(s3_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> None:
    assert s3mod.s3_client()._client_config.retries == {"mode": "standard", "total_max_attempts": 8}
    assert s3mod.s3_client(max_attempts=1)._client_config.retries["total_max_attempts"] == 1  # no retry
    assert s3mod.s3_client("adaptive")._client_config.retries["mode"] == "adaptive"
    monkeypatch.setenv("AWS_RETRY_MODE", "adaptive")
    assert s3mod.S3Storage("b").client._client_config.retries["mode"] == "adaptive"
    with pytest.raises(ValueError, match="valid modes: standard, adaptive"):
        s3mod.s3_client("fast")


def test_credentials_never_logged(s3_server: MotoServer, monkeypatch: pytest.MonkeyPatch,
                                  caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAMULTTESTKEY00001")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "mult-secret-value-should-not-appear")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "mult-session-token-should-not-appear")
    s3_server.make_bucket("creds")
    caplog.set_level(logging.DEBUG)
    store = st.open_storage("s3://creds/x")
    store.write_bytes("a", b"1")
    store.read_bytes("a")
    store.list()
    with pytest.raises(FileNotFoundError) as info:
        store.read_bytes("missing")
    text = caplog.text + str(info.value)
    assert "mult-secret-value" not in text and "mult-session-token" not in text
    ours = "".join(r.getMessage() for r in caplog.records if r.name.startswith("mult"))
    assert "AKIAMULTTESTKEY00001" not in ours


def _big_object(server: MotoServer, size: int) -> bytes:
    server.make_bucket("restart")
    data = os.urandom(size)
    st.open_storage("s3://restart").write_bytes("big.bin", data)
    return data


def test_read_survives_server_restart(tmp_path: Path) -> None:
    """The server goes away in the middle of a streaming read and comes back (its data
    re-uploaded, since moto keeps it in memory): the read resumes where it broke."""
    server = MotoServer(log_dir=tmp_path).start()
    try:
        with server.environment():
            # Larger than the socket buffers, so most of it is still on the server at the restart.
            data = _big_object(server, 48 * 2**20)
            raw = s3mod.ResumableS3Stream("restart", "big.bin", retry=RetryPolicy(max_retry_s=60, base_delay_s=0.2))
            fh = io.BufferedReader(raw, buffer_size=1 << 16)
            head = fh.read(2**20)
            server.restart()
            server.make_bucket("restart")
            st.open_storage("s3://restart").write_bytes("big.bin", data)  # same bytes, same ETag
            rest = fh.read()
            assert head + rest == data
            assert raw.resumes >= 1, "the read should have needed at least one resume"
    finally:
        server.stop()


def test_read_fails_loudly_when_server_stays_down(tmp_path: Path) -> None:
    server = MotoServer(log_dir=tmp_path).start()
    try:
        with server.environment():
            _big_object(server, 48 * 2**20)
            raw = s3mod.ResumableS3Stream("restart", "big.bin", retry=RetryPolicy(max_retry_s=1, base_delay_s=0.05),
                                       client_factory=lambda: s3mod.s3_client(max_attempts=1))
            raw.read(2**20)
            server.stop()
            with pytest.raises(st.StorageUnavailableError, match=r"s3://restart/big.bin at byte \d+ of \d+: "
                                                                 r"storage unavailable: \d+ failed attempt"):
                while raw.read(2**20):
                    pass
    finally:
        server.stop()
