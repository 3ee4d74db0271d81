"""Training telemetry: a Prometheus endpoint (+ Pushgateway), TensorBoard events, a loss-curve PNG.

:class:`RankZeroTelemetry` is the training loop's hook that drives all three on rank 0.
prometheus-client, tensorboard and matplotlib are imported only when the object that needs
them is created, so ``import mult.training.telemetry`` stays light.

Metric names (the Grafana dashboard reads them)::

    mult_train_samples_per_second   gauge
    mult_train_step_seconds         gauge
    mult_train_data_wait_seconds    gauge   (per step, summed over the step's micro-batches)
    mult_train_loss{task=...}       gauge   (task="total" is the combined loss)
    mult_train_bad_samples_total    counter
    mult_train_step                 gauge
    mult_val_objective              gauge
"""

from __future__ import annotations

import json
import logging
import os
import socket
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mult.config import MetricsConfig
from mult.outputs import pyplot, save_figure
from mult.training.session import Hook

log = logging.getLogger(__name__)

ADDRESS_FILE = "prometheus_address.json"
NODE_IP = "node-ip"  # metrics.prometheus_host: bind to this node's private address
LOSS_CURVE_FILE = "loss_curve.png"
TENSORBOARD_DIR = "tensorboard"
METRIC_NAMES = (
    "mult_train_samples_per_second",
    "mult_train_step_seconds",
    "mult_train_data_wait_seconds",
    "mult_train_loss",
    "mult_train_bad_samples_total",
    "mult_train_step",
    "mult_val_objective",
)


@dataclass
class TrainSnapshot:
    """One logging interval's numbers, already reduced across ranks."""

    step: int
    samples_per_second: float
    step_seconds: float
    data_wait_seconds: float
    losses: dict[str, float]  # per task, plus "total"
    bad_samples_total: int


