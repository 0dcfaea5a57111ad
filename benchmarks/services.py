"""The servers and workers a benchmark needs, started on 127.0.0.1 and stopped by themselves.

Every process here gets SIGKILL when the benchmark dies (PR_SET_PDEATHSIG, set after any user
switch), and :class:`Services` stops them in reverse order on a normal exit.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from dagster_taskiq_sync.ops.local_endpoint import free_port

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
POSTGRES_BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)


class ServiceError(RuntimeError):
    """A server or worker the benchmark needs could not start; the message says what to install."""


def _die_with_parent() -> None:
    os.setsid()  # its own process group, so stopping it stops what it starts (celery's pool)
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def wait_until(check: Callable[[], bool], proc: subprocess.Popen, what: str, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if proc.poll() is not None:
            raise ServiceError(f"{what} exited at start (code {proc.returncode}); its log:\n{_tail(log)}")
        time.sleep(0.05)
    raise ServiceError(f"{what} not ready after {timeout:g} s; its log:\n{_tail(log)}")


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class Services:
    """Starts processes and stops them all, last started first."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._procs: list[tuple[str, subprocess.Popen]] = []

    def spawn(
        self,
        name: str,
        command: list[str],
        env: dict[str, str] | None = None,
        user: str | None = None,
        cwd: Path | None = None,
    ) -> tuple[subprocess.Popen, Path]:
        log = self.workdir / f"{name}.log"
        out = open(log, "ab")
        proc = subprocess.Popen(
            [str(c) for c in command],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            user=user,
            preexec_fn=_die_with_parent,
            cwd=cwd or ROOT,
        )
        out.close()
        self._procs.append((name, proc))
        return proc, log

    def stop(self, proc: subprocess.Popen, timeout: float = 30.0) -> None:
        """SIGTERM to the process group (`dagster-celery worker start` runs celery as its child),
        SIGKILL to the group after ``timeout``."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _group_alive(proc.pid):
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.wait(10)
        self._procs = [(n, p) for n, p in self._procs if p is not proc]

    def close(self) -> None:
        for _name, proc in reversed(list(self._procs)):
            self.stop(proc)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def redis_server(services: Services) -> str:
    """A throwaway Redis on loopback (Debian's redis-server); returns its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise ServiceError(
            "redis-server is not installed; install Debian's redis-server (apt-get install redis-server)."
        )
    port = free_port()
    proc, log = services.spawn(
        "redis",
        [
            binary,
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(services.workdir),
        ],
    )

    def ready() -> bool:
        import socket

        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
        return False

    wait_until(ready, proc, "redis-server", log)
    return f"redis://127.0.0.1:{port}"


def postgres_server(services: Services) -> dict[str, object]:
    """A throwaway PostgreSQL cluster on loopback (Debian's postgresql), run as the postgres user
    (the server refuses root); returns dagster-postgres connection settings."""
    if not POSTGRES_BIN_DIRS:
        raise ServiceError("PostgreSQL is not installed; install Debian's postgresql (apt-get install postgresql).")
    bindir = POSTGRES_BIN_DIRS[0]
    user = "postgres" if os.geteuid() == 0 else None
    data = Path(tempfile.mkdtemp(prefix="pg-", dir=services.workdir))
    if user:
        entry = pwd.getpwnam(user)
        for path in (services.workdir, data):
            os.chown(path, entry.pw_uid, entry.pw_gid)
        os.chmod(services.workdir, 0o755)
    init = subprocess.run(
        [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth", "trust", "-E", "UTF8", "--no-sync"],
        capture_output=True,
        text=True,
        user=user,
        timeout=120,
    )
    if init.returncode != 0:
        raise ServiceError(f"initdb failed: {init.stderr.strip()}")
    port = free_port()
    proc, log = services.spawn(
        "postgres",
        [bindir / "postgres", "-D", data, "-h", "127.0.0.1", "-p", str(port), "-k", data, "-c", "max_connections=200"],
        user=user,
    )

    def ready() -> bool:
        out = subprocess.run([str(bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)], capture_output=True)
        return out.returncode == 0

    wait_until(ready, proc, "postgres", log)
    return {"username": "postgres", "password": "", "hostname": "127.0.0.1", "db_name": "postgres", "port": port}
