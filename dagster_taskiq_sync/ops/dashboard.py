"""Who serves the operator page: ``dagster-taskiq-sync dashboard``, the Flower of SQS.

One collector thread reads, every ``--refresh`` seconds, what ``queues stats`` and its exporter
read (``stats.gather``: queue attributes, live workers from the registry in DAGSTER_HOME's
instance, kept open) and peeks the dead-letter queues (``dead_letters.peek``, which never takes a
message out). Requests render that snapshot: however many clients ask, SQS and the
database see one round per refresh. The server is the probe port's (``health_server``): bounded
in connections, bytes, threads and time, bound to 127.0.0.1 unless ``--host`` says otherwise.

Pages: ``/`` (HTML, reloads itself), ``/state.json`` (the same snapshot), ``/livez`` and
``/readyz``. Read-only unless started with ``--allow-redrive`` and a token; then ``/redrive``
shows a form (GET changes nothing) and a POST moves a queue's dead letters back with
``admin.redrive``, only when all of these hold:

* the request's Host is a name this server answers to (not a rebound DNS name);
* its Origin (or, without one, its Referer) is this same origin, so another site's page cannot
  submit the form (CSRF);
* its token matches the configured one (compared in constant time); the page never contains it;
* the queue is one the page shows; one redrive runs at a time.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from dagster_taskiq_sync.errors import ConfigError, TaskiqSyncError
from dagster_taskiq_sync.ops.dashboard_guard import Request, load_token, token_matches
from dagster_taskiq_sync.ops.dashboard_page import (
    CSP,
    PageOptions,
    Snapshot,
    render_message,
    render_page,
    render_redrive_form,
)
from dagster_taskiq_sync.ops.dead_letters import peek
from dagster_taskiq_sync.ops.health_server import MAX_REQUEST_BYTES, HealthServer, content_length
from dagster_taskiq_sync.ops.queue_depths import QueueStats
from dagster_taskiq_sync.ops.redrive import RedriveResult, redrive
from dagster_taskiq_sync.ops.stats import RegistryReader, gather
from dagster_taskiq_sync.storage.registry import WorkerRecord
from dagster_taskiq_sync.wire.bridge import Bridge
from dagster_taskiq_sync.wire.broker_client import translate_error
from dagster_taskiq_sync.wire.settings import Settings

log = logging.getLogger("dagster_taskiq_sync.dashboard")

REDRIVE_LIMIT = 1000  # messages one click moves at most (the answer waits for them)
DEFAULT_PORT = 8787
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
_HTML = "text/html; charset=utf-8"
_TEXT = "text/plain; charset=utf-8"
Answer = tuple[int, bytes, str, bool]


@dataclass(frozen=True)
class DashboardOptions:
    """The dashboard's flags, checked once (``from_flags``)."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    refresh: float = 5.0
    dagster_url: str | None = None
    queues: tuple[str, ...] = ()  # empty: as `queues stats` (default, routed and live workers' queues)
    redrive_token: str | None = None  # set only with --allow-redrive

    @property
    def page(self) -> PageOptions:
        return PageOptions(self.refresh, self.dagster_url, self.redrive_token is not None)

    @classmethod
    def from_flags(
        cls,
        *,
        allow_redrive: bool,
        token_file: str | None,
        env: dict[str, str] | None = None,
        dagster_url: str | None = None,
        **flags: Any,
    ) -> DashboardOptions:
        if dagster_url is not None:
            parts = urlsplit(dagster_url)
            if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
                raise ConfigError(
                    f"--dagster-url {dagster_url!r} is not the Dagster UI's address; pass it as http://HOST:PORT "
                    "(with a path prefix if the UI has one), e.g. --dagster-url http://localhost:3000."
                )
        token = load_token(allow_redrive, token_file, os.environ if env is None else env)
        return cls(dagster_url=dagster_url, redrive_token=token, **flags)


