"""Kept sqlite connections for long-lived processes (Dagster's sqlite storages use NullPool)."""

from __future__ import annotations

import collections
import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from dagster_taskiq_sync._dagster.names import SQLITE_BUSY_TIMEOUT_SECONDS

# --- sqlite connections ---------------------------------------------------------------------------
# Dagster's sqlite storages build a new SQLAlchemy engine, open a connection and dispose of it for
# every query (NullPool): ~1 ms of CPU per query on top of the query itself (measured here: a
# one-row insert 2.9 ms vs 1.3 ms with a kept connection, a count 1.2 ms vs 0.13 ms). A step writes
# ~13 events and reads the run and its stats, and the orchestrator reads the event log every
# 20 ms, so long-lived processes keep one engine (one open connection, more under concurrency) per
# database file. Nothing else changes: each query is still its own transaction, so no lock is held
# between queries; the event log's own lock still serializes its queries in the process.

_SQLITE_ENGINES = 16  # per storage: run shards a long-lived step child may touch, least recent closed


def keep_sqlite_connections(instance: Any) -> bool:
    """Keep sqlite connections open in this process's ``instance`` (run and event log storages);
    False when it has no plain sqlite storage. Must be called after any fork (step children)."""
    import sqlalchemy as db
    from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage
    from dagster._core.storage.runs.sqlite.sqlite_run_storage import SqliteRunStorage

    def engine_for(engines: collections.OrderedDict, conn_string: str, **connect_args: Any) -> Any:
        engine = engines.get(conn_string)
        if engine is None:  # the busy timeouts Dagster's own engines use
            engine = engines[conn_string] = db.create_engine(
                conn_string,
                pool_size=1,
                max_overflow=8,
                pool_timeout=60,
                connect_args={**connect_args, "check_same_thread": False},
            )
            while len(engines) > _SQLITE_ENGINES:
                engines.popitem(last=False)[1].dispose()
        engines.move_to_end(conn_string)
        return engine

    kept = False
    events = getattr(instance, "_event_storage", None)
    if type(events) is SqliteEventLogStorage and not getattr(events, "_dagster_taskiq_sync_kept", False):
        event_engines: collections.OrderedDict = collections.OrderedDict()

        @contextlib.contextmanager
        def _connect(shard: str) -> Iterator[Any]:
            with events._db_lock:
                engine = engine_for(
                    event_engines, events.conn_string_for_shard(shard), timeout=SQLITE_BUSY_TIMEOUT_SECONDS
                )
                if shard not in events._initialized_dbs:
                    if not _stamped(engine) and not _create_run_file(events.conn_string_for_shard(shard)):
                        events._initdb(engine)
                    events._initialized_dbs.add(shard)
                with engine.connect() as conn:
                    with conn.begin():
                        yield conn

        events._connect = _connect  # type: ignore[method-assign]  # one connection per file, see above
        events._dagster_taskiq_sync_kept = kept = True  # type: ignore[attr-defined]  # our marker
    runs = getattr(instance, "_run_storage", None)
    if type(runs) is SqliteRunStorage and not getattr(runs, "_dagster_taskiq_sync_kept", False):
        run_engines: collections.OrderedDict = collections.OrderedDict()
        lock = threading.Lock()

        @contextlib.contextmanager
        def connect() -> Iterator[Any]:
            with lock:
                engine = engine_for(run_engines, runs._conn_string)
            with engine.connect() as conn:
                with conn.begin():
                    yield conn

        runs.connect = connect  # type: ignore[method-assign]  # one engine per file, see above
        runs._dagster_taskiq_sync_kept = kept = True  # type: ignore[attr-defined]  # our marker
    return kept


def _stamped(engine: Any) -> bool:
    """Whether a run's event-log file already holds Dagster's tables: it has the alembic revision
    Dagster stamps once it created them, which is all ``_initdb`` looks for before creating them
    (a revision and a head, never whether they match). One SELECT, ~0.1 ms. ``_initdb``'s own look
    loads alembic's whole migration directory (~14 ms of CPU, three times that on a busy machine),
    in each process, for each run's file it touches: a step child paid it on its first step of every
    run (two of a chain-5's five steps). A new file is made by :func:`_create_run_file`, or, when
    another process is making it, by ``_initdb``, which rides that race out."""
    import sqlalchemy as db

    try:
        with engine.connect() as conn:
            return conn.exec_driver_sql("SELECT version_num FROM alembic_version LIMIT 1").first() is not None
    except db.exc.OperationalError:  # no such table: a new file (or one locked while created)
        return False


_SCRIPT: list[Any] = []  # alembic's script directory of Dagster's sqlite event log, loaded once per process


def _create_run_file(conn_string: str) -> bool:
    """Make a new run's event-log file as Dagster's ``_initdb`` does (its tables, WAL, alembic's
    stamp at head), in one transaction: False (nothing done) when that fails, such as when another
    process is making the same file, and ``_initdb``, which rides that race out, must do it.

    ``_initdb`` creates each table and index in its own commit while the file is still in rollback-
    journal mode (a few fsyncs each, ~40 in all), switches to WAL after, and loads alembic's
    migration directory twice: ~55 ms of an orchestrator's run start quiet, and the part of it that
    grew most on a busy disk (an interactive run during a backfill). Here: WAL first, one
    transaction, one fsync, and the directory loaded once per process (~12 ms). The schema is
    SQLAlchemy's and alembic's own, as ``_initdb`` makes it (tests/unit/test_sqlite_files.py
    compares the two files)."""
    import sqlalchemy as db

    try:
        from alembic.runtime.migration import MigrationContext
        from alembic.script import ScriptDirectory
        from dagster._core.storage.event_log.schema import SqlEventLogStorageMetadata
        from dagster._core.storage.event_log.sqlite import sqlite_event_log
        from dagster._core.storage.sql import get_alembic_config
    except ImportError:  # a Dagster that moved them: its own _initdb still works
        return False
    if not _SCRIPT:
        _SCRIPT.append(ScriptDirectory.from_config(get_alembic_config(sqlite_event_log.__file__)))
    engine = db.create_engine(
        conn_string,
        poolclass=db.pool.NullPool,
        connect_args={"timeout": SQLITE_BUSY_TIMEOUT_SECONDS, "isolation_level": None},  # we say BEGIN
    )
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA journal_mode=WAL")
            conn.exec_driver_sql("BEGIN IMMEDIATE")
            try:
                SqlEventLogStorageMetadata.create_all(conn, checkfirst=False)
                MigrationContext.configure(conn).stamp(_SCRIPT[0], "head")
                conn.exec_driver_sql("COMMIT")
            except BaseException:
                conn.exec_driver_sql("ROLLBACK")
                raise
        return True
    except db.exc.DBAPIError:  # a table already there (another process made it), a lock held too long
        return False
    finally:
        engine.dispose()


def run_event_log_path(instance: Any, run_id: str) -> str | None:
    """The file of ``run_id``'s event log when ``instance`` keeps one sqlite file per run (Dagster's
    default sqlite event log storage); None for any other storage."""
    from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage

    events = getattr(instance, "_event_storage", None)
    if type(events) is not SqliteEventLogStorage:
        return None
    return events.path_for_shard(run_id)
