"""The training stage: telemetry, driver checks, and end-to-end Ray Train runs on CPU.

The Ray runs start ``python -m pipelines.train`` as a subprocess against the session's Ray head
(``ray_head``) with storage and data in the local S3 server (``s3_server``), as a user would.
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

# A model small enough for a Ray Train step in well under a second per worker.
TINY = [
    "tasks=[normal,depth_zbuffer,segment_semantic]", "model.img_size=32",
    "model.embed_dim=12", "model.num_heads=[1,1,1,1]", "data.num_workers=1",
    "train.global_batch_size=4", "train.micro_batch_size=2", "optim.lr=0.003", "optim.warmup_steps=2",
    "train.log_every=1", "train.precision=fp32",
]


# ---------------------------------------------------------------------------------------------
# Telemetry (no Ray).
# ---------------------------------------------------------------------------------------------
def _snapshot(step: int, bad: int = 0):
    from mult.training.telemetry import TrainSnapshot

    return TrainSnapshot(step=step, samples_per_second=12.5, step_seconds=0.4, data_wait_seconds=0.01,
                         losses={"total": 2.0 / step, "normal": 0.5}, bad_samples_total=bad)


def _scrape(url: str) -> dict[str, dict]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def _value(families: dict, name: str, sample: str | None = None, **labels: str) -> float:
    for s in families[name].samples:
        if (sample is None or s.name == sample) and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise KeyError(f"{name} {labels}")


def test_prometheus_exporter_serves_parsable_metrics(tmp_path: Path) -> None:
    from mult.training.telemetry import PrometheusExporter, read_address_file

    exporter = PrometheusExporter("127.0.0.1", 0, address_file=tmp_path / "prometheus_address.json")
    try:
        address = read_address_file(tmp_path)
        assert address["port"] == exporter.address[1] > 0
        exporter.update(_snapshot(1, bad=3))
        exporter.update(_snapshot(2, bad=5))
        exporter.update_validation(0.75)
        families = _scrape(address["url"])
        assert _value(families, "mult_train_step") == 2
        assert _value(families, "mult_train_loss", task="total") == pytest.approx(1.0)
        assert _value(families, "mult_train_loss", task="normal") == pytest.approx(0.5)
        assert _value(families, "mult_train_bad_samples", "mult_train_bad_samples_total") == 5
        assert _value(families, "mult_train_samples_per_second") == pytest.approx(12.5)
        assert _value(families, "mult_train_step_seconds") == pytest.approx(0.4)
        assert _value(families, "mult_train_data_wait_seconds") == pytest.approx(0.01)
        assert _value(families, "mult_val_objective") == pytest.approx(0.75)
    finally:
        exporter.close()


def test_node_ip_binds_the_private_address_only(tmp_path: Path) -> None:
    """metrics.prometheus_host=node-ip (paper.yaml): bound to the address Ray reports for this
    node (the oracle), recorded resolved, and not to every interface (127.0.0.1 refuses)."""
    import socket

    import ray.util

    from mult.training.telemetry import PrometheusExporter, read_address_file

    exporter = PrometheusExporter("node-ip", 0, address_file=tmp_path / "prometheus_address.json")
    try:
        host, port = exporter.address
        assert host == ray.util.get_node_ip_address() != "node-ip"
        assert read_address_file(tmp_path)["url"] == f"http://{host}:{port}/metrics"
        if not host.startswith("127."):
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
    finally:
        exporter.close()


def test_pushgateway_receives_the_metrics(tmp_path: Path) -> None:
    """A stand-in Pushgateway on 127.0.0.1 (no Pushgateway binary here) records what is pushed."""
    from prometheus_client.parser import text_string_to_metric_families

    from mult.training.telemetry import PrometheusExporter

    received: list[tuple[str, str, str]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_PUT(self) -> None:  # noqa: N802 - http.server's naming
            body = self.rfile.read(int(self.headers["Content-Length"])).decode()
            received.append((self.command, self.path, body))
            self.send_response(200)
            self.end_headers()

        do_POST = do_PUT

        def log_message(self, *args) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        exporter = PrometheusExporter(port=None, pushgateway=f"127.0.0.1:{server.server_port}",
                                      grouping_key={"run": "r1"})
        exporter.update(_snapshot(4))
        exporter.close()
    finally:
        server.shutdown()
        server.server_close()
    assert received, "nothing was pushed"
    method, path, body = received[-1]
    assert method == "PUT" and path == "/metrics/job/mult-train/run/r1"
    names = {f.name for f in text_string_to_metric_families(body)}
    assert {"mult_train_step", "mult_train_loss", "mult_train_bad_samples"} <= names


def test_unreachable_pushgateway_does_not_stop_training(caplog: pytest.LogCaptureFixture) -> None:
    from mult.launch.local import free_port
    from mult.training.telemetry import PrometheusExporter

    exporter = PrometheusExporter(port=None, pushgateway=f"127.0.0.1:{free_port()}")
    exporter.update(_snapshot(1))
    assert "unreachable" in caplog.text


def test_tensorboard_and_loss_curve(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mult.training.telemetry import TensorBoardLogger, plot_loss_curve

    tb = TensorBoardLogger(tmp_path / "tb")
    for step in (1, 2, 3):
        tb.log(step, {"loss/total": 1.0 / step})
    tb.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [e.value for e in events.Scalars("loss/total")] == pytest.approx([1.0, 0.5, 1 / 3])
    history = [{"step": s, "total": 1.0 / s, "normal": 0.5 / s} for s in range(1, 6)]
    png = plot_loss_curve(history, tmp_path / "curve.png", [{"step": 5, "objective": 0.3}])
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] > 100


# ---------------------------------------------------------------------------------------------
# Driver checks: bad input fails before any worker starts.
# ---------------------------------------------------------------------------------------------
def _run_cli(args: list[str], env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "pipelines.train", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["tasks=[normal,depthh]"], "unknown task 'depthh'"),
        (["loss_weights.normal=-1"], "loss_weights.normal: weights must be finite and >= 0"),
        (["train.storage_path=s3://no-such-bucket-h5/runs"], "is not reachable"),
        (["data.train=/nonexistent/shards"], "cannot read the shard manifest"),
    ],
)
def test_bad_input_fails_before_ray(
    overrides: list[str], message: str, tmp_path: Path, monkeypatch, caplog: pytest.LogCaptureFixture
) -> None:
    """In-process ``main``: Ray must never be initialised (so no worker can start)."""
    import ray

    from mult.launch import trainer
    from mult.launch.local import free_port
    from pipelines import train

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a bad config")

    monkeypatch.setattr(ray, "init", no_ray)
    monkeypatch.setattr(trainer, "build_trainer", no_ray)
    monkeypatch.setattr(trainer, "fit", no_ray)
    # an endpoint where nothing listens: the bucket check must fail fast and clearly

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    base = [f"train.storage_path={tmp_path}", "data.train=" + str(tmp_path)]
    code = train.main(["--config", "configs/cpu-small.yaml", *base, *overrides])
    assert code == 2
    assert message in caplog.text


class _ReadOnlyBucket(http.server.BaseHTTPRequestHandler):
    """An S3 endpoint whose bucket answers HeadBucket but refuses writes, as a read-only role
    or a bucket policy does (403 AccessDenied, S3's own error body)."""

    def do_HEAD(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_PUT(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
                b"<Message>Access Denied</Message><RequestId>1</RequestId></Error>")
        self.send_response(403)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_read_only_bucket_fails_preflight(monkeypatch) -> None:
    """Before, only HeadBucket was called: a read-only bucket passed and failed at the first
    checkpoint, hours in."""
    from mult.training.plan import PreflightError, check_storage

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ReadOnlyBucket)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.server_address[1]}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        with pytest.raises(PreflightError, match=r"s3://read-only/runs' is not writable .*AccessDenied"):
            check_storage("s3://read-only/runs")
    finally:
        server.shutdown()
        server.server_close()


