"""A throwaway PostgreSQL cluster on 127.0.0.1 for tests, with stop/start for fault injection.

The approach of ``benchmarks/services.py``: Debian's binaries, ``initdb --no-sync`` as the
``postgres`` user when the tests run as root (the server refuses root), its own port, fsync off,
and PR_SET_PDEATHSIG so the server gets SIGKILL when the test session dies.

PR_SET_PDEATHSIG fires when the *thread* that started the server ends, not the process, so every
start (including the restart at the end of :meth:`PostgresCluster.pause`, which runs in a
background thread) is done by one long-lived spawner thread owned by the cluster.

Each :meth:`PostgresCluster.write_dagster_yaml` call creates a fresh database, so tests sharing
the session's cluster never share Dagster state.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks.services import _die_with_parent
from dagster_taskiq_sync.ops.local_endpoint import free_port

APT_PACKAGE = "postgresql"
DEFAULT_STOP_TIMEOUT = 60.0
DEFAULT_START_TIMEOUT = 60.0


class PostgresUnavailable(RuntimeError):
    """PostgreSQL's server binaries are not installed here; the message names the package."""


def find_bindir() -> Path | None:
    """The newest ``/usr/lib/postgresql/N/bin`` holding ``postgres`` and ``initdb`` (Debian's
    layout), else the directory of ``postgres`` on PATH, else None."""
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True)
    on_path = shutil.which("postgres")
    if on_path:
        candidates.append(Path(on_path).parent)
    for bindir in candidates:
        if (bindir / "postgres").is_file() and (bindir / "initdb").is_file():
            return bindir
    return None


def _version_key(bindir: Path) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in bindir.parent.name.split("."))
    except ValueError:
        return (0,)


class Pause(threading.Thread):
    """:meth:`PostgresCluster.pause` in flight: ``stopped`` is set once the server is down,
    ``started`` once it accepts connections again; ``wait()`` re-raises what went wrong."""

    def __init__(self, cluster: PostgresCluster, seconds: float) -> None:
        super().__init__(name="pg-pause", daemon=True)
        self.cluster = cluster
        self.seconds = seconds
        self.stopped = threading.Event()
        self.started = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.cluster.stop()
            self.stopped.set()
            time.sleep(self.seconds)
            self.cluster.start()
            self.started.set()
        except BaseException as exc:
            self.error = exc
            self.stopped.set()

    def wait(self, timeout: float = DEFAULT_STOP_TIMEOUT + DEFAULT_START_TIMEOUT + 60) -> None:
        self.join(timeout)
        if self.is_alive():
            raise AssertionError(f"PostgreSQL pause of {self.seconds:g} s did not end within {timeout:g} s")
        if self.error is not None:
            raise self.error


