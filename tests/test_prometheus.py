"""The observability configs: cluster/prometheus/ and the Grafana dashboard.

The main test starts a real Prometheus (Debian's `prometheus` package) on 127.0.0.1 with a copy
of cluster/prometheus/prometheus.yml, against a running process that serves the pipeline's
``mult_*`` metrics, and checks through Prometheus's HTTP API that the series arrived under both
scrape jobs and that every dashboard query returns data.

The serving process is a stand-in for the smoke training: it drives the trainer's own exporter
(``mult.telemetry.PrometheusExporter``) in a loop, so metric names and types are the real ones.
To use the real run instead, change ``pipeline_command`` to ``SMOKE_TRAINING`` (it needs a local
Ray and takes much longer).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from mult.telemetry import METRIC_NAMES

ROOT = Path(__file__).resolve().parents[1]
SCRAPE_CONFIG = ROOT / "cluster" / "prometheus" / "prometheus.yml"
DASHBOARD = ROOT / "cluster" / "grafana" / "mult-dashboard.json"
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
NO_PROMETHEUS = "the prometheus binary is not installed (apt-get install -y prometheus)"
WAIT_S = 60.0  # bound on every poll below

# The stand-in training: the trainer's exporter, updated every 0.2 s for at most argv[2] seconds
# (so it cannot outlive a test that dies without cleaning up).
STANDIN = """
import sys, time
from mult.tasks import TASK_NAMES
from mult.telemetry import PrometheusExporter, TrainSnapshot

exporter = PrometheusExporter("127.0.0.1", int(sys.argv[1]))
deadline = time.monotonic() + float(sys.argv[2])
step = 0
while time.monotonic() < deadline:
    step += 1
    losses = {task: 1.0 + i + 1.0 / step for i, task in enumerate(TASK_NAMES)}
    losses["total"] = sum(losses.values())
    exporter.update(TrainSnapshot(step=step, samples_per_second=16.0, step_seconds=0.5,
                                  data_wait_seconds=0.1, losses=losses, bad_samples_total=step // 5))
    exporter.update_validation(1.0 / step)
    time.sleep(0.2)
exporter.close()
"""


def STANDIN_TRAINING(port: int) -> list[str]:
    return [sys.executable, "-c", STANDIN, str(port), "120"]


def SMOKE_TRAINING(port: int) -> list[str]:
    return [sys.executable, "-m", "pipelines.train", "--config", "configs/cpu-small.yaml",
            "--smoke-test", f"metrics.prometheus_port={port}"]


pipeline_command = STANDIN_TRAINING


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (127.0.0.1 only)
        return resp.read()


def _wait_for(what: str, probe, proc: subprocess.Popen | None = None) -> Any:
    """Call ``probe`` until it returns something truthy, at most WAIT_S seconds."""
    deadline = time.monotonic() + WAIT_S
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            pytest.fail(f"{what}: the process exited with {proc.returncode}:\n{out[-3000:]}")
        try:
            result = probe()
            if result:
                return result
        except (OSError, urllib.error.URLError, ValueError) as exc:
            last_error = exc
        time.sleep(0.5)
    pytest.fail(f"timed out after {WAIT_S:.0f} s waiting for {what} (last error: {last_error})")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
    if proc.stdout:
        proc.stdout.close()


def config_for_test(port: int, ray_sd_file: Path) -> dict[str, Any]:
    """The shipped scrape config, pointed at this test's endpoint and SD file.

    The EC2-discovered job is dropped: it needs AWS's API, which a test cannot reach.
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


@pytest.fixture
def pipeline_endpoint(tmp_path):
    """A running process that serves the mult_* metrics; yields its port."""
    port = _free_port()
    proc = subprocess.Popen(pipeline_command(port), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for("the pipeline's /metrics",
                  lambda: b"mult_train_step" in _get(f"http://127.0.0.1:{port}/metrics"), proc)
        yield port
    finally:
        _stop(proc)


@pytest.fixture
def prometheus(tmp_path, pipeline_endpoint):
    """A real Prometheus scraping the pipeline endpoint; yields its base URL."""
    if PROMETHEUS is None:
        pytest.skip(NO_PROMETHEUS)
    # What the Ray head writes to /tmp/ray/prom_metrics_service_discovery.json (see
    # ray/_private/metrics_agent.py), listing this test's endpoint instead of Ray's nodes.
    sd_file = tmp_path / "prom_metrics_service_discovery.json"
    sd_file.write_text(json.dumps([{"labels": {"job": "ray"}, "targets": [f"127.0.0.1:{pipeline_endpoint}"]}]))
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(config_for_test(pipeline_endpoint, sd_file), sort_keys=False))
    port = _free_port()
    proc = subprocess.Popen(
        [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_for("Prometheus to be ready", lambda: _get(f"{base}/-/ready"), proc)
        yield base
    finally:
        _stop(proc)


@pytest.mark.timeout(240)
def test_prometheus_scrapes_the_pipeline_and_dashboard_queries_answer(prometheus):
    base = prometheus
    expected = set(METRIC_NAMES)
    names = _wait_for(
        "all mult_* series under job=mult",
        lambda: (n := _series_names(base, '{__name__=~"mult_.*",job="mult"}')) >= expected and n,
    )
    assert expected <= names
    ray_up = _wait_for("the file_sd (Ray) target to be up", lambda: _query(base, 'up{job="ray"} == 1'))
    assert len(ray_up) == 1
    losses = _query(base, 'mult_train_loss{job="mult"}')
    from mult.tasks import TASK_NAMES

    assert {r["metric"]["task"] for r in losses} == set(TASK_NAMES) | {"total"}
    for expr in _dashboard_exprs():
        if "mult_" not in expr:
            continue  # Ray's own series need a Ray cluster; test_dashboard_uses_known_metrics covers them
        promql = expr.replace("$__rate_interval", "30s")
        result = _wait_for(f"dashboard query {promql!r} to return data", lambda: _query(base, promql))
        assert result


def test_scrape_config_for_test_points_at_the_endpoint(tmp_path):
    cfg = config_for_test(12345, tmp_path / "sd.json")
    jobs = {job["job_name"]: job for job in cfg["scrape_configs"]}
    assert jobs["mult"]["static_configs"][0]["targets"] == ["127.0.0.1:12345"]
    assert jobs["ray"]["file_sd_configs"][0]["files"] == [str(tmp_path / "sd.json")]


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
