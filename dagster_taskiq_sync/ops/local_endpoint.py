"""A local SQS/S3 endpoint on 127.0.0.1 (moto's server mode), for the demo, tests and laptops.

Runs ``moto.server`` as a child process bound to loopback. On Linux the child gets SIGKILL when
its parent dies, so an endpoint never outlives the demo or test session that started it.
Needs the ``[local]`` extra (``pip install dagster-taskiq-sync[local]``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping

from dagster_taskiq_sync.errors import ConfigError


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class LocalEndpoint:
    """``with LocalEndpoint() as ep: ep.url`` -> ``http://127.0.0.1:PORT`` serving SQS and S3."""

    def __init__(
        self,
        port: int | None = None,
        log_path: str | None = None,
        env: Mapping[str, str] | None = None,
        server_module: str = "moto.server",
    ) -> None:
        """``env`` is added to the server's environment (e.g. ``INITIAL_NO_AUTH_ACTION_COUNT`` to
        enforce IAM); ``server_module`` runs instead of ``moto.server`` (same arguments)."""
        self.port = port or free_port()
        self.log_path = log_path
        self.env = dict(env or {})
        self.server_module = server_module
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def broker_url(self) -> str:
        """The Celery-style broker URL for this endpoint."""
        return f"sqs://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> LocalEndpoint:
        try:
            import moto.server  # noqa: F401 - only to say it is not installed
        except ImportError:
            raise ConfigError(
                "the local SQS endpoint needs moto's server; install it with "
                "`pip install 'dagster-taskiq-sync[local]'`."
            ) from None
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self._proc = subprocess.Popen(
            [sys.executable, "-m", self.server_module, "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=out,
            stderr=out,
            env={**os.environ, **self.env},
            preexec_fn=_die_with_parent,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise ConfigError(
                    f"the local SQS endpoint exited at start (port {self.port} in use?); pick another port."
                )
            try:
                urllib.request.urlopen(self.url + "/moto-api/", timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise ConfigError(f"the local SQS endpoint on port {self.port} did not start within {timeout:g} s.")

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
        self._proc = None

    def reset(self) -> None:
        """Forget every queue, message and bucket (moto's reset API)."""
        req = urllib.request.Request(self.url + "/moto-api/reset", method="POST")
        urllib.request.urlopen(req, timeout=5).close()

    def __enter__(self) -> LocalEndpoint:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def aws_env(endpoint: LocalEndpoint) -> dict[str, str]:
    """Environment for processes that talk to the local endpoint with dummy credentials."""
    env = dict(os.environ)
    env.setdefault("AWS_ACCESS_KEY_ID", "local")
    env.setdefault("AWS_SECRET_ACCESS_KEY", "local")
    env.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    return env
