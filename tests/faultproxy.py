"""A fault-injecting HTTP proxy for tests: clients (boto3, pyarrow) talk to it as to S3, it
forwards to the moto server, and a scripted plan makes chosen requests fail the way S3 and
networks fail.

Each :class:`Fault` matches requests by method, a path regex and whether they carry a
``Range`` header, lets ``after`` matches through, then applies its action to the next ``times``
matches (``None``: every one):

* ``"slowdown"``: 503 with S3's ``SlowDown`` XML error body;
* ``"internal"``: 500 ``InternalError``;
* ``"expired"``: 403 ``ExpiredToken``;
* ``"reset"``: forward, send the status, headers and ``body_bytes`` of the body, then reset
  the TCP connection (RST, not FIN);
* ``"stall"``: wait ``stall_s`` (longer than the client's read timeout) -- before the answer,
  or after ``body_bytes`` of it when ``body_bytes`` is set -- then drop the connection;
* ``"hold"``: keep the request open, unanswered, until :meth:`FaultProxy.release`; the
  :attr:`FaultProxy.held` event fires when it starts and :attr:`FaultProxy.held_client` is the
  client's (host, port), so a test can find the process that sent it.

Every wait is bounded (and ends when the proxy stops). All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import http.client
import http.server
import re
import socket
import struct
import threading
import uuid
from dataclasses import dataclass, field
from typing import Iterator

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
              "transfer-encoding", "upgrade", "expect", "content-length"}
ERRORS = {
    "slowdown": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
    "internal": (500, "Internal Server Error", "InternalError",
                 "We encountered an internal error. Please try again."),
    "expired": (403, "Forbidden", "ExpiredToken", "The provided token has expired."),
}
ACTIONS = (*ERRORS, "reset", "stall", "hold")
MAX_WAIT_S = 300.0  # no hold or stall outlives this, whatever a test forgets


@dataclass
class Fault:
    """One scripted fault (see the module docstring)."""

    action: str
    method: str | None = None
    path: str = ""
    ranged: bool | None = None
    after: int = 0
    times: int | None = 1
    body_bytes: int | None = None
    stall_s: float = 0.0
    seen: int = 0  # matching requests so far
    fired: int = 0  # of which got the fault

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"unknown fault action {self.action!r}; valid: {', '.join(ACTIONS)}")

    def matches(self, method: str, path: str, ranged: bool) -> bool:
        return ((self.method is None or self.method == method) and re.search(self.path, path) is not None
                and (self.ranged is None or self.ranged == ranged))

    def take(self) -> bool:
        """Count a matching request; True when it gets the fault."""
        self.seen += 1
        if self.seen <= self.after or (self.times is not None and self.fired >= self.times):
            return False
        self.fired += 1
        return True


@dataclass
class Record:
    method: str
    path: str
    ranged: bool
    action: str | None


@dataclass
class _State:
    upstream: tuple[str, int]
    faults: list[Fault] = field(default_factory=list)
    records: list[Record] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stopping: threading.Event = field(default_factory=threading.Event)
    held: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)
    held_client: tuple[str, int] | None = None


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
        return

    def do_GET(self) -> None:
        self._serve()

    do_PUT = do_POST = do_HEAD = do_DELETE = do_GET

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline().strip():  # trailers, up to the blank line
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _serve(self) -> None:
        state = self.server.state
        body = self._body()
        ranged = "Range" in self.headers
        fault = None
        with state.lock:
            for candidate in state.faults:
                if candidate.matches(self.command, self.path, ranged) and candidate.take():
                    fault = candidate
                    break
            state.records.append(Record(self.command, self.path, ranged, fault.action if fault else None))
        if fault is None:
            self._forward(body)
        elif fault.action in ERRORS:
            self._error(*ERRORS[fault.action])
        elif fault.action == "hold":
            with state.lock:
                state.held_client = self.client_address
            state.held.set()
            state.released.wait(MAX_WAIT_S)
            self.close_connection = True
        elif fault.action == "stall" and fault.body_bytes is None:
            state.stopping.wait(min(fault.stall_s, MAX_WAIT_S))
            self.close_connection = True
        else:  # reset, or stall in the middle of the body
            self._forward(body, cut_at=fault.body_bytes or 0, stall_s=fault.stall_s if fault.action == "stall" else None)

    def _error(self, status: int, reason: str, code: str, message: str) -> None:
        payload = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}'
                   f"</Message><RequestId>{uuid.uuid4().hex[:16].upper()}</RequestId>"
                   f"<HostId>faultproxy</HostId></Error>").encode()
        self.send_response(status, reason)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _forward(self, body: bytes, cut_at: int | None = None, stall_s: float | None = None) -> None:
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        if body or self.command in ("PUT", "POST"):
            headers["Content-Length"] = str(len(body))
        upstream = http.client.HTTPConnection(*self.server.state.upstream, timeout=60)
        try:
            upstream.request(self.command, self.path, body=body or None, headers=headers)
            response = upstream.getresponse()
            payload = response.read()
            self.send_response(response.status, response.reason)
            for key, value in response.getheaders():
                if key.lower() not in HOP_BY_HOP:
                    self.send_header(key, value)
            length = response.getheader("Content-Length") if self.command == "HEAD" else str(len(payload))
            self.send_header("Content-Length", length or "0")
            self.end_headers()
        finally:
            upstream.close()
        if self.command == "HEAD":
            return
        if cut_at is None:
            self.wfile.write(payload)
            return
        self.wfile.write(payload[:cut_at])
        self.wfile.flush()
        if stall_s is not None:
            self.server.state.stopping.wait(min(stall_s, MAX_WAIT_S))
            self.close_connection = True
            return
        self._reset()

    def _reset(self) -> None:
        """Close with SO_LINGER 0: the client sees a reset, not an orderly end of stream."""
        self.close_connection = True
        self.wfile.flush()
        self.wfile.close()
        self.rfile.close()
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    state: _State

    def handle_error(self, request: object, client_address: object) -> None:
        # Clients that time out or get reset leave broken sockets behind: expected here.
        return


class FaultProxy:
    """The proxy (a thread in the test process); use as a context manager."""

    def __init__(self, upstream: str):
        host_port = upstream.split("://", 1)[-1].rstrip("/")
        host, _, port = host_port.partition(":")
        self.state = _State(upstream=(host, int(port)))
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.state = self.state
        self._thread = threading.Thread(target=self._server.serve_forever, name="faultproxy", daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> "FaultProxy":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.state.stopping.set()
        self.state.released.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the plan -----------------------------------------------------------------------------
    def add(self, *faults: Fault) -> list[Fault]:
        with self.state.lock:
            self.state.faults.extend(faults)
        return list(faults)

    def clear(self) -> None:
        with self.state.lock:
            self.state.faults.clear()

    def records(self, path: str = "") -> Iterator[Record]:
        with self.state.lock:
            records = list(self.state.records)
        return (r for r in records if re.search(path, r.path))

    @property
    def held(self) -> threading.Event:
        return self.state.held

    @property
    def held_client(self) -> tuple[str, int] | None:
        return self.state.held_client

    def release(self) -> None:
        self.state.released.set()


def pid_of_client(port: int) -> int:
    """The PID of the local process whose TCP socket has local port ``port`` (Linux ``/proc``):
    how a test finds the process behind a held request without guessing by name."""
    import os

    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    wanted = {f"socket:[{inode}]" for inode in inodes if inode != "0"}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:  # gone, or not ours to read
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in wanted:
                    return int(pid)
            except OSError:
                continue
    raise LookupError(f"no process owns a TCP socket on local port {port}")