def test_workers_that_cannot_be_placed_fail_naming_the_resources(tmp_path: Path, ray_head) -> None:
    """Before, Ray Train waited forever for a request the cluster can never place."""
    result = _run_cli(["--config", "configs/cpu-small.yaml", "--smoke-test", f"train.storage_path={tmp_path}",
                       "scaling.cpus_per_worker=64", "scaling.placement_timeout_s=2"],
                      env={"RAY_ADDRESS": ray_head.address}, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "could not place 2 training worker(s) x {'CPU': 64.0} within scaling.placement_timeout_s=2 s" \
        in result.stderr


def test_bad_input_cli_message(tmp_path: Path) -> None:
    result = _run_cli(["--config", "configs/cpu-small.yaml", "loss_weights.normal=-0.5",
                       f"train.storage_path={tmp_path}"])
    assert result.returncode == 2
    assert "loss_weights.normal: weights must be finite and >= 0" in result.stderr
    assert "ray" not in result.stderr.lower().replace("array", "")  # nothing of Ray was started


def test_run_names_fresh_and_resume(tmp_path: Path) -> None:
    from mult.config import load_config
    from mult.training.checkpoint import mark_complete
    from mult.training.plan import PreflightError, choose_run_name

    cfg = load_config("configs/cpu-small.yaml", ["train.run_name=exp"])
    a, b = choose_run_name(cfg, str(tmp_path), False), choose_run_name(cfg, str(tmp_path), False)
    assert a != b and a.startswith("exp-")  # Ray would silently resume a reused name
    with pytest.raises(PreflightError, match="no run of train.run_name 'exp'"):
        choose_run_name(cfg, str(tmp_path), True)
    for name, has_ckpt in (("exp-20261101-000000-aaaa", True), ("exp-20261102-000000-bbbb", True),
                           ("exp-20261103-000000-cccc", False), ("other-20261104-000000-dddd", True)):
        (tmp_path / name / "checkpoint_x").mkdir(parents=True)
        if has_ckpt:
            (tmp_path / name / "checkpoint_x" / "model.pt").write_bytes(b"")
            mark_complete(tmp_path / name / "checkpoint_x")  # a checkpoint counts once complete.json lists it
    assert choose_run_name(cfg, str(tmp_path), True) == "exp-20261102-000000-bbbb"  # latest with a checkpoint
    assert choose_run_name(cfg, str(tmp_path), "exp-20261101-000000-aaaa") == "exp-20261101-000000-aaaa"
    with pytest.raises(PreflightError, match="has no checkpoint"):
        choose_run_name(cfg, str(tmp_path), "exp-20261103-000000-cccc")


# ---------------------------------------------------------------------------------------------
# End to end under Ray Train (2 CPU workers, gloo), storage and data in the local S3 server.
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def s3_shards(s3_server) -> tuple[str, str]:
    """Generated Taskonomy-format shards (the project's generator + shard writer) in S3."""
    from mult.data.smoke import make_smoke_dataset

    bucket = s3_server.make_bucket("mult-train-test")
    return make_smoke_dataset(f"{bucket}/data", size=32, seed=3)


def _start_run(tmp_path: Path, name: str, shards: tuple[str, str], extra: list[str], env=None):
    """``python -m pipelines.train`` in the background; returns (process, local telemetry root)."""
    train_url, val_url = shards
    args = [
        "--config", "configs/cpu-small.yaml", *TINY, f"data.train={train_url}", f"data.val={val_url}",
        "train.storage_path=s3://mult-train-test/runs", f"train.run_name={name}",
        f"metrics.local_dir={tmp_path}", "train.val_batches=1", "train.max_failures=2", *extra,
    ]
    log_path = tmp_path / f"{name}.log"
    handle = open(log_path, "w")
    proc = subprocess.Popen([PYTHON, "-m", "pipelines.train", *args], cwd=REPO, stdout=handle,
                            stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    return proc, log_path


def _wait(proc: subprocess.Popen, log_path: Path, timeout: int = 420) -> str:
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log_path.read_text()
    assert proc.returncode == 0, text[-4000:]
    return text


def _run_dir(tmp_path: Path, name: str) -> Path:
    dirs = sorted(tmp_path.glob(f"{name}-*/"))
    assert len(dirs) == 1, dirs
    return dirs[0]


def _tb_losses(run_dir: Path) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {e.step: e.value for e in events.Scalars("loss/total")}


def _checkpoint_names(run_url: str) -> list[str]:
    from mult.data.storage import open_storage

    names = open_storage(run_url).list("")
    return sorted({n.split("/")[0] for n in names if n.startswith("checkpoint_") and n.endswith("model.pt")})


@pytest.mark.slow
def test_two_worker_run_learns_checkpoints_and_exports_metrics(tmp_path, s3_shards, ray_head) -> None:
    """One run checks: loss falls, checkpoints (top-k) reload, metrics scraped over HTTP mid-run."""
    from mult.training.checkpoint import load_model

    name = "e2e-plain"
    proc, log_path = _start_run(tmp_path, name, s3_shards, [
        "train.max_steps=16", "train.val_every=8", "train.checkpoint_every=8", "train.keep_checkpoints=1",
        "metrics.prometheus_port=0",
    ])
    families = None
    deadline = time.monotonic() + 400
    while proc.poll() is None and time.monotonic() < deadline:  # bounded: ends with the run
        files = list(tmp_path.glob(f"{name}-*/prometheus_address.json"))
        if files:
            try:
                scraped = _scrape(json.loads(files[0].read_text())["url"])
            except OSError:
                scraped = None
            if scraped and any(s.labels.get("task") == "total" for s in scraped["mult_train_loss"].samples):
                families = scraped
                break
        time.sleep(0.2)
    _wait(proc, log_path)
    assert families is not None, "the metrics endpoint never answered with training metrics"
    assert {"mult_train_samples_per_second", "mult_train_step_seconds", "mult_train_data_wait_seconds",
            "mult_train_loss", "mult_train_bad_samples", "mult_train_step", "mult_val_objective"} <= set(families)
    assert _value(families, "mult_train_step") >= 1

    run_dir = _run_dir(tmp_path, name)
    losses = _tb_losses(run_dir)
    assert sorted(losses) == list(range(1, 17))
    first, last = [losses[s] for s in (1, 2, 3)], [losses[s] for s in (14, 15, 16)]
    assert sum(last) < 0.8 * sum(first), losses
    assert (run_dir / "loss_curve.png").stat().st_size > 0

    run_url = f"s3://mult-train-test/runs/{run_dir.name}"
    checkpoints = _checkpoint_names(run_url)
    assert 1 <= len(checkpoints) <= 2  # keep 1 best (+ the latest, which Ray always keeps)
    from mult.data.storage import open_storage

    stored = open_storage(run_url)
    assert stored.exists("loss_curve.png") and any(n.startswith("tensorboard/") for n in stored.list(""))
    model, cfg = load_model(run_url, prefer="latest")
    assert cfg.train.max_steps == 16 and cfg.tasks == ["normal", "depth_zbuffer", "segment_semantic"]
    with torch.no_grad():
        out = model(torch.rand(1, 3, 32, 32))
    assert out["normal"].shape == (1, 3, 32, 32) and torch.isfinite(out["normal"]).all()

    # --resume continues the stored run (same name) from its last checkpoint to a new horizon
    proc, log_path = _start_run(tmp_path, name, s3_shards, [
        "train.max_steps=18", "train.val_every=8", "train.checkpoint_every=8", "train.keep_checkpoints=1",
        "--resume",
    ])
    text = _wait(proc, log_path)
    assert f"resuming run {run_dir.name}" in text and "resumed from step 16" in text
    assert "finished at step 18" in text
    assert sorted(_tb_losses(run_dir))[-2:] == [17, 18]


@pytest.mark.slow
def test_killed_worker_resumes_from_last_checkpoint(tmp_path, s3_shards, ray_head) -> None:
    """``MULT_FAULT_AT_STEP`` kills rank 1 once; the run restarts from its last checkpoint."""
    name = "e2e-fault"
    proc, log_path = _start_run(tmp_path, name, s3_shards, [
        "train.max_steps=12", "train.val_every=4", "train.checkpoint_every=4", "train.keep_checkpoints=2",
    ], env={"MULT_FAULT_AT_STEP": "11"})
    text = _wait(proc, log_path)
    run_dir = _run_dir(tmp_path, name)
    assert (run_dir / "fault_fired").read_text() == "11"  # it did fire (at the start of step 11)
    assert "resumed from step" in text
    run_url = f"s3://mult-train-test/runs/{run_dir.name}"
    from mult.training.checkpoint import load_checkpoint, resolve_local

    latest = resolve_local(run_url, tmp_path / "latest", prefer="latest")
    meta = json.loads((latest / "meta.json").read_text())
    assert meta["step"] == 12  # ended at the planned step count
    from mult.data.storage import open_storage

    storage = open_storage(f"{run_url}/{latest.name}")
    storage.download_file("train_state.pt", latest / "train_state.pt")
    state = load_checkpoint(latest)["state"]
    steps = [row["step"] for row in state["history"]]
    # the history restarts where the checkpoint was taken: steps after it were redone once
    resumed_at = int(text.split("resumed from step ")[1].split()[0])
    assert 11 - resumed_at <= 4  # lost at most one checkpoint interval (crash before step 11)
    assert steps == list(range(1, 13))


@pytest.mark.slow
def test_sigterm_on_one_worker_checkpoints_and_resumes_there(tmp_path, s3_shards, ray_head) -> None:
    """SIGTERM to rank 1 (what a spot notice handler or a pod termination sends) mid-run: every
    rank stops at the next step boundary, rank 0 checkpoints, Ray restarts from that step.

    Without the handler Ray's own SIGTERM handler kills the worker and, with no periodic
    checkpoint before step 8, the restart begins again at step 0."""
    name = "e2e-sigterm"
    proc, log_path = _start_run(tmp_path, name, s3_shards, [
        "train.max_steps=8", "train.val_every=100", "train.checkpoint_every=100", "train.keep_checkpoints=2",
    ], env={"MULT_FAULT_AT_STEP": "3", "MULT_FAULT_KIND": "sigterm"})
    text = _wait(proc, log_path)
    assert "stopped at step" in text, text[-4000:]
    stopped = int(text.split("stopped at step ")[1].split()[0])
    resumed = int(text.split("resumed from step ")[1].split()[0])
    assert stopped >= 4 and resumed == stopped  # nothing lost: the step in flight finished and was saved
    assert "finished at step 8" in text
    assert sorted(_tb_losses(_run_dir(tmp_path, name))) == list(range(1, 9))


@pytest.mark.slow
def test_ray_job_submit_smoke_test(tmp_path, ray_head, s3_server) -> None:
    """``ray job submit --working-dir .`` of the smoke test; it generates its own data.

    The entrypoint names this venv's interpreter (what ``python`` is in an activated venv):
    the head was started from it, and the working-dir copy carries the code, not the venv.
    """
    from ray.job_submission import JobStatus, JobSubmissionClient

    s3_server.make_bucket("mult-job-test")
    submission = f"train-smoke-{os.getpid()}-{int(time.time())}"
    runtime_env = {"excludes": [".venv", ".git", "runs", "tune", "out", "*.egg-info", "__pycache__"]}
    cmd = [
        str(Path(PYTHON).parent / "ray"), "job", "submit", "--address", ray_head.dashboard_url,
        "--submission-id", submission, "--working-dir", ".", "--runtime-env-json", json.dumps(runtime_env),
        "--", PYTHON, "-m", "pipelines.train", "--config", "configs/cpu-small.yaml", "--smoke-test",
        "train.storage_path=s3://mult-job-test/runs", "train.run_name=job-smoke",
        f"metrics.local_dir={tmp_path}",
    ]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    status = JobSubmissionClient(ray_head.dashboard_url).get_job_status(submission)
    assert status == JobStatus.SUCCEEDED, (result.stdout[-4000:], result.stderr[-2000:])
    assert "finished at step 4" in result.stdout
    from mult.data.storage import open_storage

    names = open_storage("s3://mult-job-test").list("")
    assert any(n.startswith("runs/smoke-data/") and n.endswith("manifest.json") for n in names)
    assert any(n.startswith("runs/job-smoke-") and n.endswith("/model.pt") for n in names)
