"""Token authentication on the local Ray head that the tests and the demo use (issue 16).

Every check talks to the session's real head (``ray_head``) over 127.0.0.1: raw HTTP to the
dashboard and job API, Ray's own job SDK in this process, and a ``ray.init`` driver in a
subprocess, with and without the head's token.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The dashboard's own version endpoint, and the job API that `ray job submit` uses.
PATHS = ("/api/version", "/api/jobs/")


def _status(url: str, headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.parametrize("path", PATHS)
def test_dashboard_and_job_api_refuse_clients_without_the_token(ray_head, path: str) -> None:
    url = f"{ray_head.dashboard_url}{path}"
    assert _status(url) == 401  # no token at all
    assert _status(url, {"Authorization": "Bearer not-the-token"}) == 403
    assert _status(url, ray_head.auth_headers()) == 200


def test_token_is_private_to_the_head(ray_head) -> None:
    """A random token per head, in a file only this user can read, outside the repository, and
    reached by clients through its path (the value itself is in no exported variable)."""
    path = Path(ray_head.token_path)
    assert path.parent == Path(ray_head.temp_dir) and not path.is_relative_to(REPO)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    token = path.read_text().strip()
    assert len(token) == 64 and int(token, 16) >= 0  # 256 random bits, hex
    assert os.environ["RAY_AUTH_MODE"] == "token" and os.environ["RAY_AUTH_TOKEN_PATH"] == str(path)
    assert "RAY_AUTH_TOKEN" not in os.environ
    assert all(token not in value for value in os.environ.values())


def test_ray_clients_in_this_process_use_the_token(ray_head) -> None:
    """Ray's job SDK (what ``ray job submit`` and the tests' status checks use) authenticates."""
    from ray.job_submission import JobSubmissionClient

    assert isinstance(JobSubmissionClient(ray_head.dashboard_url).list_jobs(), list)


@pytest.mark.parametrize("token", [None, "not-the-token"], ids=["head-token", "wrong-token"])
def test_driver_needs_the_token_to_join(ray_head, token: str | None) -> None:
    """A ``ray.init`` driver (as every stage is) joins with the head's token and is refused
    by the GCS with another one (``RAY_AUTH_TOKEN`` outranks the token file)."""
    env = {**os.environ, **({"RAY_AUTH_TOKEN": token} if token else {})}
    code = "import ray; ray.init(); print('answer', ray.get(ray.remote(lambda: 6 * 7).remote()))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    if token is None:
        assert proc.returncode == 0 and "answer 42" in proc.stdout, proc.stderr[-3000:]
    else:
        assert proc.returncode != 0
        assert "InvalidAuthToken" in proc.stderr, proc.stderr[-3000:]
