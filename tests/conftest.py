"""Session fixtures shared by every test file.

* ``s3_server``: a real S3-compatible HTTP server (moto's standalone ``moto_server``, a
  subprocess on 127.0.0.1), with ``AWS_ENDPOINT_URL`` and fake credentials exported for the
  session. ``MotoServer`` can also be started privately by a test that restarts it.
* ``ray_head``: ONE Ray head for the whole session (``ray start --head --block`` as a child
  process, so teardown stops exactly that head by its PID; ``ray stop`` would kill every Ray
  on the host), with token authentication on (a random token per head, in a 0600 file in its
  temp dir). ``RAY_ADDRESS``, ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH`` are exported so
  clients connect to it; raw HTTP clients send ``ray_head.auth_headers()``.
* ``synth_tree``: a factory, ``synth_tree(format, scenes=2, views=2, size=32, seed=0)``, that
  runs the project's generator (``python -m pipelines.synth``) once per argument set per
  session and returns the dataset root.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator

import pytest

from mult.launch.local import MotoServer, RayHead

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """A moto S3 server for the session, with ``AWS_ENDPOINT_URL`` and fake keys exported."""
    server = MotoServer(log_dir=tmp_path_factory.mktemp("moto")).start()
    try:
        with server.environment():
            yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def ray_head(s3_server: MotoServer) -> Iterator[RayHead]:
    """One ``ray start --head`` for the session, stopped by PID at the end.

    It depends on ``s3_server`` so that the head (and the workers it spawns) inherit the S3
    endpoint and fake credentials. Head and clients use the head's token
    (:meth:`RayHead.client_environment`).
    """
    head = RayHead(num_cpus=2).start()
    try:
        with head.client_environment():
            yield head
    finally:
        head.stop()


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
