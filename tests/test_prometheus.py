"""The observability configs: cluster/prometheus/ and the Grafana dashboard.

The main test starts a real Prometheus (Debian's `prometheus` package) on 127.0.0.1 with a copy
of cluster/prometheus/prometheus.yml, against a running training (``python -m pipelines.train``
under the session's Ray head, data and storage in the local S3 server, rank 0 serving the
``mult_*`` metrics), and checks through Prometheus's HTTP API that the series arrived, that they
follow the run, and that every dashboard query returns data.

The training is the smoke test's setup (the generated smoke dataset, a tiny model) without
``--smoke-test`` itself, whose four-step cap ends the run before Prometheus has scraped it:
``train.max_steps`` only bounds a run that the test stops once its checks have passed. No check
depends on timing: every wait polls until a condition holds, fails at once if the training or
Prometheus exits, and gives up after a bound.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from mult.training.telemetry import ADDRESS_FILE, METRIC_NAMES, read_address_file
from mult.launch.local import free_port, stop_process

ROOT = Path(__file__).resolve().parents[1]
SCRAPE_CONFIG = ROOT / "cluster" / "prometheus" / "prometheus.yml"
DASHBOARD = ROOT / "cluster" / "grafana" / "mult-dashboard.json"
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
NO_PROMETHEUS = "the prometheus binary is not installed (apt-get install -y prometheus)"
WAIT_S = 60.0  # bound on each poll once the training serves metrics
START_S = 240.0  # bound on the training's start (Ray Train worker group, model, first batches)

BUCKET = "mult-prometheus-test"
TASKS = ["normal", "depth_zbuffer", "segment_semantic"]
# The smoke test's kind of run, at 32 px with a smaller model (as tests/test_train.py runs it).
TRAINING = [
    "--config", "configs/cpu-small.yaml", f"tasks=[{','.join(TASKS)}]", "model.img_size=32",
    "model.embed_dim=12", "model.num_heads=[1,1,1,1]", "data.num_workers=1",
    "train.global_batch_size=4", "train.micro_batch_size=2", "optim.warmup_steps=1", "train.log_every=1",
    "train.val_every=4", "train.val_batches=1", "train.checkpoint_every=1000", "train.precision=fp32",
    "metrics.tensorboard=false",
    # an upper bound only: the test stops the run when its checks are done (or have failed)
    "train.max_steps=1000",
]


@dataclass
class Training:
    """A running ``pipelines.train``: its process, log and rank 0's metrics port."""

    proc: subprocess.Popen
    log_path: Path
    port: int

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


Watched = tuple[str, subprocess.Popen, Path]  # what, process, its log


def _get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # 127.0.0.1 only
        return resp.read()


def _wait_for(what: str, probe: Callable[[], Any], watched: list[Watched], bound: float = WAIT_S) -> Any:
    """Call ``probe`` until it returns something truthy, for at most ``bound`` seconds.

    Fails at once, with the log's tail, if one of the ``watched`` processes has exited.
    """
    deadline = time.monotonic() + bound
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        for name, proc, log_path in watched:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-4000:]
                pytest.fail(f"while waiting for {what}: {name} exited with code {proc.returncode}:\n{tail}")
        try:
            result = probe()
            if result:
                return result
        except (OSError, urllib.error.URLError, ValueError, KeyError) as exc:
            last_error = exc
        time.sleep(0.5)
    pytest.fail(f"timed out after {bound:.0f} s waiting for {what} (last error: {last_error})")


def config_for_test(port: int, ray_sd_file: Path) -> dict[str, Any]:
    """The shipped scrape config, pointed at this test's endpoint and SD file.

    The EC2-discovered job is dropped: it needs AWS's API, which a test cannot reach. Intervals
    are 1 s so that a short run is scraped many times.
    """
    cfg = yaml.safe_load(SCRAPE_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in cfg["scrape_configs"]}
    assert set(jobs) == {"ray", "mult", "mult-workers"}, "update this test with the scrape config"
    assert "ec2_sd_configs" in jobs["mult-workers"]
    cfg["global"]["scrape_interval"] = "1s"
    cfg["global"]["evaluation_interval"] = "1s"
    jobs["ray"]["file_sd_configs"][0]["files"] = [str(ray_sd_file)]
    jobs["ray"]["file_sd_configs"][0]["refresh_interval"] = "1s"
    (static,) = jobs["mult"]["static_configs"]
    static["targets"] = [f"127.0.0.1:{port}"]
    cfg["scrape_configs"] = [jobs["ray"], jobs["mult"]]
    return cfg


