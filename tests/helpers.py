"""Test utilities shared by the suite: real worker processes and queue inspection.

Workers are started exactly as a user starts them (`dagster-taskiq-sync worker start ...`),
in their own processes, against the session's local SQS endpoint.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml

from benchmarks.local_sqs import PausableProxy, queue_counts, sqs_client  # noqa: F401 - shared with the soak

BIN = Path(sys.executable).parent
CLI = str(BIN / "dagster-taskiq-sync")


def run_cli(*args: object, env: dict | None = None) -> subprocess.CompletedProcess:
    """`dagster-taskiq-sync ARGS` run in this process through click's runner: the same command
    against the same endpoint and instance, without an interpreter start (~2 s of CPU each, most of
    the suite's time once summed). Answers as ``subprocess.run(capture_output=True, text=True)``
    would: exit code, stdout, stderr. ``env`` is the whole environment, as for subprocess.run. As
    from the console script, log records nobody handles (WARNING and up) and an exception click
    does not handle (as its traceback) end up in stderr. Commands that run until a signal (`worker
    start`, `--serve`, `--watch`) need a real process; tests/e2e/test_bad_input.py and a few others
    smoke-test the console script itself."""
    from click.testing import CliRunner

    from dagster_taskiq_sync import cli

    argv = [str(a) for a in args]
    changes: dict[str, str | None] = {}
    if env is not None:
        changes = {k: v for k, v in env.items() if os.environ.get(k) != v}
        changes.update({k: None for k in os.environ if k not in env})
    root = logging.getLogger()
    root.addHandler(logging.lastResort)  # type: ignore[arg-type]  # writes to the runner's stderr
    try:
        result = CliRunner().invoke(cli.main, argv, env=changes)
    finally:
        root.removeHandler(logging.lastResort)  # type: ignore[arg-type]
    stderr = result.stderr
    if result.exc_info is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(*result.exc_info))
    return subprocess.CompletedProcess([CLI, *argv], result.exit_code, result.stdout, stderr)


class WorkerProcess:
    """One `dagster-taskiq-sync worker start` process and its log."""

    def __init__(
        self,
        config: Path,
        name: str,
        log_dir: Path,
        args: Sequence[str] = (),
        env: dict | None = None,
        cwd: Path | None = None,
        preexec_fn=None,
    ):
        self.name = name
        self.log_path = log_dir / f"worker-{name}.log"
        self.command = [CLI, "worker", "start", "-y", str(config), "-n", name, *args]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            self.command,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env or os.environ.copy(),
            cwd=cwd,
            preexec_fn=preexec_fn,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def full_name(self) -> str:
        return f"{self.name}@{os.uname().nodename}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 120.0) -> WorkerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if " ready: " in self.log():
                return self
            if self.proc.poll() is not None:
                raise AssertionError(f"worker {self.name} exited at start:\n{self.log()}")
            time.sleep(0.05)
        raise AssertionError(f"worker {self.name} not ready after {timeout} s:\n{self.log()}")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait; returns the exit code (kills after ``timeout``)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError(f"worker {self.name} did not stop within {timeout} s:\n{self.log()}")
        finally:
            self._log.close()


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class BackgroundRun:
    """execute_job in a thread, so a test can inject faults while the run is in flight."""

    def __init__(self, job_fn, instance, run_config: dict, tags: dict[str, str] | None = None):
        from dagster import execute_job, reconstructable

        self.instance = instance
        self.result = None
        self.error: BaseException | None = None
        # Runs that exist before this one: run_id() must not answer with an earlier test's run.
        self._before = {r.run_id for r in instance.get_runs()}

        def target():
            try:
                self.result = execute_job(
                    reconstructable(job_fn), instance=instance, run_config=run_config, raise_on_error=False, tags=tags
                )
            except BaseException as exc:
                self.error = exc

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    def wait(self, timeout: float):
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise AssertionError(f"the run did not finish within {timeout} s")
        if self.error is not None:
            raise self.error
        return self.result

    def run_id(self) -> str:
        """The id of the run this started (not the instance's latest run, which may be another test's
        until this one is created)."""

        def started() -> str | None:
            new = [r.run_id for r in self.instance.get_runs(limit=5) if r.run_id not in self._before]
            return new[0] if new else None

        return wait_for(started, what="the background run to be created")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped) counts as dead.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except OSError:
        return False


def marker_lines(marker_dir: Path, name: str) -> list[str]:
    path = marker_dir / f"{name}.log"
    return path.read_text().splitlines() if path.exists() else []


class Recorder:
    """A local HTTP(S) server standing in for the ECS agent or the Kubernetes API server: it records
    every call and answers with ``self.answer`` (status, JSON body)."""

    def __init__(self, tls: tuple[str, str] | None = None) -> None:
        self.calls: list[dict] = []
        self.answer: tuple[int, dict] = (200, {})
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def _record(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                recorder.calls.append(
                    {
                        "method": self.command,
                        "path": self.path,
                        "headers": dict(self.headers),
                        "body": json.loads(raw) if raw else None,
                    }
                )
                status, body = recorder.answer
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_PUT = do_PATCH = do_GET = _record

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        scheme = "http"
        if tls:
            import ssl

            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}"
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def bodies(self) -> list:
        return [call["body"] for call in self.calls]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)


def make_config(
    endpoint,
    tmp_path,
    default_queue: str,
    *queues: str,
    transport: dict | None = None,
    max_receive_count: int = 5,
    **native,
) -> tuple[dict, object]:
    config = {
        "broker": endpoint.broker_url,
        **native,
        "config_source": {
            "task_default_queue": default_queue,
            "broker_transport_options": {"wait_time_seconds": 1, **(transport or {})},
        },
    }
    path = tmp_path / f"{default_queue}.yaml"
    path.write_text(yaml.safe_dump({"execution": {"config": config}}))
    extra = [arg for q in queues for arg in ("-q", q)]
    out = run_cli("queues", "create", "-y", path, *extra, "--max-receive-count", max_receive_count)
    assert out.returncode == 0, out.stderr
    return config, path


class Exporter:
    """One `queues stats --serve` process; its output goes to a file (a pipe nobody reads could fill up)."""

    def __init__(self, config: Path, port: int, *args: str, env: dict | None = None) -> None:
        self.log_path = config.parent / f"exporter-{port}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [CLI, "queues", "stats", "-y", str(config), "--serve", str(port), *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env or os.environ.copy(),
            )
        wait_for(self._serving, timeout=60, what="the exporter to serve")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _serving(self) -> bool:
        assert self.proc.poll() is None, self.log()
        return "queue metrics at http://127.0.0.1:" in self.log()

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(20)


def http_get(url: str, timeout: float = 10) -> tuple[int, str]:
    """(status, body) of a GET on a loopback server, ignoring any proxy settings."""
    import urllib.error
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def metric_samples(text: str) -> dict[tuple[str, tuple], float]:
    """Prometheus text format as {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
