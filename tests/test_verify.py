"""``pipelines.shard verify``: every sample decoded the loader's way, every shard's sha256 and
sample count checked against the manifest, a per-shard report and a non-zero exit on any problem."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Callable

import pytest

from mult.data import shards as sh
from mult.data.loader import BadSampleError, make_loader
from mult.data.samples import read_manifest
from mult.data.storage import LocalStorage, StorageError
from pipelines import shard as cli

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def clean(synth_tree, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four one-sample shards of a generated Taskonomy tree (copy before changing them)."""
    out = tmp_path_factory.mktemp("verify") / "shards"
    sh.convert(sh.ShardSettings(format="taskonomy", source=str(synth_tree("taskonomy")), samples_per_shard=1),
               str(out))
    return out


def _copy(clean: Path, tmp_path: Path) -> tuple[Path, list[dict]]:
    out = Path(shutil.copytree(clean, tmp_path / "shards"))
    return out, read_manifest(str(out))["shards"]


def _rewrite(path: Path, change: Callable[[tarfile.TarInfo, bytes], tuple[tarfile.TarInfo, bytes] | None]) -> None:
    """Rewrite a tar member by member (``change`` may alter a member's header or bytes, or drop
    it with None); the result is a valid tar with other bytes than the manifest recorded."""
    with tarfile.open(path) as tar:
        members = [(info, tar.extractfile(info).read()) for info in tar.getmembers()]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            changed = change(info, data)
            if changed is None:
                continue
            info, data = changed
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())