class Collector:
    """Collects a :class:`Snapshot` every ``refresh`` seconds on its own thread (see the module docstring)."""

    def __init__(
        self, settings: Settings, options: DashboardOptions, bridge: Bridge, registry: RegistryReader | None = None
    ) -> None:
        self.settings = settings
        self.options = options
        self.bridge = bridge
        self._registry = registry or RegistryReader()  # DAGSTER_HOME's instance, opened once and kept
        self._lock = threading.Lock()
        self._latest = Snapshot(time.time(), settings.sqs.describe_endpoint(), error="collecting the first snapshot")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.rounds = 0

    @property
    def latest(self) -> Snapshot:
        with self._lock:
            return self._latest

    def start(self) -> Collector:
        self.refresh()
        self._thread = threading.Thread(target=self._loop, name="dashboard-collector", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        self._registry.close()

    def alive(self) -> tuple[bool, str]:
        ok = self._thread is not None and self._thread.is_alive()
        return ok, "ok" if ok else "the collector thread is not running"

    def _loop(self) -> None:
        while not self._stop.wait(self.options.refresh):
            self.refresh()

    def refresh(self) -> Snapshot:
        try:
            snapshot = self.collect()
        except Exception as exc:  # noqa: BLE001 - the page shows why this round failed and the next one tries again
            log.warning("dashboard: collecting failed: %s", exc)
            snapshot = Snapshot(time.time(), self.settings.sqs.describe_endpoint(), error=f"collecting failed: {exc}")
        with self._lock:
            self._latest = snapshot
            self.rounds += 1
        return snapshot

    def collect(self) -> Snapshot:
        """One round: what `queues stats` reads (``stats.gather``), then a peek at the dead letters."""
        sqs, taken = self.settings.sqs, time.time()
        try:
            report = gather(self.bridge, self.settings, self.options.queues, registry=self._registry, timeout=60)
            peeked = self.bridge.call(peek, sqs, report.queues, timeout=60)
        except Exception as exc:  # noqa: BLE001 - shown as one sentence on the page, with the workers still listed
            workers, notes = self._registry.read()
            error = str(translate_error(exc, sqs, "reading queue attributes", None))
            return Snapshot(taken, sqs.describe_endpoint(), workers=_not_stopped(workers), notes=notes, error=error)
        return Snapshot(
            taken,
            report.endpoint,
            report.queues,
            _not_stopped(report.workers),
            peeked.letters,
            report.notes + peeked.notes,
        )


def _not_stopped(workers: list[WorkerRecord] | None) -> list[WorkerRecord] | None:
    return None if workers is None else [w for w in workers if w.state != "stopped"]


Redriver = Callable[[str, int], RedriveResult]


class DashboardServer(HealthServer):
    """The page, its JSON and (with a token) the redrive action, on the probe port's bounded server."""

    SCRAPE_PATHS = (b"/", b"/state.json", b"/redrive")
    MAX_BODY_BYTES = 4096  # the redrive form: a queue name, a token and a number
    EXTRA_HEADERS = (
        f"Content-Security-Policy: {CSP}\r\nX-Content-Type-Options: nosniff\r\nX-Frame-Options: DENY\r\n"
        "Referrer-Policy: same-origin\r\n"
    )
    WHAT = "dashboard at %s"
    PORT_HINT = " (another dashboard?)"

    def __init__(self, options: DashboardOptions, collector: Collector, redriver: Redriver | None = None) -> None:
        super().__init__(
            options.port,
            options.host,
            live=collector.alive,
            ready=lambda: (collector.latest.error is None, collector.latest.error or "ok"),
            metrics=_NoMetrics(),
            port_flag="--port",
            host_flag="--host",
        )
        self.options = options
        self.collector = collector
        self.redriver = redriver
        self._redriving = threading.Lock()
        wildcard = options.host in ("", "0.0.0.0", "::")
        # Names a browser may use for this server; None: any (bound to every interface, the
        # token and the same-origin check still guard the POST).
        self.host_names = None if wildcard else LOOPBACK_NAMES | {options.host.strip("[]").lower()}

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving, then stop collecting."""
        super().stop(timeout)
        self.collector.stop()

    def _respond(self, head: bytes | None, body: bytes = b"") -> Answer:
        if head is None:
            return 431, f"request headers over {MAX_REQUEST_BYTES} bytes\n".encode(), _TEXT, True
        request = Request.parse(head, body)
        if request is None:
            return 400, b"not an HTTP request line\n", _TEXT, True
        if not self._known_host(request.host):
            return 421, b"this dashboard does not answer to that Host name\n", _TEXT, True
        if request.method == "POST":
            return self._post(request)
        if request.method not in ("GET", "HEAD"):
            return 405, b"this dashboard answers GET, HEAD and (for /redrive) POST\n", _TEXT, True
        status, answer, content_type = self._get(request)
        return status, answer, content_type, request.method == "GET"

    def _known_host(self, host: str | None) -> bool:
        if self.host_names is None:
            return True
        if not host:
            return False
        name = urlsplit(f"//{host}").hostname or ""
        return name.lower() in self.host_names

    def _get(self, request: Request) -> tuple[int, bytes, str]:
        snapshot = self.collector.latest
        if request.path == "/":
            return 200, render_page(snapshot, self.options.page).encode(), _HTML
        if request.path == "/state.json":
            return 200, json.dumps(snapshot.as_dict()).encode(), "application/json"
        if request.path in ("/livez", "/readyz"):
            status, answer, content_type, _ = super()._respond(request.head)
            return status, answer, content_type
        if request.path == "/redrive" and self.options.redrive_token is not None:
            queue = self._dead_lettered(snapshot.queues, request.query.get("queue", ""))
            if queue is None:
                return (
                    404,
                    render_message(
                        "Nothing to redrive", "No queue on the page by that name has a dead-letter queue.", False
                    ).encode(),
                    _HTML,
                )
            return 200, render_redrive_form(queue).encode(), _HTML
        return 404, b"not found; this dashboard answers /, /state.json, /livez and /readyz\n", _TEXT

    @staticmethod
    def _dead_lettered(queues: list[QueueStats], name: str) -> QueueStats | None:
        return next((q for q in queues if q.queue == name and q.dead_letter_queue and not q.error), None)

    def _post(self, request: Request) -> Answer:
        refused = self._refuse_post(request)
        if refused is not None:
            status, why = refused
            log.warning("dashboard: refused a redrive POST from a client: %s", why)
            return status, render_message("Refused", why, False).encode(), _HTML, True
        form = request.form()
        queue = self._dead_lettered(self.collector.latest.queues, form.get("queue", ""))
        if queue is None:
            return (
                400,
                render_message("Refused", "No queue on the page by that name has a dead-letter queue.", False).encode(),
                _HTML,
                True,
            )
        limit = form.get("max", "").strip()
        if limit and not (limit.isdigit() and int(limit) >= 1):
            return (
                400,
                render_message("Refused", f"max {limit!r} must be a whole number of at least 1.", False).encode(),
                _HTML,
                True,
            )
        if not self._redriving.acquire(blocking=False):
            return (
                409,
                render_message("Busy", "Another redrive is running; try again when it ends.", False).encode(),
                _HTML,
                True,
            )
        try:
            assert self.redriver is not None
            result = self.redriver(queue.queue, min(int(limit or REDRIVE_LIMIT), REDRIVE_LIMIT))
        except TaskiqSyncError as exc:
            return 502, render_message("Redrive failed", str(exc), False).encode(), _HTML, True
        finally:
            self._redriving.release()
        text = (
            f"Moved {result.moved} message(s) from {result.dead_letter_queue} back to {result.queue} "
            f"({result.left} left in {result.dead_letter_queue})."
        )
        log.info("dashboard: %s", text)
        return 200, render_message("Redriven", text, True).encode(), _HTML, True

    def _refuse_post(self, request: Request) -> tuple[int, str] | None:
        """(status, why) when a POST may not change anything; None when it may."""
        if request.path != "/redrive":
            return 405, "This dashboard accepts a POST only at /redrive."
        if self.options.redrive_token is None or self.redriver is None:
            return 403, "Redrive is off: this dashboard was started without --allow-redrive, so it is read-only."
        if not request.same_origin():
            return 403, "Cross-origin request: a redrive must come from this dashboard's own page (Origin or Referer)."
        if content_length(request.head) > self.MAX_BODY_BYTES:
            return 413, f"The form is over {self.MAX_BODY_BYTES} bytes."
        if not token_matches(request.form().get("token", ""), self.options.redrive_token):
            return 403, "Wrong or missing token."
        return None


class _NoMetrics:
    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        return b"", _TEXT


def make_redriver(settings: Settings, bridge: Bridge) -> Redriver:
    """What a permitted POST calls: ``admin.redrive`` of one queue, at most ``limit`` messages."""

    def run(queue: str, limit: int) -> RedriveResult:
        try:
            return bridge.call(redrive, settings.sqs, queue, limit, timeout=600)
        except TaskiqSyncError:
            raise
        except Exception as exc:  # noqa: BLE001 - translated into one sentence for the page
            raise translate_error(exc, settings.sqs, f"redriving queue {queue!r}", queue) from None

    return run


def start(
    settings: Settings, options: DashboardOptions, bridge: Bridge, registry: RegistryReader | None = None
) -> DashboardServer:
    """Bind (a taken port fails at once), collect a first snapshot, then keep collecting; the page
    says "collecting the first snapshot" until then. ``server.stop()`` ends both."""
    collector = Collector(settings, options, bridge, registry)
    redriver = make_redriver(settings, bridge) if options.redrive_token is not None else None
    server = DashboardServer(options, collector, redriver)
    server.start()
    try:
        collector.start()
    except BaseException:
        server.stop()
        raise
    return server
