"""Who tells an orchestrating loop that its run's event log changed, so that it reads at once.

``taskiq_executor``'s loop reads the run's event log, launches what became ready, and waits up to
``step_poll_interval`` before reading again. Without a word from the instance a step's end waits
half that interval on average before the loop sees it, and a chain pays it at every step. Where the
instance can say that a run's events changed, a :class:`RunBell` is rung and the loop reads at once;
``step_poll_interval`` stays the longest wait, so a watch that breaks (or an instance that cannot
tell) only brings back the plain poll.

- PostgreSQL: dagster-postgres NOTIFYs channel ``run_events`` (payload ``<run id>_<storage id>``)
  after every event it stores. One connection per process LISTENs and rings the bells of the runs
  it names. A PgBouncer in transaction mode does not pass LISTEN on: the loop then polls as before.
- sqlite (one file per run): ``PRAGMA data_version`` on a connection of the watcher's own changes
  whenever another connection commits to the file; it is read every ``SQLITE_WATCH_INTERVAL``
  (about 5 microseconds a look).

One watcher thread per process and storage serves every run orchestrated there; it stops when the
last run stops watching, closing its connections.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import select
import sqlite3
import threading
import time
from collections.abc import Iterator
from typing import Any

from dagster_taskiq_sync._dagster.sqlite import run_event_log_path
from dagster_taskiq_sync.storage.db_errors import describe_db_error

log = logging.getLogger("dagster_taskiq_sync.executor")

SQLITE_WATCH_INTERVAL = 0.002  # seconds between looks at each watched run's sqlite file
LISTEN_TICK = 0.5  # seconds a PostgreSQL listener blocks before it looks at its runs again
RECONNECT_SECONDS = 2.0  # a listener whose connection broke tries again after this long
CHANNEL = "run_events"  # dagster-postgres's (event_log.CHANNEL_NAME)


class RunBell:
    """Rung when a run's event log may hold new events; the loop clears it before each read."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def ring(self) -> None:
        self._event.set()

    def clear(self) -> None:
        self._event.clear()

    def wait(self, seconds: float) -> None:
        """Wait up to ``seconds``, less if rung (a ring since the last clear returns at once)."""
        self._event.wait(seconds)


class _SqliteFiles:
    """Looks at each watched run's sqlite file for commits by other connections."""

    def __init__(self) -> None:
        self.paths: dict[str, str] = {}  # run id -> its file (set before the run is watched)
        self._files: dict[str, tuple[sqlite3.Connection, int]] = {}

    def changed(self, run_ids: set[str]) -> set[str]:
        time.sleep(SQLITE_WATCH_INTERVAL)
        for gone in set(self._files) - run_ids:
            self._files.pop(gone)[0].close()
        rung = set()
        for run_id in run_ids:
            kept = self._files.get(run_id)
            try:
                if kept is None:
                    self._open(run_id)
                    continue
                version = kept[0].execute("PRAGMA data_version").fetchone()[0]
            except sqlite3.Error:  # locked, or gone: read to be sure, and look again next time
                if kept is not None:
                    self._files.pop(run_id)[0].close()
                rung.add(run_id)
                continue
            if version != kept[1]:
                self._files[run_id] = (kept[0], version)
                rung.add(run_id)
        return rung

    def _open(self, run_id: str) -> None:
        path = self.paths.get(run_id)
        if path is None:
            return
        # mode=rw never creates the file; this connection only reads (a PRAGMA), never writes.
        uri = f"{pathlib.Path(path).resolve().as_uri()}?mode=rw"
        conn = sqlite3.connect(uri, uri=True, timeout=0.05, check_same_thread=False)
        self._files[run_id] = (conn, conn.execute("PRAGMA data_version").fetchone()[0])

    def close(self) -> None:
        for conn, _ in self._files.values():
            conn.close()
        self._files.clear()


