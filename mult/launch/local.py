"""Local stand-ins for a cluster's services, for the demo and the tests.

* :class:`MotoServer`: a real S3-compatible HTTP server (moto's standalone ``moto_server``) on
  127.0.0.1, with fake credentials. Everything that talks to it goes through boto3 / pyarrow
  exactly as against AWS, with ``AWS_ENDPOINT_URL`` pointing here.
* :class:`RayHead`: one ``ray start --head --block`` child process. It is stopped by its PID
  (its process group), never with ``ray stop``, which would kill every Ray on the host.

Both are context managers, and both export their settings into ``os.environ`` only inside
:func:`exported`, so the caller decides what its children inherit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

log = logging.getLogger("mult.services")

VENV_BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]

# moto accepts any credentials; these keep boto3 from looking for real ones.
FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    """Poll ``url`` until it answers (any HTTP status), for at most ``timeout_s`` seconds."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited early with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # the server answered, just not with 200
        except OSError as exc:
            last = exc
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout_s:.0f}s ({last})")


def stop_process(proc: subprocess.Popen, timeout_s: float = 15.0) -> None:
    """Stop a child started with ``start_new_session=True``, and its whole process group."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout_s)


@contextlib.contextmanager
def exported(env: dict[str, str], unset: tuple[str, ...] = ()) -> Iterator[None]:
    """Set ``env`` (and remove ``unset``) in ``os.environ``; restore the old values after."""
    saved = {key: os.environ.get(key) for key in (*env, *unset)}
    os.environ.update(env)
    for key in unset:
        os.environ.pop(key, None)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class MotoServer:
    """moto's standalone S3 server on 127.0.0.1 (a subprocess)."""

    def __init__(self, port: int | None = None, log_dir: Path | None = None):
        self.port = port or free_port()
        self.log_path = (log_dir or Path(tempfile.gettempdir())) / f"moto-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """What a client needs to reach this server through the standard AWS settings."""
        return {**FAKE_AWS_ENV, "AWS_ENDPOINT_URL": self.endpoint}

    def start(self, timeout_s: float = 60.0) -> "MotoServer":
        with open(self.log_path, "ab") as log_fh:
            self.proc = subprocess.Popen(
                [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log_fh, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, **FAKE_AWS_ENV},
            )
        wait_http(f"{self.endpoint}/moto-api/", timeout_s, self.proc)
        log.info("S3-compatible server (moto) listening on %s", self.endpoint)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

    def restart(self) -> None:
        """Stop and start on the same port (all buckets are lost)."""
        self.stop()
        deadline = time.monotonic() + 30
        while True:  # the port can linger for a moment after the old process exits
            try:
                self.start()
                return
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                self.stop()
                time.sleep(0.5)

    def client(self):
        import boto3

        return boto3.session.Session(
            aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
        ).client("s3", endpoint_url=self.endpoint)

    def make_bucket(self, name: str) -> str:
        """Create ``name`` if absent; returns ``s3://name``."""
        client = self.client()
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou,
                                 client.exceptions.BucketAlreadyExists):
            client.create_bucket(Bucket=name)
        return f"s3://{name}"

    def environment(self) -> contextlib.AbstractContextManager:
        """Export this server's endpoint and fake credentials while the context is open."""
        return exported(self.env, unset=("AWS_PROFILE", "AWS_ENDPOINT_URL_S3"))

    def __enter__(self) -> "MotoServer":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass
class RayHead:
    """One ``ray start --head --block`` child process, with its own ports and temp dir.

    The head and the workers it spawns inherit this process's environment at :meth:`start`
    (so export S3 settings first). ``RAY_AUTH_MODE=disabled`` is used for the head and, through
    :attr:`env`, for its clients: STACK.md's token-auth mismatch otherwise breaks job submission.
    """

    num_cpus: int = 2
    object_store_bytes: int = 200 * 2**20
    address: str = ""
    dashboard_url: str = ""
    temp_dir: str = ""
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def env(self) -> dict[str, str]:
        return {"RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}

    def start(self, timeout_s: float = 180.0) -> "RayHead":
        self.temp_dir = tempfile.mkdtemp(prefix="r", dir="/tmp")  # Ray's socket paths are short
        port, dash = free_port(), free_port()
        cmd = [
            str(VENV_BIN / "ray"), "start", "--head", "--block",
            "--port", str(port), "--num-cpus", str(self.num_cpus), "--num-gpus", "0",
            "--temp-dir", self.temp_dir,
            "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
            "--dashboard-port", str(dash),
            "--dashboard-agent-listen-port", str(free_port()),
            "--dashboard-agent-grpc-port", str(free_port()),
            "--runtime-env-agent-port", str(free_port()),
            "--metrics-export-port", str(free_port()),
            "--ray-client-server-port", str(free_port()),
            "--object-store-memory", str(self.object_store_bytes),
            "--disable-usage-stats",
        ]
        env = {
            **os.environ,
            "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        }
        env.pop("RAY_ADDRESS", None)
        log_path = Path(self.temp_dir) / "ray-start.log"
        with open(log_path, "ab") as log_fh:
            self.proc = subprocess.Popen(cmd, stdout=log_fh, stderr=subprocess.STDOUT,
                                         start_new_session=True, env=env)
        self.address = f"127.0.0.1:{port}"
        self.dashboard_url = f"http://127.0.0.1:{dash}"
        try:
            wait_http(f"{self.dashboard_url}/api/version", timeout_s, self.proc)
        except RuntimeError:
            self.stop()
            raise
        log.info("Ray head at %s, dashboard %s", self.address, self.dashboard_url)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout_s=60)
            self.proc = None
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> "RayHead":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