def ray_targets_on_loopback(ray_sd: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ray's service-discovery list with every target's host replaced by 127.0.0.1.

    Ray lists its node's IP; the tests keep to the loopback address, where the same ports answer.
    """
    return [{**group, "targets": [f"127.0.0.1:{t.rsplit(':', 1)[1]}" for t in group["targets"]]}
            for group in ray_sd]


def _query(base: str, promql: str) -> list[dict[str, Any]]:
    body = json.loads(_get(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql})))
    if body.get("status") != "success":
        raise ValueError(f"query {promql!r} failed: {body}")
    return body["data"]["result"]


def _series_names(base: str, match: str) -> set[str]:
    body = json.loads(_get(f"{base}/api/v1/series?" + urllib.parse.urlencode({"match[]": match})))
    return {series["__name__"] for series in body["data"]}


def _dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


@pytest.fixture(scope="module")
def smoke_shards(s3_server) -> tuple[str, str]:
    """The smoke test's generated dataset (train, val shard URLs), in the local S3 server."""
    from mult.data.smoke import make_smoke_dataset

    bucket = s3_server.make_bucket(BUCKET)
    return make_smoke_dataset(f"{bucket}/data", size=32, seed=11)


@pytest.fixture
def smoke_training(tmp_path: Path, ray_head, smoke_shards) -> Iterator[Training]:
    """``python -m pipelines.train`` with ``metrics.prometheus_port=0``; yields once rank 0 serves.

    The port is read from the address file rank 0 writes. The run is stopped (its process
    group, then Ray ends the job's workers) when the test ends, passed or not.
    """
    train_url, val_url = smoke_shards
    local = tmp_path / "runs"
    args = [*TRAINING, f"data.train={train_url}", f"data.val={val_url}",
            f"train.storage_path=s3://{BUCKET}/runs", f"train.run_name=prom-{os.getpid()}",
            f"metrics.local_dir={local}", "metrics.prometheus_port=0"]
    log_path = tmp_path / "train.log"
    with open(log_path, "w") as log_fh:
        proc = subprocess.Popen([sys.executable, "-m", "pipelines.train", *args], cwd=ROOT,
                                stdout=log_fh, stderr=subprocess.STDOUT, start_new_session=True)
    url = None
    try:
        watched = [("the training", proc, log_path)]
        address = _wait_for("rank 0's metrics address file",
                            lambda: [read_address_file(p.parent) for p in local.glob(f"*/{ADDRESS_FILE}")],
                            watched, bound=START_S)
        (info,) = address
        assert info["host"] == "127.0.0.1"
        url = info["url"]
        _wait_for("rank 0's /metrics", lambda: b"mult_train_step" in _get(url), watched)
        yield Training(proc, log_path, int(info["port"]))
    finally:
        stop_process(proc, timeout_s=30)
    if url is not None:  # Ray ends a job's workers when its driver goes; rank 0's endpoint with them
        _wait_for("the stopped training's workers to exit (rank 0's endpoint to close)",
                  lambda: not _answers(url), [])


def _answers(url: str) -> bool:
    try:
        _get(url, timeout=2)
    except OSError:
        return False
    return True


@pytest.fixture
def prometheus(tmp_path: Path, ray_head, smoke_training: Training) -> Iterator[tuple[str, list[Watched]]]:
    """A real Prometheus scraping the training and the Ray head; yields its URL and what to watch."""
    # The file the Ray head keeps current (see ray/_private/metrics_agent.py): here in the
    # head's temp dir rather than /tmp/ray, and copied with its targets on 127.0.0.1.
    ray_sd = Path(ray_head.temp_dir) / "prom_metrics_service_discovery.json"
    train_watch = [("the training", smoke_training.proc, smoke_training.log_path)]
    groups = _wait_for("Ray's Prometheus service-discovery file",
                       lambda: json.loads(ray_sd.read_text()), train_watch)
    sd_file = tmp_path / "prom_metrics_service_discovery.json"
    sd_file.write_text(json.dumps(ray_targets_on_loopback(groups)))
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(config_for_test(smoke_training.port, sd_file), sort_keys=False))
    port = free_port()
    log_path = tmp_path / "prometheus.log"
    with open(log_path, "w") as log_fh:
        proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=log_fh, stderr=subprocess.STDOUT, start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        watched = [*train_watch, ("Prometheus", proc, log_path)]
        _wait_for("Prometheus to be ready", lambda: _get(f"{base}/-/ready"), watched)
        yield base, watched
    finally:
        stop_process(proc)


