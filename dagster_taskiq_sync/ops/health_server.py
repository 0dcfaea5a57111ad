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

The server is stdlib ``ThreadingHTTPServer`` (daemon request threads): prometheus_client's own
server cannot add routes. A slow check holds only its own request thread.
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Protocol

from dagster_taskiq_sync.errors import ConfigError

log = logging.getLogger("dagster_taskiq_sync.health_server")

Check = Callable[[], "tuple[bool, str]"]
DEFAULT_HOST = "127.0.0.1"
PATHS = ("/metrics", "/livez", "/readyz")


class Renderer(Protocol):
    def render(self, accept: str | None = None) -> tuple[bytes, str]: ...


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a stuck request thread must not keep the worker process alive

    def __init__(self, address, handler, owner: HealthServer) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.owner = owner
        super().__init__(address, handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    # HTTP/1.0 (http.server's default): one request per connection, so no idle keep-alive
    # thread outlives a scrape.
    server_version = "dagster-taskiq-sync"

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def _answer(self, send_body: bool) -> None:
        owner = self.server.owner
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            try:
                body, content_type = owner.metrics.render(self.headers.get("Accept"))
                status = 200
            except Exception as exc:  # noqa: BLE001 - a broken collector must not kill the server
                status, body, content_type = 500, f"metrics failed: {type(exc).__name__}: {exc}\n".encode(), _TEXT
        elif path in ("/livez", "/readyz"):
            ok, reason = owner.check(owner.live if path == "/livez" else owner.ready)
            status, body, content_type = (200 if ok else 503), f"{'ok' if ok else reason}\n".encode(), _TEXT
        else:
            status, body, content_type = 404, f"not found; this server answers {', '.join(PATHS)}\n".encode(), _TEXT
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:
        # Probes arrive every few seconds; they are not worker news.
        log.debug("%s %s", self.address_string(), format % args)


_TEXT = "text/plain; charset=utf-8"


class HealthServer:
    """``/metrics``, ``/livez`` and ``/readyz`` on ``host:port``, served from a daemon thread.

    ``live`` and ``ready`` are called per request and return ``(ok, reason)``; ``reason`` is shown
    with a 503 when ``ok`` is false. A check that raises counts as false, with the exception as the
    reason. ``metrics`` is anything with ``render(accept) -> (body, content_type)`` (a
    :class:`~dagster_taskiq_sync.ops.metrics.WorkerMetrics`). Port 0 picks a free port (see ``.port``).
    """

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
    ) -> None:
        self.host = host
        self.requested_port = port
        self.live = live
        self.ready = ready
        self.metrics = metrics
        self._flags = (port_flag, host_flag)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            return self.requested_port
        return self._server.server_address[1]

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
        port_flag, host_flag = self._flags
        try:
            self._server = _Server((self.host, self.requested_port), _Handler, self)
        except socket.gaierror:
            raise ConfigError(
                f"{host_flag} {self.host!r} is not a host name or address this machine can resolve; use 127.0.0.1, "
                "or 0.0.0.0 to listen on every interface (as containers need)."
            ) from None
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(
                    f"{port_flag} {self.requested_port} is already in use on {self.host}; pick another port or stop "
                    "the process that holds it (another worker on this host needs its own port)."
                ) from None
            if exc.errno == errno.EACCES:
                raise ConfigError(
                    f"{port_flag} {self.requested_port} needs privileges this process lacks; use a port above 1023."
                ) from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise ConfigError(
                    f"{host_flag} {self.host!r} is not an address of this machine; use 127.0.0.1, or 0.0.0.0 to "
                    "listen on every interface (as containers need)."
                ) from None
            raise ConfigError(
                f"{port_flag} {self.requested_port} on {self.host} cannot be served: {exc.strerror}."
            ) from None
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.25}, name="health-server", daemon=True
        )
        self._thread.start()
        log.info("metrics and health probes at %s (/metrics, /livez, /readyz)", self.url)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving, close the socket and join the thread."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.shutdown()  # returns once serve_forever has left its loop
        server.server_close()
        if thread is not None:
            thread.join(timeout)
        self._thread = None

    def __enter__(self) -> HealthServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
