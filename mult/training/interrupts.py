"""Asked to stop: SIGTERM makes the training loop checkpoint at the next step boundary.

A spot-instance notice handler and a Kubernetes pod termination (``preStop``, then SIGTERM)
both end in SIGTERM on the training process. By default that kills a worker mid-step and the
run restarts from its last periodic checkpoint, up to ``train.checkpoint_every`` steps back.
With :func:`install_stop_handler` the first SIGTERM only sets a flag; the loop reads it at the
next step boundary (:func:`stop_requested`), every rank agrees on it in the step's one
all-reduce (:func:`mult.training.step.train_step`), rank 0 writes a checkpoint, and every rank
raises :class:`Preempted` so that the launcher restarts from that checkpoint. A second SIGTERM
goes to the handler that was there before (the process exits as it would have).

Signal handlers can only be installed from a process's main thread. Ray Train runs the loop
in a thread of its worker actor, so :mod:`mult.launch.trainer` installs the handler from the
actor's main thread when the worker group starts.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator

_stop = threading.Event()
_reason: list[str] = []  # what asked, for the log line; written by the handler, read by the loop
_previous: dict[int, Any] = {}


class Preempted(RuntimeError):
    """The run stopped at a step boundary on request, after writing a checkpoint; the launcher
    restarts it from there (Ray Train: one failure against ``train.max_failures``)."""


def _on_signal(signum: int, frame: Any) -> None:
    # no logging here: the interrupted code may hold the logging lock
    if _stop.is_set():  # asked twice: do what the previous handler would have done
        previous = _previous.get(signum, signal.SIG_DFL)
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
        return
    _reason.append(signal.Signals(signum).name)
    _stop.set()


def install_stop_handler(signals: tuple[int, ...] = (signal.SIGTERM,)) -> bool:
    """Turn the first of ``signals`` into a stop request; idempotent. Returns False (and
    changes nothing) when called off the main thread, where Python cannot install handlers."""
    if threading.current_thread() is not threading.main_thread():
        return False
    for signum in signals:
        current = signal.getsignal(signum)
        if current is not _on_signal:
            _previous[signum] = current
            signal.signal(signum, _on_signal)
    return True


def stop_handler_installed(signum: int = signal.SIGTERM) -> bool:
    return signal.getsignal(signum) is _on_signal


def uninstall_stop_handler(signals: tuple[int, ...] = (signal.SIGTERM,)) -> None:
    """Put back the handlers :func:`install_stop_handler` replaced (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in signals:
        if signal.getsignal(signum) is _on_signal and signum in _previous:
            signal.signal(signum, _previous.pop(signum))


@contextlib.contextmanager
def stop_on_signal(signals: tuple[int, ...] = (signal.SIGTERM,)) -> Iterator[None]:
    """The handler for the duration of a loop in a process's main thread (``torchrun``, one
    process); where it was already installed (a Ray Train worker) or cannot be (another
    thread), nothing changes. A handler installed here is removed on exit, so a reused
    process (a Ray task worker) gets its own SIGTERM behaviour back."""
    mine = not stop_handler_installed(signals[0]) and install_stop_handler(signals)
    try:
        yield
    finally:
        if mine:
            uninstall_stop_handler(signals)


def request_stop(reason: str) -> None:
    """Ask the loop to stop at the next step boundary (what the signal handler does)."""
    _reason.append(reason)
    _stop.set()


def stop_requested() -> bool:
    return _stop.is_set()


def stop_reason() -> str:
    return _reason[0] if _reason else ""


def clear_stop() -> None:
    """Forget a request (a new run in the same process: tests, the ablation's runs)."""
    _stop.clear()
    _reason.clear()
