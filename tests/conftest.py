"""Session fixtures shared by every test file.

* ``s3_server``: a real S3-compatible HTTP server (moto's standalone ``moto_server``, a
  subprocess on 127.0.0.1), with ``AWS_ENDPOINT_URL`` and fake credentials exported for the
  session. ``MotoServer`` can also be started privately by a test that restarts it.
* ``ray_head``: ONE Ray head for the whole session (``ray start --head --block`` as a child
  process, so teardown stops exactly that head by its PID; ``ray stop`` would kill every Ray
  on the host). ``RAY_ADDRESS`` and ``RAY_AUTH_MODE`` are exported so clients connect to it.
* ``synth_tree``: a factory, ``synth_tree(format, scenes=2, views=2, size=32, seed=0)``, that
  runs the project's generator (``python -m pipelines.synth``) once per argument set per
  session and returns the dataset root.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest

VENV_BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_http(url: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    """Poll ``url`` until it answers (any HTTP status), at most ``timeout_s`` seconds."""
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


def _stop_process(proc: subprocess.Popen, timeout_s: float = 15.0) -> None:
    """Stop a child (and its process group) that this test session started."""
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


# ---------------------------------------------------------------------------------------------
# S3: moto's standalone server.
# ---------------------------------------------------------------------------------------------
FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    # Keep any real profile or credentials file on this machine out of the tests.
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}


class MotoServer:
    """``moto_server -H 127.0.0.1 -p PORT`` as a subprocess. Its data lives in memory, so a
    restart (same port) comes back empty: a test that restarts it re-creates what it needs."""

    def __init__(self, port: int | None = None, log_dir: Path | None = None):
        self.port = port or free_port()
        self.log_path = (log_dir or Path(tempfile.gettempdir())) / f"moto-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0) -> "MotoServer":
        with open(self.log_path, "ab") as log_fh:
            self.proc = subprocess.Popen(
                [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log_fh, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, **FAKE_AWS_ENV},
            )
        _wait_http(f"{self.endpoint}/moto-api/", timeout_s, self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            _stop_process(self.proc)
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

    @contextlib.contextmanager
    def environment(self) -> Iterator[None]:
        """Export this server's endpoint and fake credentials, restoring the old values after."""
        with pytest.MonkeyPatch.context() as mp:
            for key, value in {**FAKE_AWS_ENV, "AWS_ENDPOINT_URL": self.endpoint}.items():
                mp.setenv(key, value)
            mp.delenv("AWS_PROFILE", raising=False)
            mp.delenv("AWS_ENDPOINT_URL_S3", raising=False)
            yield


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """A moto S3 server for the session, with ``AWS_ENDPOINT_URL`` and fake keys exported."""
    server = MotoServer(log_dir=tmp_path_factory.mktemp("moto")).start()
    try:
        with server.environment():
            yield server
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------
# Ray: one head for the session.
# ---------------------------------------------------------------------------------------------
@dataclass
class RayHead:
    address: str
    dashboard_url: str
    temp_dir: str
    proc: subprocess.Popen


@pytest.fixture(scope="session")
def ray_head(s3_server: MotoServer) -> Iterator[RayHead]:
    """One ``ray start --head`` for the session, stopped by PID at the end.

    It depends on ``s3_server`` so that the head (and the workers it spawns) inherit the S3
    endpoint and fake credentials. ``RAY_AUTH_MODE=disabled`` is set for head and clients alike.
    """
    temp_dir = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: Ray's socket paths have a limit
    port, dash = free_port(), free_port()
    cmd = [
        str(VENV_BIN / "ray"), "start", "--head", "--block",
        "--port", str(port), "--num-cpus", "2", "--num-gpus", "0",
        "--temp-dir", temp_dir,
        "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
        "--dashboard-agent-listen-port", str(free_port()),
        "--dashboard-agent-grpc-port", str(free_port()),
        "--runtime-env-agent-port", str(free_port()),
        "--metrics-export-port", str(free_port()),
        "--ray-client-server-port", str(free_port()),
        "--object-store-memory", str(200 * 2**20),
        "--disable-usage-stats",
    ]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", "disabled")
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        log_path = Path(temp_dir) / "ray-start.log"
        with open(log_path, "ab") as log_fh:
            proc = subprocess.Popen(cmd, stdout=log_fh, stderr=subprocess.STDOUT,
                                    start_new_session=True, env=dict(os.environ))
        head = RayHead(f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}", temp_dir, proc)
        try:
            _wait_http(f"{head.dashboard_url}/api/version", 180, proc)
            mp.setenv("RAY_ADDRESS", head.address)
            yield head
        finally:
            _stop_process(proc, timeout_s=60)
            shutil.rmtree(temp_dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Generated datasets.
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def synth_tree(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``synth_tree(format, scenes=2, views=2, size=32, seed=0) -> Path``: a generated dataset
    in that format's real layout, made once per argument set for the session."""
    cache: dict[tuple, Path] = {}

    def make(fmt: str, scenes: int = 2, views: int = 2, size: int = 32, seed: int = 0) -> Path:
        args = (fmt, scenes, views, size, seed)
        if args not in cache:
            out = tmp_path_factory.mktemp(f"synth-{fmt}")
            cmd = [sys.executable, "-m", "pipelines.synth", "--format", fmt, "--out", str(out),
                   "--scenes", str(scenes), "--views", str(views), "--size", str(size),
                   "--seed", str(seed)]
            result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
            if result.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}")
            cache[args] = out
        return cache[args]

    return make
