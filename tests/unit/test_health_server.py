"""The probe/metrics port under clients that do not behave: idle and trickling connections, floods,
garbage. Anyone who can reach the port is a client, and the worker's liveness depends on it."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request

import pytest

from dagster_taskiq_sync.ops.health_server import (
    ANSWER_THREADS,
    MAX_REQUEST_BYTES,
    MAX_SCRAPES,
    PROBE_THREADS,
    HealthServer,
)


class Metrics:
    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        return b"# metrics\n", "text/plain; version=0.0.4"


@pytest.fixture
def server():
    with HealthServer(
        0,
        live=lambda: (True, "ok"),
        ready=lambda: (True, "ok"),
        metrics=Metrics(),
        request_timeout=1.0,
        max_connections=32,
    ) as srv:
        yield srv


def raw(server: HealthServer, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def livez(server: HealthServer) -> int:
    with urllib.request.urlopen(server.url + "/livez", timeout=5) as response:
        return response.status


def test_idle_and_trickling_connections_cost_no_thread_and_the_probe_still_answers(server):
    threads_before = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(300)]
    trickling = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(20)]
    try:
        for sock in trickling:
            sock.sendall(b"GET /li")  # and never the rest
        # the probe is answered while 320 connections hang (32 may be open; the longest waiting go)
        assert livez(server) == 200
        assert threading.active_count() <= threads_before + ANSWER_THREADS + PROBE_THREADS
        # and each of them is closed by the server within its request timeout (1 s here)
        time.sleep(1.5)
        for sock in idle[-20:] + trickling:
            sock.settimeout(5)
            try:
                assert sock.recv(1) == b""
            except ConnectionResetError:
                pass
    finally:
        for sock in idle + trickling:
            sock.close()
    assert livez(server) == 200


@pytest.mark.parametrize(
    ("request_bytes", "status", "says"),
    [
        (b"BLAH\r\n\r\n", b"400", b"not an HTTP request line"),
        (b"\x00\xff\x16\x03\x01garbage\r\n\r\n", b"400", b"not an HTTP request line"),
        (b"POST /livez HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello", b"405", b"GET and HEAD"),
        (b"GET /" + b"a" * (MAX_REQUEST_BYTES + 10), b"431", b"request headers over"),
        (b"GET /../../etc/passwd HTTP/1.0\r\n\r\n", b"404", b"/metrics, /livez, /readyz"),
    ],
    ids=["no request line", "binary", "POST", "oversized", "traversal"],
)
def test_garbage_gets_a_status_and_a_sentence_and_the_server_keeps_serving(server, request_bytes, status, says):
    answer = raw(server, request_bytes)
    assert answer.startswith(b"HTTP/1.0 " + status) and says in answer
    assert livez(server) == 200


def test_scrapers_that_never_read_do_not_delay_the_probe_and_extra_scrapes_get_503():
    class Big:
        def render(self, accept=None):
            return b"x" * 20_000_000, "text/plain"

    with HealthServer(
        0, live=lambda: (True, "ok"), ready=lambda: (True, "ok"), metrics=Big(), request_timeout=1.0
    ) as srv:
        stuck = []
        for _ in range(MAX_SCRAPES + 4):  # every scrape thread blocked on a client that never reads
            sock = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            stuck.append(sock)
        try:
            # the probe has threads of its own: answered at once, not after the scrapes' timeouts
            assert livez(srv) == 200
            busy = raw(srv, b"GET /metrics HTTP/1.0\r\n\r\n")
            assert busy.startswith(b"HTTP/1.0 503") and b"scrapes in progress" in busy
        finally:
            for sock in stuck:
                sock.close()


def test_stop_closes_open_connections_and_a_second_stop_is_harmless():
    srv = HealthServer(0, live=lambda: (True, "ok"), ready=lambda: (True, "ok"), metrics=Metrics()).start()
    hanging = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    assert livez(srv) == 200
    srv.stop()
    try:
        assert hanging.recv(1) == b""
    except ConnectionResetError:
        pass
    hanging.close()
    srv.stop()


def test_the_readme_states_the_limits_the_server_has():
    import inspect
    from pathlib import Path

    readme = " ".join((Path(__file__).resolve().parents[2] / "README.md").read_text().split())
    defaults = inspect.signature(HealthServer.__init__).parameters
    timeout, cap = defaults["request_timeout"].default, defaults["max_connections"].default
    assert f"a client has {timeout:g} s and {MAX_REQUEST_BYTES // 1024} KiB to send its request" in readme
    assert f"at most {cap} connections are open" in readme
    assert f"{PROBE_THREADS} probe threads" in readme and f"{ANSWER_THREADS} scrape threads" in readme
    assert f"at most {MAX_SCRAPES} scrapes at once" in readme
