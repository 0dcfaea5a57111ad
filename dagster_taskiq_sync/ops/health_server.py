"""Who answers probes and scrapes: ``/metrics``, ``/livez`` and ``/readyz`` on one port.

``worker start --metrics-port N [--metrics-host H]`` serves, from a background thread:

* ``/metrics``: Prometheus text format (OpenMetrics when the scraper asks for it);
* ``/livez``: 200 ``ok`` or 503 with the reason. False means "restart me" (a thread died, the
  event-loop bridge stopped answering);
* ``/readyz``: 200 ``ok`` or 503 with the reason. False means "do not count on me for work"
  (draining after SIGTERM, SQS unreachable); never a reason to restart.

The host defaults to 127.0.0.1 so a worker on a laptop or a shared host does not expose its
metrics to the network; in a container the probes and Prometheus come from outside the
container's loopback, so containers pass ``--metrics-host 0.0.0.0``.

Anyone who can reach the port is a client, so the server's cost is bounded whatever clients do.
One thread reads every connection without blocking (a ``selectors`` loop): a client has
``request_timeout`` seconds and :data:`MAX_REQUEST_BYTES` to send its request line and headers, and
at most ``max_connections`` are open at once (a new one closes the connection that has waited
longest). Only a complete request reaches a thread, which runs the check or renders the metrics
and writes the reply with the same timeout: probes (and every error answer) go to
:data:`PROBE_THREADS` threads of their own, scrapes to :data:`ANSWER_THREADS` others, at most
:data:`MAX_SCRAPES` at once (more get 503). A client that asks for ``/metrics`` and never reads
the answer therefore holds a scrape thread for the timeout at most, never a probe's. Idle or
trickling connections cost a socket each, never a thread. HTTP/1.0: one request per connection.

The operator page (``dashboard.py``) is this server with its own answers: subclasses set
:attr:`HealthServer.SCRAPE_PATHS` (what the bounded scrape threads answer), ``MAX_BODY_BYTES`` (a
POST's form is read, within that bound, before a thread sees the request), ``EXTRA_HEADERS`` and
override ``_respond``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Protocol

from dagster_taskiq_sync.errors import ConfigError

log = logging.getLogger("dagster_taskiq_sync.health_server")

Check = Callable[[], "tuple[bool, str]"]
DEFAULT_HOST = "127.0.0.1"
PATHS = ("/metrics", "/livez", "/readyz")
MAX_REQUEST_BYTES = 8192  # request line and headers; a probe or a scrape sends a few hundred
ANSWER_THREADS = 4  # threads rendering /metrics
PROBE_THREADS = 2  # threads answering /livez, /readyz and errors (each answer fits a socket buffer)
MAX_SCRAPES = 16  # /metrics requests being answered or waiting for a thread; more get 503
_TEXT = "text/plain; charset=utf-8"


class Renderer(Protocol):
    def render(self, accept: str | None = None) -> tuple[bytes, str]: ...


@dataclass
class _Pending:
    """A connection still sending its request."""

    sock: socket.socket
    peer: str
    deadline: float
    data: bytearray = field(default_factory=bytearray)


class HealthServer:
    """``/metrics``, ``/livez`` and ``/readyz`` on ``host:port``, served from a daemon thread.

    ``live`` and ``ready`` are called per request and return ``(ok, reason)``; ``reason`` is shown
    with a 503 when ``ok`` is false. A check that raises counts as false, with the exception as the
    reason. ``metrics`` is anything with ``render(accept) -> (body, content_type)`` (a
    :class:`~dagster_taskiq_sync.ops.metrics.WorkerMetrics`). Port 0 picks a free port (see ``.port``).
    """

    SCRAPE_PATHS: tuple[bytes, ...] = (b"/metrics",)  # answered by the scrape threads, MAX_SCRAPES at once
    MAX_BODY_BYTES = 0  # request bodies are not read (probes and scrapes send none)
    EXTRA_HEADERS = ""  # added to every answer ("Name: value\r\n" lines)
    WHAT = "metrics and health probes at %s (/metrics, /livez, /readyz)"
    PORT_HINT = " (another worker on this host needs its own port)"  # after "stop the process that holds it"

    def __init__(
        self,
        port: int,
        host: str = DEFAULT_HOST,
        *,
        live: Check,
        ready: Check,
        metrics: Renderer,
        port_flag: str = "--metrics-port",
        host_flag: str = "--metrics-host",
        request_timeout: float = 5.0,
        max_connections: int = 64,
    ) -> None:
        self.host = host
        self.requested_port = port
        self.live = live
        self.ready = ready
        self.metrics = metrics
        self.request_timeout = request_timeout
        self.max_connections = max_connections
        self._flags = (port_flag, host_flag)
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._answers: ThreadPoolExecutor | None = None
        self._probes: ThreadPoolExecutor | None = None
        self._stopping = threading.Event()
        self._wake_r: socket.socket | None = None  # wakes the loop for stop()
        self._wake_w: socket.socket | None = None
        self._pending: dict[socket.socket, _Pending] = {}
        self._scrapes = 0  # /metrics requests handed to a scrape thread (guarded by _lock)
        self._lock = threading.Lock()

    @property
    def port(self) -> int:
        if self._listener is None:
            return self.requested_port
        return self._listener.getsockname()[1]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @staticmethod
    def check(fn: Check) -> tuple[bool, str]:
        try:
            ok, reason = fn()
        except Exception as exc:  # noqa: BLE001 - the probe answers "not ok" rather than crash
            return False, f"the check itself failed: {type(exc).__name__}: {exc}"
        return bool(ok), str(reason or ("ok" if ok else "not ok"))

    def start(self) -> HealthServer:
        """Bind now (so a bad port or host fails worker start with one sentence), then serve."""
        self._listener = self._bind()
        self._wake_r, self._wake_w = socket.socketpair()
        self._answers = ThreadPoolExecutor(ANSWER_THREADS, thread_name_prefix="health-scrape")
        self._probes = ThreadPoolExecutor(PROBE_THREADS, thread_name_prefix="health-probe")
        self._thread = threading.Thread(target=self._serve, name="health-server", daemon=True)
        self._thread.start()
        log.info(self.WHAT, self.url)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving, close every socket and join the thread."""
        thread = self._thread
        if thread is None:
            return
        self._stopping.set()
        with contextlib.suppress(OSError, AttributeError):
            self._wake_w.send(b"x")  # type: ignore[union-attr]
        thread.join(timeout)
        self._thread = None
        for pool in (self._answers, self._probes):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> HealthServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # --- binding --------------------------------------------------------------------------------

    def _bind(self) -> socket.socket:
        host_flag = self._flags[1]
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart while old sockets linger
            sock.bind((self.host, self.requested_port))
            sock.listen(128)
            sock.setblocking(False)
            return sock
        except socket.gaierror:
            sock.close()
            raise ConfigError(
                f"{host_flag} {self.host!r} is not a host name or address this machine can resolve; use 127.0.0.1, "
                "or 0.0.0.0 to listen on every interface (as containers need)."
            ) from None
        except OSError as exc:
            sock.close()
            raise ConfigError(self._bind_error(exc)) from None

    def _bind_error(self, exc: OSError) -> str:
        port_flag, host_flag = self._flags
        if exc.errno == errno.EADDRINUSE:
            return (
                f"{port_flag} {self.requested_port} is already in use on {self.host}; pick another port or stop "
                f"the process that holds it{self.PORT_HINT}."
            )
        if exc.errno == errno.EACCES:
            return f"{port_flag} {self.requested_port} needs privileges this process lacks; use a port above 1023."
        if exc.errno == errno.EADDRNOTAVAIL:
            return (
                f"{host_flag} {self.host!r} is not an address of this machine; use 127.0.0.1, or 0.0.0.0 to "
                "listen on every interface (as containers need)."
            )
        return f"{port_flag} {self.requested_port} on {self.host} cannot be served: {exc.strerror}."

    # --- the reading loop -----------------------------------------------------------------------

    def _serve(self) -> None:
        assert self._listener is not None and self._wake_r is not None and self._wake_w is not None
        selector = selectors.DefaultSelector()
        selector.register(self._listener, selectors.EVENT_READ)
        selector.register(self._wake_r, selectors.EVENT_READ)
        try:
            while not self._stopping.is_set():
                for key, _ in selector.select(timeout=self._next_timeout()):
                    if key.fileobj is self._listener:
                        self._accept(selector)
                    elif key.fileobj is not self._wake_r:
                        self._read(selector, key.fileobj)  # type: ignore[arg-type]
                self._expire(selector)
        except Exception:
            log.exception("the health server's loop failed; /livez and /metrics no longer answer")
        finally:
            for pending in list(self._pending.values()):
                self._drop(selector, pending)
            selector.close()
            self._listener.close()
            self._wake_r.close()
            self._wake_w.close()

    def _next_timeout(self) -> float | None:
        if not self._pending:
            return None
        return max(0.0, min(p.deadline for p in self._pending.values()) - time.monotonic())

    def _accept(self, selector: selectors.BaseSelector) -> None:
        assert self._listener is not None
        for _ in range(64):  # what the backlog holds now, without starving the reads
            try:
                sock, address = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: the connection waits in the backlog
                log.warning("health server cannot accept a connection: %s", exc.strerror)
                return
            if len(self._pending) >= self.max_connections:  # the one that has waited longest goes
                self._drop(selector, min(self._pending.values(), key=lambda p: p.deadline))
            sock.setblocking(False)
            peer = address[0] if isinstance(address, tuple) else str(address)
            self._pending[sock] = _Pending(sock, peer, time.monotonic() + self.request_timeout)
            selector.register(sock, selectors.EVENT_READ)

    def _read(self, selector: selectors.BaseSelector, sock: socket.socket) -> None:
        pending = self._pending[sock]
        try:
            chunk = sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._drop(selector, pending)
            return
        pending.data += chunk
        end = pending.data.find(b"\r\n\r\n")
        if end < 0 and len(pending.data) <= MAX_REQUEST_BYTES:
            return
        body_bytes = self._body_bytes(bytes(pending.data[:end])) if 0 <= end <= MAX_REQUEST_BYTES else 0
        if len(pending.data) < end + 4 + body_bytes:
            return  # the rest of a body within MAX_BODY_BYTES, under the same deadline
        selector.unregister(sock)
        del self._pending[sock]
        head = bytes(pending.data[:end]) if 0 <= end <= MAX_REQUEST_BYTES else None
        body = bytes(pending.data[end + 4 : end + 4 + body_bytes])
        assert self._answers is not None and self._probes is not None
        first_line = (head or b"").split(b"\r\n", 1)[0].split()
        if len(first_line) == 3 and first_line[1].split(b"?", 1)[0] in self.SCRAPE_PATHS:
            with self._lock:
                busy = self._scrapes >= MAX_SCRAPES
                self._scrapes += not busy
            if not busy:
                self._answers.submit(self._answer, pending, head, body, scrape=True)
                return
            self._probes.submit(self._answer, pending, head, body, busy=True)
            return
        self._probes.submit(self._answer, pending, head, body)

    def _body_bytes(self, head: bytes) -> int:
        """Bytes of body to read after ``head``: its Content-Length when within MAX_BODY_BYTES, else 0
        (``_respond`` refuses a larger one from the header alone)."""
        if not self.MAX_BODY_BYTES:
            return 0
        length = content_length(head)
        return length if 0 < length <= self.MAX_BODY_BYTES else 0

    def _expire(self, selector: selectors.BaseSelector) -> None:
        now = time.monotonic()
        for pending in [p for p in self._pending.values() if p.deadline <= now]:
            self._drop(selector, pending)

    def _drop(self, selector: selectors.BaseSelector, pending: _Pending) -> None:
        self._pending.pop(pending.sock, None)
        with contextlib.suppress(KeyError, ValueError):
            selector.unregister(pending.sock)
        pending.sock.close()

    # --- answering (answer threads) -------------------------------------------------------------

    def _answer(
        self, pending: _Pending, head: bytes | None, body: bytes = b"", scrape: bool = False, busy: bool = False
    ) -> None:
        sock = pending.sock
        try:
            sock.settimeout(self.request_timeout)
            if busy:
                status, answer, content_type, send_body = (
                    503,
                    f"{MAX_SCRAPES} scrapes in progress; retry\n".encode(),
                    _TEXT,
                    True,
                )
            else:
                status, answer, content_type, send_body = self._respond(head, body)
            reason = HTTPStatus(status).phrase
            headers = (
                f"HTTP/1.0 {status} {reason}\r\nServer: dagster-taskiq-sync\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(answer)}\r\nCache-Control: no-store\r\n{self.EXTRA_HEADERS}"
                "Connection: close\r\n\r\n"
            ).encode("latin-1")
            sock.sendall(headers + answer if send_body else headers)
            log.debug("%s %s %d", pending.peer, (head or b"").split(b"\r\n", 1)[0][:200].decode("latin-1"), status)
        except OSError:
            pass  # the client went away or did not read its answer in time
        except Exception:
            log.exception("health server failed to answer %s", pending.peer)
        finally:
            sock.close()
            if scrape:
                with self._lock:
                    self._scrapes -= 1

    def _respond(self, head: bytes | None, body: bytes = b"") -> tuple[int, bytes, str, bool]:
        """(status, body, content type, send the body) for one request head (and its body, if read)."""
        if head is None:
            return 431, f"request headers over {MAX_REQUEST_BYTES} bytes\n".encode(), _TEXT, True
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return 400, b"not an HTTP request line\n", _TEXT, True
        method, target = parts[0], parts[1]
        if method not in ("GET", "HEAD"):
            return 405, b"this server answers GET and HEAD\n", _TEXT, True
        send_body = method == "GET"
        path = target.split("?", 1)[0]
        if path == "/metrics":
            accept = next(
                (line.split(":", 1)[1].strip() for line in lines[1:] if line.lower().startswith("accept:")), None
            )
            try:
                body, content_type = self.metrics.render(accept)
            except Exception as exc:  # noqa: BLE001 - a broken collector must not kill the server
                return 500, f"metrics failed: {type(exc).__name__}: {exc}\n".encode(), _TEXT, send_body
            return 200, body, content_type, send_body
        if path in ("/livez", "/readyz"):
            ok, reason = self.check(self.live if path == "/livez" else self.ready)
            return (200 if ok else 503), f"{'ok' if ok else reason}\n".encode(), _TEXT, send_body
        return 404, f"not found; this server answers {', '.join(PATHS)}\n".encode(), _TEXT, send_body


def content_length(head: bytes) -> int:
    """The Content-Length a request head declares: 0 when it has none, -1 when it is not a number."""
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            text = value.strip()
            return int(text) if text.isdigit() and len(text) < 12 else -1
    return 0