def _verify(url: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pipelines.shard", "verify", str(url), "--executor", "local", *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_clean_dataset_verifies(clean: Path) -> None:
    proc = _verify(clean)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    rows = [line.split() for line in proc.stdout.splitlines()[1:-1]]
    names = [s["name"] for s in read_manifest(str(clean))["shards"]]
    assert [r[0] for r in rows] == names and all(r[1:] == ["1/1", "0", "ok"] for r in rows)
    assert proc.stdout.splitlines()[-1].startswith("OK: 4 shard(s), 4 of 4 sample(s) read, 0 bad")


def test_corrupt_member_is_named_and_fails(clean: Path, tmp_path: Path) -> None:
    url, shards = _copy(clean, tmp_path)
    victim = shards[1]
    member = f"{victim['first_key']}.depth_zbuffer.png"

    def truncate(info: tarfile.TarInfo, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
        return info, data[:-40] if info.name == member else data

    _rewrite(url / victim["name"], truncate)
    proc = _verify(url)
    assert proc.returncode == 1, proc.stdout + proc.stderr[-2000:]
    assert f"{member}: CorruptFileError" in proc.stdout
    report = json.loads(_verify(url, "--json").stdout)
    (row,) = [r for r in report["shards"] if not (r["error"] is None and not r["bad"] and r["sha256"] == "ok")]
    assert row["name"] == victim["name"] and row["sha256"] == "mismatch" and row["error"] is None
    assert [b["member"] for b in row["bad"]] == [member] and report["bad_samples"] == 1
    # What verify rejects is what training cannot read: the loader fails on the same sample.
    with pytest.raises(BadSampleError, match=victim["first_key"]):
        list(make_loader(str(url), tasks=["depth_zbuffer"], image_size=16, batch_size=1, mode="eval",
                         bad_sample_policy="fail"))


def test_changed_bytes_are_a_hash_mismatch(clean: Path, tmp_path: Path) -> None:
    url, shards = _copy(clean, tmp_path)

    def touch(info: tarfile.TarInfo, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
        info.mtime = 1  # the shard still reads and decodes; only its bytes changed
        return info, data

    _rewrite(url / shards[2]["name"], touch)
    proc = _verify(url)
    assert proc.returncode == 1
    line = next(line for line in proc.stdout.splitlines() if line.startswith(shards[2]["name"]))
    assert line.split()[1:] == ["1/1", "0", "mismatch"]
    assert "1 sha256 mismatch(es)" in proc.stdout.splitlines()[-1]


def test_missing_truncated_pickled_and_unreadable_shards(clean: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from mult.data.verify import verify_dataset

    url, shards = _copy(clean, tmp_path)
    (url / shards[0]["name"]).unlink()
    truncated = url / shards[1]["name"]
    truncated.write_bytes(truncated.read_bytes()[:3000])  # cut inside a member
    key = shards[2]["first_key"]
    _rewrite(url / shards[2]["name"], lambda info, data: (info, data) if info.name != f"{key}.rgb.png"
             else (tarfile.TarInfo(f"{key}.rgb.pyd"), data))
    # A read that fails mid-shard after the storage layer's retries cannot be caused on demand
    # here, so the storage stream of one shard is replaced by one that raises StorageError.
    original_open = LocalStorage.open_read

    class Failing(io.RawIOBase):
        def __init__(self, fh):
            self.fh, self.pos = fh, 0

        def readable(self) -> bool:
            return True

        def readinto(self, buffer) -> int:
            if self.pos > 2048:
                raise StorageError(f"reading {shards[3]['name']} failed: SlowDown after 10 attempts")
            data = self.fh.read(min(len(buffer), 1024))
            buffer[:len(data)] = data
            self.pos += len(data)
            return len(data)

    def open_read(self, rel: str):
        fh = original_open(self, rel)
        return io.BufferedReader(Failing(fh)) if rel == shards[3]["name"] else fh

    monkeypatch.setattr(LocalStorage, "open_read", open_read)
    report = verify_dataset(str(url))
    rows = {r["name"]: r for r in report["shards"]}
    assert not report["ok"] and report["errors"] == {"missing": 1, "storage": 1, "tar": 1, "count": 0, "task": 0}
    assert rows[shards[0]["name"]]["error"]["kind"] == "missing"
    assert rows[shards[1]["name"]]["error"]["kind"] == "tar"
    assert rows[shards[1]["name"]]["sha256"] == "mismatch" and rows[shards[1]["name"]]["bytes"] == 3000
    pickled = rows[shards[2]["name"]]
    assert pickled["error"] is None and pickled["bad"][0]["member"] == f"{key}.rgb.pyd"
    assert "pickle" in pickled["bad"][0]["reason"]
    failed = rows[shards[3]["name"]]
    assert failed["error"]["kind"] == "storage" and "SlowDown" in failed["error"]["message"]
    assert failed["sha256"] == "unchecked"


def test_fewer_samples_than_the_manifest_says(synth_tree, tmp_path: Path) -> None:
    from mult.data.verify import verify_dataset

    url = tmp_path / "shards"
    manifest = sh.convert(sh.ShardSettings(format="taskonomy", source=str(synth_tree("taskonomy")),
                                           samples_per_shard=2), str(url))
    first = manifest["shards"][0]
    _rewrite(url / first["name"], lambda info, data: None if info.name.startswith(first["first_key"]) else (info, data))
    row = next(r for r in verify_dataset(str(url))["shards"] if r["name"] == first["name"])
    assert row["samples"] == 1 and row["error"]["kind"] == "count" and "manifest says 2" in row["error"]["message"]


def test_no_manifest_exits_2(tmp_path: Path) -> None:
    proc = _verify(tmp_path)
    assert proc.returncode == 2 and "no manifest.json" in proc.stderr


def test_ray_verify_over_s3(synth_tree, s3_server, ray_head, tmp_path: Path) -> None:
    bucket = s3_server.make_bucket("verify-ray")
    url = f"{bucket}/taskonomy"
    manifest = sh.convert(sh.ShardSettings(format="taskonomy", source=str(synth_tree("taskonomy")),
                                           samples_per_shard=1), url)
    # A copy between buckets that went wrong for one object: other bytes under the same name.
    local = tmp_path / manifest["shards"][1]["name"]
    s3_server.client().download_file(bucket[len("s3://"):], f"taskonomy/{local.name}", str(local))
    _rewrite(local, lambda info, data: (info, data + b"\0"))  # still decodes: only the hash can tell
    s3_server.client().upload_file(str(local), bucket[len("s3://"):], f"taskonomy/{local.name}")
    import ray

    try:
        report = cli.main(["verify", url, "--json"])
    finally:
        ray.shutdown()
    rows = {r["name"]: r for r in report["shards"]}
    assert not report["ok"] and set(rows) == {s["name"] for s in manifest["shards"]}
    bad = rows.pop(local.name)
    assert bad["sha256"] == "mismatch" and bad["bad"] == [] and bad["error"] is None
    assert all(r["sha256"] == "ok" and not r["bad"] and r["error"] is None for r in rows.values())