class _PostgresChannel:
    """LISTENs to dagster-postgres's channel on a connection of its own."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._conn: Any = None  # the DBAPI (psycopg2) connection
        self._pooled: Any = None  # SQLAlchemy's wrapper of it: closing that closes the connection
        self._retry_at = 0.0
        self._said_down = False

    def changed(self, run_ids: set[str]) -> set[str]:
        if self._conn is None and not self._connect():
            time.sleep(LISTEN_TICK)
            return set()
        try:
            readable, _, _ = select.select([self._conn], [], [], LISTEN_TICK)
            if not readable:
                return set()
            self._conn.poll()
            notes, self._conn.notifies[:] = list(self._conn.notifies), []
        except Exception as exc:  # noqa: BLE001 - any broken connection: poll as before until it is back
            self._broken(exc)
            return set(run_ids)  # notifications may have been lost with it: read once to be sure
        return {note.payload.rsplit("_", 1)[0] for note in notes} & run_ids

    def _connect(self) -> bool:
        if time.monotonic() < self._retry_at:
            return False
        try:
            import sqlalchemy

            # The URL as dagster-postgres has it, connected the way its own engines connect.
            engine = sqlalchemy.create_engine(self._url, poolclass=sqlalchemy.pool.NullPool)
            self._pooled = engine.raw_connection()
            self._conn = self._pooled.driver_connection
            self._conn.autocommit = True
            with self._conn.cursor() as cursor:
                cursor.execute(f"LISTEN {CHANNEL}")
        except Exception as exc:  # noqa: BLE001 - a database that is down, or refuses: poll as before
            self._broken(exc)
            return False
        if self._said_down:
            log.info("listening for run events on PostgreSQL again")
            self._said_down = False
        return True

    def _broken(self, exc: BaseException) -> None:
        if not self._said_down:
            log.warning(
                "could not LISTEN for run events on PostgreSQL (%s); orchestrators read the event log every "
                "step_poll_interval until it is back",
                describe_db_error(exc),
            )
            self._said_down = True
        self.close()
        self._retry_at = time.monotonic() + RECONNECT_SECONDS

    def close(self) -> None:
        if self._pooled is not None:
            with contextlib.suppress(Exception):
                self._pooled.close()
        self._conn = self._pooled = None


class _Watcher:
    """One thread ringing the bells of the runs watched through one storage."""

    def __init__(self, source: Any) -> None:
        self.source = source
        self._lock = threading.Lock()
        self._bells: dict[str, set[RunBell]] = {}
        self._thread: threading.Thread | None = None

    def add(self, run_id: str, bell: RunBell) -> None:
        with self._lock:
            self._bells.setdefault(run_id, set()).add(bell)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="taskiq-event-watch", daemon=True)
                self._thread.start()

    def remove(self, run_id: str, bell: RunBell) -> None:
        with self._lock:
            bells = self._bells.get(run_id)
            if bells is not None:
                bells.discard(bell)
                if not bells:
                    del self._bells[run_id]
                    getattr(self.source, "paths", {}).pop(run_id, None)

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._bells:  # closed under the lock: a run watched next starts a new thread
                    self.source.close()
                    self._thread = None
                    return
                run_ids = set(self._bells)
            try:
                rung = self.source.changed(run_ids)
            except Exception as exc:  # noqa: BLE001 - never let the thread die with runs watching
                log.warning("the run event watch failed (%s: %s); reading at once", type(exc).__name__, exc)
                time.sleep(LISTEN_TICK)
                rung = run_ids
            with self._lock:
                bells = [bell for run_id in rung for bell in self._bells.get(run_id, ())]
            for bell in bells:
                bell.ring()


_watchers: dict[tuple[str, str], _Watcher] = {}
_watchers_lock = threading.Lock()


def _watcher_for(instance: Any, run_id: str) -> _Watcher | None:
    url = getattr(instance.event_log_storage, "postgres_url", None)
    path = run_event_log_path(instance, run_id)
    if isinstance(url, str):
        key = ("postgres", url)
    elif path is not None:
        key = ("sqlite", os.path.dirname(os.path.abspath(path)))
    else:
        return None
    with _watchers_lock:
        watcher = _watchers.get(key)
        if watcher is None:
            watcher = _watchers[key] = _Watcher(_PostgresChannel(url) if isinstance(url, str) else _SqliteFiles())
        if path is not None:
            watcher.source.paths[run_id] = path
        return watcher


@contextlib.contextmanager
def run_bell(instance: Any, run_id: str) -> Iterator[RunBell | None]:
    """A bell rung whenever ``run_id``'s events may have changed, while in the block; None when
    ``instance``'s event log cannot tell (the loop then polls every ``step_poll_interval``)."""
    watcher = _watcher_for(instance, run_id)
    if watcher is None:
        yield None
        return
    bell = RunBell()
    watcher.add(run_id, bell)
    try:
        yield bell
    finally:
        watcher.remove(run_id, bell)
