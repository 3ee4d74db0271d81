"""Training runs whose storage misbehaves: ``python -m pipelines.train`` as a subprocess on the
session's Ray head, with ``AWS_ENDPOINT_URL`` pointing at a fault-injecting proxy
(tests/faultproxy.py) in front of the moto server. Shards, checkpoints (Ray's pyarrow uploads)
and telemetry all go through it.

``AWS_MAX_ATTEMPTS=1`` (forwarded to the workers) turns botocore's own retries off, so every
fault reaches mult's retry layer; ``train.max_failures=0`` makes any failure end the run, so a
run that completes did so without Ray restarting it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from faultproxy import Fault, FaultProxy, pid_of_client
from mult.launch.local import MotoServer

REPO = Path(__file__).resolve().parents[1]
BUCKET = "mult-train-faults"
TINY = [
    "tasks=[normal,depth_zbuffer]", "model.img_size=32", "model.embed_dim=12", "model.num_heads=[1,1,1,1]",
    "data.num_workers=1", "train.global_batch_size=4", "train.micro_batch_size=2", "train.log_every=1",
    "train.precision=fp32", "train.val_batches=1",
]
STORAGE = ["train.max_failures=0", "data.storage_retry_s=60", "data.storage_timeout_s=5"]
# The first (or only) PUT of one file of a checkpoint: pyarrow uploads even small files as
# multipart uploads (part 1, then CompleteMultipartUpload), a file appearing only when complete.
CHECKPOINT_FILE_PUT = r"/checkpoint_[^/?]+/[^/?]+(\?partNumber=1&|$)"


@pytest.fixture
def proxy(s3_server: MotoServer) -> Iterator[FaultProxy]:
    s3_server.make_bucket(BUCKET)
    with FaultProxy(s3_server.endpoint) as fp:
        yield fp


def _train(tmp_path: Path, proxy: FaultProxy, name: str, args: list[str],
           resume: bool = False) -> tuple[subprocess.Popen, Path]:
    log_path = tmp_path / f"{name}{'-resumed' if resume else ''}.log"
    env = {**os.environ, "AWS_ENDPOINT_URL": proxy.endpoint, "AWS_MAX_ATTEMPTS": "1"}
    cmd = [sys.executable, "-m", "pipelines.train", "--config", "configs/cpu-small.yaml", *args,
           f"train.storage_path=s3://{BUCKET}/runs", f"train.run_name={name}", f"metrics.local_dir={tmp_path}",
           *STORAGE, *(["--resume"] if resume else [])]  # last: it takes an optional value
    with open(log_path, "w") as handle:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, env=env)
    return proc, log_path


def _finish(proc: subprocess.Popen, log_path: Path, timeout: int = 420) -> tuple[int, str]:
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, log_path.read_text()


@pytest.fixture(scope="module")
def smoke_data(s3_server: MotoServer) -> None:
    """The data ``--smoke-test`` would generate, written directly (not through the proxy), so
    that the faults hit the training run's reads rather than the generator's."""
    from mult.config import load_config
    from mult.data.smoke import make_smoke_dataset

    s3_server.make_bucket(BUCKET)
    cfg = load_config("configs/cpu-small.yaml")
    make_smoke_dataset(f"s3://{BUCKET}/runs/smoke-data", size=cfg.model.img_size, seed=cfg.train.seed)


@pytest.mark.slow
def test_smoke_run_completes_through_a_burst_of_503s(tmp_path: Path, proxy: FaultProxy, smoke_data, ray_head) -> None:
    from mult.training.checkpoint import scan_checkpoints

    shard_get = r"/smoke-data/.*/train/.*\.tar$"
    plan = proxy.add(
        Fault("slowdown", "GET", shard_get, ranged=False, times=4),
        Fault("reset", "GET", shard_get, ranged=False, body_bytes=2000),  # a shard breaks mid-body ...
        Fault("slowdown", "GET", shard_get, ranged=True, times=2),  # ... and its resume is throttled
        Fault("slowdown", "PUT", r"/checkpoint_[^/?]+/model\.pt", times=3),  # Ray's checkpoint upload (pyarrow)
    )
    summary = tmp_path / "summary.json"
    proc, log_path = _train(tmp_path, proxy, "smoke-503", ["--smoke-test", "--summary", str(summary)])
    code, text = _finish(proc, log_path)
    assert code == 0, text[-4000:]
    assert "finished at step 4" in text
    assert [f.fired for f in plan] == [4, 1, 2, 3], "every fault should have hit the run"
    assert json.loads(summary.read_text())["metrics"]["bad_samples_total"] == 0  # no sample lost to storage
    run_url = json.loads(summary.read_text())["run_url"]
    assert scan_checkpoints(run_url)[1] == {}, "a checkpoint upload that met the 503s arrived cut off"


@pytest.fixture(scope="module")
def tiny_shards(s3_server: MotoServer) -> tuple[str, str]:
    from mult.data.smoke import make_smoke_dataset

    s3_server.make_bucket(BUCKET)
    return make_smoke_dataset(f"s3://{BUCKET}/data", size=32, seed=5)  # written directly, not through the proxy


@pytest.mark.slow
def test_kill_during_checkpoint_upload_resumes_from_last_complete(tmp_path: Path, proxy: FaultProxy,
                                                                  tiny_shards, ray_head) -> None:
    """The proxy holds the last file of the second checkpoint's upload; the test kills the
    process that sent it (found by its socket, once the proxy has the request); the run fails.
    ``--resume`` skips the cut-off checkpoint, saying so, and continues from the first."""
    from mult.training.checkpoint import read_meta, resolve_local, scan_checkpoints

    train_url, val_url = tiny_shards
    args = [*TINY, f"data.train={train_url}", f"data.val={val_url}", "train.max_steps=4",
            "train.checkpoint_every=2", "train.val_every=2", "train.keep_checkpoints=3"]
    hold = proxy.add(Fault("hold", "PUT", CHECKPOINT_FILE_PUT, after=5 + 4))[0]  # 5 files per checkpoint
    proc, log_path = _train(tmp_path, proxy, "killed", args)
    while not proxy.held.wait(timeout=1):  # bounded: the run ends by itself if the hold never comes
        puts = [r.path for r in proxy.records("/checkpoint_") if r.method == "PUT"]
        assert proc.poll() is None, f"the run ended before its second checkpoint upload; checkpoint PUTs: {puts}"
    uploader = pid_of_client(proxy.held_client[1])
    os.kill(uploader, signal.SIGKILL)
    proxy.release()
    code, text = _finish(proc, log_path)
    assert code != 0 and hold.fired == 1, text[-4000:]

    run_dir = next(tmp_path.glob("killed-*/"))  # local telemetry dir, named like the run
    run_url = f"s3://{BUCKET}/runs/{run_dir.name}"
    complete, incomplete = scan_checkpoints(run_url)
    assert len(complete) == 1 and len(incomplete) == 1, (complete, incomplete)
    first = resolve_local(run_url, tmp_path / "pick", prefer="latest")
    assert read_meta(first)["step"] == 2  # the newest *complete* checkpoint

    proxy.clear()
    proc, log_path = _train(tmp_path, proxy, "killed", args, resume=True)
    code, text = _finish(proc, log_path)
    assert code == 0, text[-4000:]
    cut = next(iter(incomplete))
    assert f"skipping incomplete checkpoint {cut}" in text
    assert "resumed from step 2" in text and "finished at step 4" in text