class PostgresCluster:
    """One initdb'd cluster on 127.0.0.1:PORT; ``start()``/``stop()`` keep the port and data.

    ``stop()`` is PostgreSQL's fast shutdown (SIGINT): open sessions are terminated and their
    transactions rolled back, as when an operator restarts the server or a managed database
    fails over. Clients see "terminating connection due to administrator command" on a busy
    connection and "server closed the connection unexpectedly" / "connection refused" after.
    """

    _names = itertools.count(1)

    def __init__(self, workdir: Path | None = None, bindir: Path | None = None) -> None:
        bindir = bindir or find_bindir()
        if bindir is None:
            raise PostgresUnavailable(
                "PostgreSQL's server binaries are not installed (no /usr/lib/postgresql/*/bin/postgres); "
                f"install Debian's {APT_PACKAGE} package (apt-get install {APT_PACKAGE}), as .ci/run does."
            )
        self.bindir = bindir
        self.user = "postgres" if os.geteuid() == 0 else None
        # Not under pytest's tmp dir: /tmp/pytest-of-root is 0700, the postgres user cannot enter it.
        self.root = Path(tempfile.mkdtemp(prefix="dagster-taskiq-pg-", dir=workdir))
        self.data = self.root / "data"
        self.log_path = self.root / "postgres.log"
        self.port = free_port()
        self.host = "127.0.0.1"
        self._proc: subprocess.Popen | None = None
        self._lock = threading.RLock()
        # Starts happen on this thread only (see the module docstring); it lives until close().
        self._spawner = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pg-spawner")
        self._initdb()

    # -- lifecycle -----------------------------------------------------------------------------

    def _initdb(self) -> None:
        self.data.mkdir()
        if self.user:
            entry = pwd.getpwnam(self.user)
            for path in (self.root, self.data):
                os.chown(path, entry.pw_uid, entry.pw_gid)
            os.chmod(self.root, 0o755)
        init = subprocess.run(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
            check=False,
            capture_output=True,
            text=True,
            user=self.user,
            timeout=180,
        )
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed (code {init.returncode}): {init.stderr.strip()}")

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = DEFAULT_START_TIMEOUT) -> PostgresCluster:
        """Start the server on the same port and data directory; returns once it accepts
        connections."""
        with self._lock:
            if self.running:
                return self
            self._proc = self._spawner.submit(self._spawn).result()
            self._wait_ready(timeout)
        return self

    def _spawn(self) -> subprocess.Popen:
        with open(self.log_path, "ab") as log:  # the child keeps its own copy of the descriptor
            return subprocess.Popen(
                [
                    str(self.bindir / "postgres"),
                    "-D",
                    str(self.data),
                    "-h",
                    self.host,
                    "-p",
                    str(self.port),
                    "-k",
                    str(self.data),
                    "-c",
                    "fsync=off",
                    "-c",
                    "synchronous_commit=off",
                    "-c",
                    "full_page_writes=off",
                    "-c",
                    "max_connections=200",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                user=self.user,
                preexec_fn=_die_with_parent,
            )

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(
                    f"postgres exited at start (code {self._proc.returncode}); its log:\n{self.log_tail()}"
                )
            ready = subprocess.run(
                [str(self.bindir / "pg_isready"), "-q", "-h", self.host, "-p", str(self.port)],
                check=False,
                capture_output=True,
            )
            if ready.returncode == 0:
                return
            time.sleep(0.05)
        raise RuntimeError(f"postgres not ready after {timeout:g} s; its log:\n{self.log_tail()}")

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
        """Fast shutdown (SIGINT): sessions are terminated, the port closes. SIGKILL after
        ``timeout``."""
        with self._lock:
            proc, self._proc = self._proc, None
            if proc is None or proc.poll() is not None:
                return
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)

    def restart(self) -> None:
        self.stop()
        self.start()

    def pause(self, seconds: float) -> Pause:
        """Stop the server now and start it again ``seconds`` later, in a background thread."""
        pause = Pause(self, seconds)
        pause.start()
        return pause

    def close(self) -> None:
        self.stop()
        self._spawner.shutdown(wait=True)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostgresCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # -- databases -----------------------------------------------------------------------------

    def psql(self, sql: str, db_name: str = "postgres") -> str:
        """Run one SQL statement as the superuser; returns psql's unaligned output."""
        out = subprocess.run(
            [
                str(self.bindir / "psql"),
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                self.host,
                "-p",
                str(self.port),
                "-U",
                "postgres",
                "-d",
                db_name,
                "-c",
                sql,
            ],
            check=False,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if out.returncode != 0:
            raise RuntimeError(f"psql failed: {out.stderr.strip()}")
        return out.stdout.strip()

    def create_database(self, prefix: str = "dagster") -> str:
        """A fresh, empty database; returns its name."""
        name = f"{prefix}_{os.getpid()}_{next(self._names)}"
        self.psql(f'CREATE DATABASE "{name}"')
        return name

    def terminate_connections(self, db_name: str) -> int:
        """Kill every session on ``db_name`` (as a failover or an idle-session reaper would)
        without stopping the server; returns how many were killed."""
        out = self.psql(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            f"WHERE datname = '{db_name}' AND pid <> pg_backend_pid()"
        )
        return int(out or 0)

    def db_settings(self, db_name: str) -> dict[str, Any]:
        """dagster-postgres ``postgres_db`` settings for ``db_name``. The scheme names psycopg2:
        SQLAlchemy 2.1 maps plain ``postgresql://`` to psycopg 3, which is not installed."""
        return {
            "username": "postgres",
            "password": "",
            "hostname": self.host,
            "db_name": db_name,
            "port": self.port,
            "scheme": "postgresql+psycopg2",
        }

    def url(self, db_name: str) -> str:
        return f"postgresql+psycopg2://postgres@{self.host}:{self.port}/{db_name}"

    def dsn(self, db_name: str) -> str:
        """A libpq/psycopg2 connection string."""
        return f"host={self.host} port={self.port} user=postgres dbname={db_name}"

    def write_dagster_yaml(self, home: Path, extra: dict[str, Any] | None = None) -> str:
        """Write ``home/dagster.yaml`` with all of Dagster's storage on a fresh database of this
        cluster (telemetry off, plus ``extra`` top-level keys); returns the database's name."""
        db_name = self.create_database()
        config: dict[str, Any] = {
            "storage": {"postgres": {"postgres_db": self.db_settings(db_name)}},
            "telemetry": {"enabled": False},
        }
        config.update(extra or {})
        home.mkdir(parents=True, exist_ok=True)
        (home / "dagster.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        return db_name
