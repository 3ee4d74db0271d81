"""A node about to go away: stop the training workers on it at a step boundary, then Ray.

    python -m mult.launch.preemption stop [--wait 240]      # a pod's preStop hook
    python -m mult.launch.preemption watch-spot             # on an EC2 spot node: wait for the notice

``stop`` marks this node as draining in Ray (``ray drain-node``, reason preemption: Ray schedules
nothing new on it, so the restarted workers land elsewhere), sends SIGTERM to the Ray Train
workers on this node (each checkpoints at the next step boundary and stops, see
:mod:`mult.training.interrupts`), waits for them to exit (at most ``--wait`` seconds) and runs
``ray stop``. ``watch-spot`` polls the instance metadata service (IMDSv2) for EC2's two-minute
spot interruption notice and then does the same.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Callable, Sequence

log = logging.getLogger(__name__)

TRAIN_WORKER_TITLE = "ray::RayTrainWorker"  # Ray Train's worker actors' process title
IMDS = "http://169.254.169.254"


def train_worker_pids(title: str = TRAIN_WORKER_TITLE) -> list[int]:
    """This node's processes whose command line starts with ``title`` (Ray's core worker sets
    an actor's process title there). Linux ``/proc``, as on every Ray node image."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmdline = fh.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone, or not ours to read
            continue
        if cmdline.startswith(title):
            pids.append(int(entry))
    return sorted(pids)


def stop_training(*, wait_s: float, title: str = TRAIN_WORKER_TITLE, drain: bool = True,
                  stop_ray: bool = True) -> int:
    """Drain the node, SIGTERM its training workers, wait for them (bounded), stop Ray.
    Returns how many workers were still running when the wait ended."""
    if drain:
        _run(["ray", "drain-node", "--reason", "DRAIN_NODE_REASON_PREEMPTION",
              "--reason-message", "node terminating: training workers checkpoint and stop",
              "--deadline-remaining-seconds", str(max(1, int(wait_s)))])
    pids = train_worker_pids(title)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    log.info("sent SIGTERM to %d training worker(s): %s", len(pids), pids)
    left = _wait_gone(pids, wait_s)
    if left:
        log.warning("%d training worker(s) still running after %.0f s: %s", len(left), wait_s, left)
    if stop_ray:
        _run(["ray", "stop"])
    return len(left)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != b"Z"  # a zombie has exited; its parent has not collected it yet


def _wait_gone(pids: Sequence[int], wait_s: float) -> list[int]:
    pause = threading.Event()
    deadline = time.monotonic() + wait_s
    alive = [p for p in pids if _alive(p)]
    while alive and time.monotonic() < deadline:
        pause.wait(0.2)
        alive = [p for p in alive if _alive(p)]
    return alive


def _run(cmd: list[str]) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
        log.warning("%s exited %d: %s", " ".join(cmd[:2]), result.returncode, result.stderr.strip()[-500:])


def spot_notice(base: str = IMDS, timeout_s: float = 2.0) -> dict | None:
    """EC2's spot interruption notice (``{"action": "terminate", "time": ...}``) or None."""
    try:
        token_request = urllib.request.Request(f"{base}/latest/api/token", method="PUT",
                                               headers={"X-aws-ec2-metadata-token-ttl-seconds": "300"})
        with urllib.request.urlopen(token_request, timeout=timeout_s) as response:
            token = response.read().decode()
        request = urllib.request.Request(f"{base}/latest/meta-data/spot/instance-action",
                                         headers={"X-aws-ec2-metadata-token": token})
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 404:  # no notice (or not a spot instance)
            return None
        log.warning("instance metadata answered %d", exc.code)
        return None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        log.warning("instance metadata not reachable: %s", exc)
        return None


def watch_spot(on_notice: Callable[[dict], None], *, base: str = IMDS, interval_s: float = 5.0,
               max_polls: int | None = None, stop: threading.Event | None = None) -> bool:
    """Poll for the notice every ``interval_s``; call ``on_notice`` once and return True when it
    comes (False after ``max_polls`` polls or when ``stop`` is set)."""
    stop = stop or threading.Event()
    polls = 0
    while not stop.is_set() and (max_polls is None or polls < max_polls):
        notice = spot_notice(base)
        polls += 1
        if notice is not None:
            log.warning("spot interruption notice: %s", notice)
            on_notice(notice)
            return True
        stop.wait(interval_s)
    return False


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    stop = sub.add_parser("stop", help="drain this node, checkpoint and stop its training workers, stop Ray")
    stop.add_argument("--wait", type=float, default=240.0, help="seconds to wait for the workers (default 240)")
    watch = sub.add_parser("watch-spot", help="wait for EC2's spot interruption notice, then stop")
    watch.add_argument("--wait", type=float, default=100.0, help="seconds to wait for the workers (the notice "
                       "comes two minutes ahead; default 100)")
    watch.add_argument("--interval", type=float, default=5.0)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = get_args_parser().parse_args(argv)
    if args.command == "stop":
        return 1 if stop_training(wait_s=args.wait) else 0
    watch_spot(lambda notice: stop_training(wait_s=args.wait), interval_s=args.interval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
