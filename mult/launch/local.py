"""Local stand-ins for a cluster's services, for the demo and the tests.

* :class:`MotoServer`: a real S3-compatible HTTP server (moto's standalone ``moto_server``) on
  127.0.0.1, with fake credentials. Everything that talks to it goes through boto3 / pyarrow
  exactly as against AWS, with ``AWS_ENDPOINT_URL`` pointing here.
* :class:`RayHead`: one ``ray start --head --block`` child process with token authentication:
  a random token per head, in a 0600 file inside the head's private temp dir. It is stopped by
  its PID (its process group), never with ``ray stop``, which would kill every Ray on the host.

Both are context managers, and both export their settings into ``os.environ`` only inside
:func:`exported`, so the caller decides what its children inherit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
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


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen | None = None,
              headers: dict[str, str] | None = None) -> int:
    """Poll ``url`` until it answers, for at most ``timeout_s`` seconds; returns the HTTP status
    (any status counts as an answer: the caller decides whether it is the one it wanted)."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    request = urllib.request.Request(url, headers=headers or {})
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited early with code {proc.returncode}")
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code  # the server answered, just not with 200
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


# Ray's token authentication (2.52+): the mode, and where a process finds the token. The token
# variable outranks the path, so a stray RAY_AUTH_TOKEN in the caller's environment is removed.
AUTH_MODE_ENV = "RAY_AUTH_MODE"
AUTH_TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
AUTH_TOKEN_ENV = "RAY_AUTH_TOKEN"


def refresh_ray_auth() -> None:
    """Make this process's Ray (if already imported) see the current ``RAY_AUTH_*`` variables.

    Ray reads its configuration, the auth mode included, once when ``ray._raylet`` is imported
    and caches the token on first use; a process that imported Ray before exporting a head's
    settings would otherwise keep connecting without (or with a stale) token. Ray's own tests
    reset the same two caches. A connected driver keeps its settings (it is left alone, with a
    warning): call this before ``ray.init`` and after ``ray.shutdown``.
    """
    raylet = sys.modules.get("ray._raylet")
    if raylet is None:
        return  # Ray reads the environment when it is first imported
    if sys.modules["ray"].is_initialized():
        log.warning("Ray is initialised in this process: its auth settings are left as they are")
        return
    raylet.Config.initialize("")
    raylet.AuthenticationTokenLoader.instance().reset_cache()


@dataclass
class RayHead:
    """One ``ray start --head --block`` child process, with its own ports and temp dir, and
    token authentication on.

    :meth:`start` generates a random token for this head only and writes it to a 0600 file in
    the head's private temp dir (removed at :meth:`stop`; never in the repository, never in a
    runtime environment). The head, the workers and job drivers it spawns, and every client
    given :attr:`env` (``ray.init``, ``ray job submit``, the job SDK, Tune and Train) find it
    through ``RAY_AUTH_TOKEN_PATH``. HTTP clients outside Ray send :meth:`auth_headers`. The
    head inherits this process's environment at :meth:`start` (so export S3 settings first).
    """

    num_cpus: int = 2
    object_store_bytes: int = 200 * 2**20
    address: str = ""
    dashboard_url: str = ""
    temp_dir: str = ""
    token_path: str = ""
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def env(self) -> dict[str, str]:
        """What a client of this head needs (export it without ``RAY_AUTH_TOKEN``: see
        :meth:`client_environment`)."""
        return {"RAY_ADDRESS": self.address, AUTH_MODE_ENV: "token", AUTH_TOKEN_PATH_ENV: self.token_path,
                "RAY_USAGE_STATS_ENABLED": "0"}

    def auth_headers(self) -> dict[str, str]:
        """The ``Authorization`` header the dashboard and job API expect from this head's clients."""
        return {"Authorization": f"Bearer {Path(self.token_path).read_text().strip()}"}

    @contextlib.contextmanager
    def client_environment(self) -> Iterator[None]:
        """Export :attr:`env` (and drop ``RAY_AUTH_TOKEN``, which would outrank the path) while
        the context is open; this process's Ray, if imported, follows (:func:`refresh_ray_auth`)."""
        try:
            with exported(self.env, unset=(AUTH_TOKEN_ENV,)):
                refresh_ray_auth()
                yield
        finally:
            refresh_ray_auth()

    def _write_token(self) -> None:
        """A fresh random token (256 bits, hex) in a file only this user can read."""
        self.token_path = str(Path(self.temp_dir) / "auth_token")
        fd = os.open(self.token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))

    def start(self, timeout_s: float = 180.0) -> "RayHead":
        self.temp_dir = tempfile.mkdtemp(prefix="r", dir="/tmp")  # 0700; Ray's socket paths are short
        self._write_token()
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
            AUTH_MODE_ENV: "token",
            AUTH_TOKEN_PATH_ENV: self.token_path,
            "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        }
        env.pop("RAY_ADDRESS", None)
        env.pop(AUTH_TOKEN_ENV, None)
        log_path = Path(self.temp_dir) / "ray-start.log"
        with open(log_path, "ab") as log_fh:
            self.proc = subprocess.Popen(cmd, stdout=log_fh, stderr=subprocess.STDOUT,
                                         start_new_session=True, env=env)
        self.address = f"127.0.0.1:{port}"
        self.dashboard_url = f"http://127.0.0.1:{dash}"
        try:
            status = wait_http(f"{self.dashboard_url}/api/version", timeout_s, self.proc, self.auth_headers())
            if status != 200:
                raise RuntimeError(f"the Ray head's dashboard answered {status} to its own token "
                                   f"(expected 200); see {log_path}")
        except RuntimeError:
            self.stop()
            raise
        log.info("Ray head at %s, dashboard %s (token authentication)", self.address, self.dashboard_url)
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