class PrometheusExporter:
    """Serves the training metrics over HTTP and optionally pushes them to a Pushgateway.

    ``port=None`` serves nothing (push only, if a gateway is given); ``port=0`` binds a free
    port. The bound address is logged and, when ``address_file`` is given, written there as
    JSON ``{"host": ..., "port": ..., "url": ...}``.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int | None = 0,
        *,
        pushgateway: str | None = None,
        job: str = "mult-train",
        grouping_key: dict[str, str] | None = None,
        address_file: str | Path | None = None,
    ) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge

        self.registry = CollectorRegistry()
        self.pushgateway = pushgateway
        self.job = job
        self.grouping_key = grouping_key or {}
        self._bad_samples_seen = 0
        reg = self.registry
        self.samples_per_second = Gauge(
            "mult_train_samples_per_second", "Training throughput, samples/s over all ranks", registry=reg
        )
        self.step_seconds = Gauge("mult_train_step_seconds", "Wall time of one optimizer step", registry=reg)
        self.data_wait = Gauge(
            "mult_train_data_wait_seconds", "Seconds per step spent waiting for batches", registry=reg
        )
        self.loss = Gauge("mult_train_loss", "Training loss per task (task=total: combined)", ["task"], registry=reg)
        self.bad_samples = Counter(
            "mult_train_bad_samples", "Samples skipped as corrupt or incomplete", registry=reg
        )
        self.step = Gauge("mult_train_step", "Optimizer steps done", registry=reg)
        self.val_objective = Gauge("mult_val_objective", "Validation objective (lower is better)", registry=reg)
        self.address: tuple[str, int] | None = None
        self._server = None
        if port is not None:
            self._serve(host, port, address_file)

    def _serve(self, host: str, port: int, address_file: str | Path | None) -> None:
        from prometheus_client import start_http_server

        if host == NODE_IP:
            host = node_ip_address()
        if not 0 <= port <= 65535:
            raise ValueError(f"metrics.prometheus_port: must be in 0..65535 (0 picks a free port), got {port}")
        try:
            server, _thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise OSError(f"cannot serve Prometheus metrics on {host}:{port}: {exc}") from exc
        self._server = server
        bound = server.server_address[1]
        self.address = (host, bound)
        shown = socket.gethostname() if host in ("0.0.0.0", "::") else host
        url = f"http://{shown}:{bound}/metrics"
        log.info("Prometheus metrics served at %s", url)
        if address_file is not None:
            path = Path(address_file)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"host": host, "port": bound, "url": url}))
            os.replace(tmp, path)  # readers never see a half-written file

    def update(self, snap: TrainSnapshot) -> None:
        self.samples_per_second.set(snap.samples_per_second)
        self.step_seconds.set(snap.step_seconds)
        self.data_wait.set(snap.data_wait_seconds)
        for task, value in snap.losses.items():
            self.loss.labels(task=task).set(value)
        delta = snap.bad_samples_total - self._bad_samples_seen
        if delta > 0:
            self.bad_samples.inc(delta)
            self._bad_samples_seen = snap.bad_samples_total
        self.step.set(snap.step)
        self.push()

    def set_bad_samples_base(self, count: int) -> None:
        """After a resume: the counter continues from the checkpoint's count."""
        if count > self._bad_samples_seen:
            self.bad_samples.inc(count - self._bad_samples_seen)
            self._bad_samples_seen = count

    def update_validation(self, objective: float) -> None:
        self.val_objective.set(objective)
        self.push()

    def push(self) -> None:
        """Push to the Pushgateway, if configured. Failures are logged; training goes on."""
        if not self.pushgateway:
            return
        from prometheus_client import push_to_gateway

        try:
            push_to_gateway(
                self.pushgateway, job=self.job, registry=self.registry,
                grouping_key=self.grouping_key, timeout=5,
            )
        except OSError as exc:
            log.warning("Pushgateway %s unreachable: %s", self.pushgateway, exc)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def node_ip_address() -> str:
    """This node's address on the network its default route leaves by: the instance's private IP
    on a cloud VM, the pod IP under Kubernetes (what Ray itself reports for the node). A UDP
    ``connect`` picks the route without sending anything."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("10.254.254.254", 1))
        except OSError as exc:
            raise OSError(f"metrics.prometheus_host={NODE_IP}: this node has no network route to find "
                          f"its address ({exc}); set metrics.prometheus_host to an address") from exc
        return sock.getsockname()[0]


def read_address_file(run_dir: str | Path) -> dict[str, Any]:
    """The ``{"host", "port", "url"}`` that rank 0 wrote when its endpoint came up."""
    return json.loads((Path(run_dir) / ADDRESS_FILE).read_text())


class TensorBoardLogger:
    """Scalars to TensorBoard event files under ``logdir``."""

    def __init__(self, logdir: str | Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        self._writer = SummaryWriter(log_dir=str(self.logdir))

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for name, value in scalars.items():
            self._writer.add_scalar(name, value, global_step=step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def plot_loss_curve(
    history: list[dict[str, float]], path: str | Path, val_history: list[dict[str, float]] | None = None
) -> Path:
    """Write a PNG of the training losses (one line per key, log scale) against ``step``.

    ``history`` rows look like ``{"step": 10, "total": 1.2, "normal": 0.3, ...}``;
    ``val_history`` rows ``{"step": 10, "objective": 1.1}`` are drawn as markers.
    """
    fig, ax = pyplot().subplots(figsize=(7, 4), dpi=100)
    keys = sorted({k for row in history for k in row if k != "step"}, key=lambda k: (k != "total", k))
    for key in keys:
        rows = [r for r in history if key in r]
        ax.plot([r["step"] for r in rows], [r[key] for r in rows], label=key,
                linewidth=2.2 if key == "total" else 1.0)
    if val_history:
        ax.plot([r["step"] for r in val_history], [r["objective"] for r in val_history], "ko",
                label="val objective")
    positive = all(r[k] > 0 for r in history for k in keys if k in r)
    if positive and history:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    if keys or val_history:
        ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path)


class RankZeroTelemetry(Hook):
    """Rank 0's Prometheus endpoint, TensorBoard writer and loss-curve PNG, as a loop hook.

    Files go to ``local_dir``; with ``upload_url`` (the run on S3) they are copied there at
    every checkpoint and at the end. ``progress`` is the loop's live
    :class:`~mult.training.loop.Progress` (its loss history and counters).
    """

    def __init__(self, metrics: MetricsConfig, local_dir: Path, progress: Any,
                 upload_url: str | None = None, skip_files: tuple[str, ...] = ()) -> None:
        self.dir = Path(local_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.progress = progress
        self.upload_url = upload_url
        self.skip_files = skip_files
        self.exporter = None
        if metrics.prometheus_port is not None or metrics.pushgateway:
            self.exporter = PrometheusExporter(
                metrics.prometheus_host, metrics.prometheus_port, pushgateway=metrics.pushgateway,
                grouping_key={"run": self.dir.name}, address_file=self.dir / ADDRESS_FILE,
            )
            self.exporter.set_bad_samples_base(progress.bad_samples)
        self.tb = TensorBoardLogger(self.dir / TENSORBOARD_DIR) if metrics.tensorboard else None

    def before_report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        if self.exporter is not None:
            self.exporter.update(TrainSnapshot(
                step=int(metrics["step"]), samples_per_second=metrics["samples_per_second"],
                step_seconds=metrics["step_seconds"], data_wait_seconds=metrics["data_wait_seconds"],
                losses={k[5:]: v for k, v in metrics.items() if k.startswith("loss/")},
                bad_samples_total=int(metrics["bad_samples_total"]),
            ))
            validated = any(k.startswith("val/") for k in metrics)
            if validated and math.isfinite(metrics.get("val_objective", math.nan)):
                self.exporter.update_validation(metrics["val_objective"])
        if self.tb is not None:
            skip = ("step", "epoch", "resumed_from_step")
            scalars = {k: v for k, v in metrics.items()
                       if k not in skip and isinstance(v, (int, float)) and math.isfinite(v)}
            self.tb.log(int(metrics["step"]), scalars)
        if checkpoint_dir is not None:
            self.flush()

    def flush(self) -> None:
        """Draw the loss curve; copy the telemetry files to the run's S3 storage."""
        if self.progress.history:
            plot_loss_curve(self.progress.history, self.dir / LOSS_CURVE_FILE, self.progress.val_history)
        if self.upload_url is None:
            return
        from mult.data.storage import StorageError, open_storage

        storage = open_storage(self.upload_url)
        for path in self.dir.rglob("*"):
            if path.is_file() and path.name not in self.skip_files:
                try:
                    storage.upload_file(path, path.relative_to(self.dir).as_posix())
                except StorageError as exc:
                    log.warning("could not copy %s to %s: %s", path, self.upload_url, exc)

    def close(self) -> None:
        try:
            self.flush()
        finally:
            if self.tb is not None:
                self.tb.close()
            if self.exporter is not None:
                self.exporter.close()