@pytest.mark.slow
@pytest.mark.timeout(420)
@pytest.mark.skipif(PROMETHEUS is None, reason=NO_PROMETHEUS)  # checked before the training starts
def test_prometheus_scrapes_the_training_and_dashboard_queries_answer(prometheus) -> None:
    base, watched = prometheus

    def wait(what: str, probe: Callable[[], Any]) -> Any:
        return _wait_for(what, probe, watched)

    expected = set(METRIC_NAMES)
    names = wait("all mult_* series under job=mult",
                 lambda: (n := _series_names(base, '{__name__=~"mult_.*",job="mult"}')) >= expected and n)
    assert expected <= names
    tasks = wait("a loss series per task and the total",
                 lambda: (t := {r["metric"]["task"] for r in _query(base, 'mult_train_loss{job="mult"}')})
                 >= set(TASKS) | {"total"} and t)
    assert tasks == set(TASKS) | {"total"}
    # the series follow the run: the step advanced between scrapes, validation reported a value
    assert wait("mult_train_step to change between scrapes",
                lambda: _query(base, 'changes(mult_train_step{job="mult"}[5m]) > 0'))
    assert wait("a validation objective", lambda: _query(base, 'mult_val_objective{job="mult"} > 0'))
    ray_up = wait("the file_sd (Ray head) targets to be up", lambda: _query(base, 'up{job="ray"} == 1'))
    assert all(r["metric"]["instance"].startswith("127.0.0.1:") for r in ray_up)
    for expr in _dashboard_exprs():
        if "mult_" not in expr:
            continue  # Ray's GPU series need GPU nodes; test_dashboard_uses_known_metrics covers them
        promql = expr.replace("$__rate_interval", "30s")
        result = wait(f"dashboard query {promql!r} to return data", lambda q=promql: _query(base, q))
        assert result


def test_scrape_config_for_test_points_at_the_endpoint(tmp_path):
    cfg = config_for_test(12345, tmp_path / "sd.json")
    jobs = {job["job_name"]: job for job in cfg["scrape_configs"]}
    assert jobs["mult"]["static_configs"][0]["targets"] == ["127.0.0.1:12345"]
    assert jobs["ray"]["file_sd_configs"][0]["files"] == [str(tmp_path / "sd.json")]
    ray_sd = [{"labels": {"job": "ray"}, "targets": ["192.0.2.2:44217", "10.1.2.3:8080"]}]
    assert ray_targets_on_loopback(ray_sd) == [
        {"labels": {"job": "ray"}, "targets": ["127.0.0.1:44217", "127.0.0.1:8080"]}]


def test_shipped_scrape_config_targets_ray_and_the_pipeline():
    cfg = yaml.safe_load(SCRAPE_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in cfg["scrape_configs"]}
    assert jobs["ray"]["file_sd_configs"][0]["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]
    paper = yaml.safe_load((ROOT / "configs" / "paper.yaml").read_text())
    port = paper["metrics"]["prometheus_port"]
    assert jobs["mult"]["static_configs"][0]["targets"] == [f"127.0.0.1:{port}"]
    assert jobs["mult-workers"]["ec2_sd_configs"][0]["port"] == port
    aws = yaml.safe_load((ROOT / "cluster" / "aws.yaml").read_text())
    ec2_filters = {f["name"]: f["values"] for f in jobs["mult-workers"]["ec2_sd_configs"][0]["filters"]}
    assert ec2_filters["tag:ray-cluster-name"] == [aws["cluster_name"]]


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (apt-get install -y prometheus)")
def test_promtool_accepts_the_scrape_config(tmp_path):
    result = subprocess.run([PROMTOOL, "check", "config", str(SCRAPE_CONFIG)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    broken = tmp_path / "prometheus.yml"
    broken.write_text(SCRAPE_CONFIG.read_text().replace("scrape_interval: 15s", "scrape_interval: soon", 1))
    result = subprocess.run([PROMTOOL, "check", "config", str(broken)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode != 0


def test_dashboard_uses_known_metrics_and_covers_the_pipeline():
    dash = json.loads(DASHBOARD.read_text())
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    exprs = _dashboard_exprs()
    used = {name for e in exprs for name in re.findall(r"\b(mult_\w+|ray_\w+)", e)}
    unknown = {n for n in used if n.startswith("mult_")} - set(METRIC_NAMES)
    assert not unknown, f"the dashboard reads metrics the trainer does not export: {unknown}"
    assert set(METRIC_NAMES) <= used, f"not on the dashboard: {set(METRIC_NAMES) - used}"
    assert any(n.startswith("ray_") for n in used)
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for topic in ("throughput", "step time", "data wait", "loss per task", "bad samples"):
        assert topic in titles


def test_podmonitors_scrape_ports_the_raycluster_names():
    monitors = list(yaml.safe_load_all((ROOT / "cluster" / "prometheus" / "podmonitors.yaml").read_text()))
    cluster = yaml.safe_load((ROOT / "cluster" / "kuberay" / "raycluster.yaml").read_text())
    templates = [cluster["spec"]["headGroupSpec"]["template"]] + [
        g["template"] for g in cluster["spec"]["workerGroupSpecs"]
    ]
    ports = {p["name"]: p["containerPort"] for t in templates for c in t["spec"]["containers"] for p in c["ports"]}
    paper = yaml.safe_load((ROOT / "configs" / "paper.yaml").read_text())
    assert ports["mult-metrics"] == paper["metrics"]["prometheus_port"]
    for monitor in monitors:
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["kind"] == "PodMonitor"
        assert monitor["spec"]["selector"]["matchLabels"]["ray.io/cluster"] == cluster["metadata"]["name"]
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            assert endpoint["port"] in ports
