"""Riding out transient errors of a Dagster instance's database (PostgreSQL restart, locked sqlite).

Dagster itself retries very little (measured with dagster 1.13 / dagster-postgres 0.29):

- dagster-postgres retries *opening* a connection (``retry_pg_connection_fn``: 5 retries,
  exponential from 0.2 s with jitter, ~11 s in all), then raises ``DagsterPostgresException("too
  many retries for DB connection")`` whose ``__cause__`` is the SQLAlchemy ``OperationalError``.
  Statements are never retried.
- A pooled engine (``optimize_for_webserver``, what ``instance.pooled`` turns on) has no
  ``pool_pre_ping``: after a server restart the first statement on each stale pooled connection
  fails at once with ``OperationalError`` (``connection_invalidated=True``, "server closed the
  connection unexpectedly" / "terminating connection due to administrator command"); SQLAlchemy
  then discards the pool, and the next call connects afresh. One retry covers it.
- sqlite waits up to 30 s on a lock (Dagster's busy timeout), then raises ``OperationalError:
  database is locked``.
- A failed write of a Dagster event (step start, output, success, ...) is raised into the step
  (``_EventListenerLogHandler``), which fails the step; the orchestrator's event-log polling
  (``StepDelegatingExecutor._pop_events`` -> ``get_records_for_run``) raising ends the run with
  "Unexpected exception while steps were still in-progress - terminating running steps".

This module gives the worker, the step child and the orchestrator three things:

- :func:`is_transient_db_error`: is this the database being briefly unavailable (worth waiting
  for), or a real error (a bug, a constraint) that must surface now?
- :func:`retry_transient`: call a function, backing off 0.25 s doubling to 5 s on transient
  errors until a deadline; anything else is raised at once.
- :func:`install_event_write_retry`: make one instance's event writes (and the run/KV writes and
  reads on the same path) ride out an outage, without ever storing an event twice.

Why a retried event write cannot store the event twice: every retry first looks the event up in
the run's event log by its exact serialized body (what the insert writes; it includes the
event's timestamp, so two distinct events never share one). If it is there, the first attempt's
insert committed before the error (PostgreSQL: autocommit INSERT committed, then the NOTIFY that
follows it, or the reply, was lost; sqlite: the run shard committed, the index shard was
locked) and only the writes that come after the event row are redone. If it is not there,
nothing was committed -- PostgreSQL rolls back a statement whose session dies before commit, and
sqlite reports "locked" before writing -- and the write is simply repeated.

Residual risk, for the record: (1) the secondary writes of asset and asset-check events (asset
index, tags, check executions) are redone after an error whose commit outcome is unknown, so a
commit acknowledged-but-lost in that second transaction can leave a duplicate tag row; the event
row itself is never duplicated. (2) When the deadline passes during a *batch* write
(``DAGSTER_EVENT_BATCH_SIZE``), Dagster falls back to single writes without knowing whether the
batch committed. (3) A write is only as retried as its deadline: an outage longer than it still
fails the step, as before.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from dagster_taskiq_sync._dagster.event_writes import finish_stored_event, is_sql_event_storage, stored_event_id

log = logging.getLogger("dagster_taskiq_sync.db_retry")

T = TypeVar("T")

FIRST_DELAY_SECONDS = 0.25
MAX_DELAY_SECONDS = 5.0
DEFAULT_DEADLINE_SECONDS = 60.0

# -- classification -----------------------------------------------------------------------------

# PostgreSQL SQLSTATEs that mean "the server or the session went away or is overloaded; the same
# statement can succeed later". Classes: 08 connection exception, 53 insufficient resources (too
# many connections, out of memory, disk full). Codes: admin_shutdown (fast shutdown, failover,
# pg_terminate_backend), crash_shutdown, cannot_connect_now (starting up / shutting down / in
# recovery), idle_session_timeout, serialization_failure, deadlock_detected, lock_not_available.
# Not here on purpose: 57014 query_canceled (a statement_timeout would fire again, adding load),
# 57P04 database_dropped, and every class-23 (integrity) / 42 (syntax, permissions) error.
_PG_TRANSIENT_CLASSES = ("08", "53")
_PG_TRANSIENT_CODES = frozenset({"57P01", "57P02", "57P03", "57P05", "40001", "40P01", "55P03"})

# libpq failures carry no SQLSTATE; their message is all there is. Permanent ones win.
_PERMANENT_MESSAGES = (
    "does not exist",  # database / role
    "authentication failed",
    "no pg_hba.conf entry",
    "no password supplied",
    "permission denied",
    "invalid dsn",
)
_TRANSIENT_MESSAGES = (
    "connection refused",
    "server closed the connection unexpectedly",
    "terminating connection due to administrator command",
    "the database system is shutting down",
    "the database system is starting up",
    "the database system is in recovery mode",
    "the database system is not yet accepting connections",
    "connection already closed",
    "could not receive data from server",
    "could not send data to server",
    "no connection to the server",
    "connection reset by peer",
    "broken pipe",
    "ssl syscall error",
    "ssl connection has been closed unexpectedly",
    "eof detected",
    "connection timed out",
    "timeout expired",
    "temporary failure in name resolution",
    "no route to host",
    "network is unreachable",
    "too many clients already",
    "remaining connection slots are reserved",
    "lost connection to mysql server",
    "mysql server has gone away",
    # sqlite
    "database is locked",
    "database table is locked",
    "database schema is locked",
    "locking protocol",
)

# sqlite primary result codes: BUSY (another connection holds the write lock past the busy
# timeout), LOCKED (a table lock within one shared cache), PROTOCOL (WAL lock race). Not IOERR:
# "disk I/O error" is a filesystem failing (full, gone, NFS), which waiting a minute rarely
# fixes and which must reach the user as the step's error, not as a stall.
_SQLITE_TRANSIENT_CODES = frozenset({5, 6, 15})

# MySQL (dagster-mysql): can't connect, server gone away, lost connection, too many
# connections, lock wait timeout, deadlock.
_MYSQL_TRANSIENT_CODES = frozenset({2002, 2003, 2006, 2013, 1040, 1205, 1213})

_PERMANENT_DBAPI_CLASSES = ("IntegrityError", "ProgrammingError", "DataError", "NotSupportedError")


def is_transient_db_error(exc: BaseException) -> bool:
    """True when ``exc`` (or the database error it wraps) means the database was briefly
    unavailable: connection refused / reset / terminated, server shutting down or starting up,
    a stale pooled connection, sqlite's "database is locked", a deadlock or serialization
    failure. False for integrity, programming and data errors, and for anything not from a
    database.

    Wrappers are unwrapped: the first link of the ``__cause__`` chain (and of ``__context__``
    for Dagster's and SQLAlchemy's own exceptions, which sometimes re-raise without ``from``)
    that is a database error decides. dagster-postgres' ``DagsterPostgresException("too many
    retries for DB connection")`` is therefore transient through its cause.
    """
    for link in _chain(exc):
        verdict = _classify(link)
        if verdict is not None:
            return verdict
    return False


def describe_db_error(exc: BaseException) -> str:
    """One line naming the database error that decides ``exc``'s class, e.g.
    ``OperationalError: connection to server at "db", port 5432 failed: Connection refused``."""
    deciding = exc
    for link in _chain(exc):
        if _classify(link) is not None:
            deciding = link
            break
    orig = getattr(deciding, "orig", None)
    shown = orig if isinstance(orig, BaseException) else deciding
    text = " ".join(str(shown).split())
    if len(text) > 160:
        text = text[:157] + "..."
    return f"{type(shown).__name__}: {text}" if text else type(shown).__name__


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen and len(seen) < 32:
        seen.add(id(link))
        yield link
        if link.__cause__ is not None:
            link = link.__cause__
        elif not link.__suppress_context__ and _is_wrapper(link):
            link = link.__context__
        else:
            link = None


def _is_wrapper(exc: BaseException) -> bool:
    # Only Dagster's and SQLAlchemy's exceptions are followed through __context__: an unrelated
    # error raised while handling a database error (a KeyError in an except block) is not one.
    module = type(exc).__module__ or ""
    return module.split(".")[0] in ("dagster", "dagster_postgres", "dagster_mysql", "sqlalchemy")


def _classify(exc: BaseException) -> bool | None:
    """True/False for a database error we can judge, None to look further down the chain."""
    try:
        import sqlalchemy.exc as sa_exc
    except ImportError:  # pragma: no cover - Dagster depends on SQLAlchemy
        sa_exc = None  # type: ignore[assignment]  # the classification below then skips SQLAlchemy
    if sa_exc is not None:
        if isinstance(exc, sa_exc.DBAPIError):
            if exc.connection_invalidated:
                return True
            if isinstance(exc.orig, BaseException):
                verdict = _classify_dbapi(exc.orig)
                if verdict is not None:
                    return verdict
            if type(exc).__name__ in _PERMANENT_DBAPI_CLASSES:
                return False
            return _by_message(str(exc), default=False)
        if isinstance(exc, (sa_exc.PendingRollbackError, sa_exc.DisconnectionError, sa_exc.TimeoutError)):
            # PendingRollbackError: a Connection invalidated inside a transaction was used again;
            # Dagster opens a Connection per call, so the retry gets a fresh one.
            # TimeoutError: no pooled connection free within pool_timeout.
            return True
        if isinstance(exc, sa_exc.SQLAlchemyError):
            return None
    verdict = _classify_dbapi(exc)
    if verdict is not None:
        return verdict
    if isinstance(exc, ConnectionError):  # refused / reset / aborted / broken pipe
        return True
    return None


def _classify_dbapi(exc: BaseException) -> bool | None:
    """A driver's own exception (psycopg2, psycopg 3, sqlite3, pymysql / MySQLdb)."""
    module = (type(exc).__module__ or "").split(".")[0]
    name = type(exc).__name__
    if module in ("psycopg2", "psycopg"):
        code = getattr(exc, "pgcode", None) or getattr(exc, "sqlstate", None)
        if code:
            return code[:2] in _PG_TRANSIENT_CLASSES or code in _PG_TRANSIENT_CODES
        if _is_dbapi(exc, "IntegrityError", "ProgrammingError", "DataError", "NotSupportedError"):
            return False
        return _by_message(str(exc), default=False)
    if module in ("sqlite3", "_sqlite3"):
        code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
        if isinstance(code, int):
            return (code & 0xFF) in _SQLITE_TRANSIENT_CODES
        if name == "OperationalError":
            return _by_message(str(exc), default=False)
        return False
    if module in ("pymysql", "MySQLdb"):
        code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
        if code is not None:
            return code in _MYSQL_TRANSIENT_CODES
        return _by_message(str(exc), default=False)
    return None


def _is_dbapi(exc: BaseException, *names: str) -> bool:
    return any(cls.__name__ in names for cls in type(exc).__mro__)


def _by_message(message: str, default: bool) -> bool:
    text = message.lower()
    if any(marker in text for marker in _PERMANENT_MESSAGES):
        return False
    if any(marker in text for marker in _TRANSIENT_MESSAGES):
        return True
    return default


# -- retrying -----------------------------------------------------------------------------------


def retry_transient(
    fn: Callable[[], T],
    *,
    what: str,
    deadline_seconds: float,
    sleep: Callable[[float], Any] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    on_retry: Callable[[BaseException, int, float], Any] | None = None,
) -> T:
    """``fn()``, called again after transient database errors until ``deadline_seconds`` have
    passed since the first call; returns its result.

    Waits 0.25 s, then doubles up to 5 s between attempts (never past the deadline, where one
    last attempt is made). A non-transient error is raised at once; after the deadline the last
    transient error is raised. ``what`` completes a log line ("reading run R from the
    instance"): one warning per distinct kind of error while retrying, and one line when the
    database is back or retrying gives up. ``on_retry(error, attempt, wait)`` is called before
    each wait (metrics, extending a message's visibility). ``sleep`` and ``clock`` are injectable
    for tests.
    """
    start = clock()
    delay = FIRST_DELAY_SECONDS
    attempt = 0
    kinds: set[str] = set()
    while True:
        attempt += 1
        try:
            result = fn()
        except Exception as exc:
            if not is_transient_db_error(exc):
                raise
            elapsed = clock() - start
            remaining = deadline_seconds - elapsed
            kind = describe_db_error(exc)
            if remaining <= 0:
                log.warning(
                    "database still unavailable %s after %.1f s and %d attempts, giving up: %s",
                    what,
                    elapsed,
                    attempt,
                    kind,
                )
                raise
            if kind not in kinds:
                kinds.add(kind)
                log.warning("database unavailable %s (%s); retrying for up to %g s", what, kind, deadline_seconds)
            wait = min(delay, remaining)
            if on_retry is not None:
                on_retry(exc, attempt, wait)
            del exc  # do not keep the traceback's frames alive across the wait
            sleep(wait)
            delay = min(delay * 2, MAX_DELAY_SECONDS)
            continue
        if attempt > 1:
            log.warning("database back %s after %.1f s and %d attempts", what, clock() - start, attempt)
        return result


# -- installing on an instance ------------------------------------------------------------------

# Run-storage methods on the event write path, all safe to repeat: handle_run_event and
# add_run_tags re-read the run and update it (a retried tag insert becomes an update),
# set_cursor_values is an upsert, get_run_records a read (DagsterInstance.get_run_by_id, which
# handle_new_event calls after every run event).
RUN_STORAGE_WRITES = ("handle_run_event", "add_run_tags", "set_cursor_values", "get_run_records")
# Reads worth riding out in the orchestrator and the worker (reads=True): the executor's
# event-log polling, liveness records and cancel requests, run lookups.
EVENT_STORAGE_READS = ("get_records_for_run", "get_logs_for_run", "get_stats_for_run", "get_step_stats_for_run")
RUN_STORAGE_READS = ("get_cursor_values", "get_runs", "get_run_ids", "has_run")

_INSTALLED = "_dagster_taskiq_sync_db_retry"
_local = threading.local()


def install_event_write_retry(
    instance: Any,
    deadline_seconds: float = DEFAULT_DEADLINE_SECONDS,
    *,
    reads: bool = False,
    sleep: Callable[[float], Any] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> Any:
    """Make ``instance``'s event writes ride out a database outage of up to ``deadline_seconds``
    per write; returns the instance. Idempotent; affects this instance object only.

    Wraps, on the instance's storage objects (instance attributes shadowing the methods):

    - event log storage ``store_event`` (every event of ``handle_new_event`` /
      ``report_engine_event`` / a step's logging goes through it) and ``store_event_batch``,
      without ever storing an event twice (see the module docstring);
    - run storage ``handle_run_event``, ``add_run_tags``, ``set_cursor_values`` (the KV store
      behind liveness records and the worker registry) and ``get_run_records``
      (``get_run_by_id``);
    - with ``reads=True`` also the reads listed in ``EVENT_STORAGE_READS`` and
      ``RUN_STORAGE_READS`` (the orchestrator's event-log polling among them).

    A call made while another wrapped call is retrying on the same thread (a storage method
    calling another) is not retried separately: the outer call's deadline holds.
    """
    events = instance.event_log_storage
    runs = instance.run_storage
    settings = {"deadline_seconds": deadline_seconds, "sleep": sleep, "clock": clock}

    if not events.__dict__.get(_INSTALLED):
        if is_sql_event_storage(events):
            store_one = events.store_event
            _shadow(events, "store_event", _store_event_wrapper, events, settings)
            _shadow(events, "store_event_batch", _store_event_batch_wrapper, events, store_one, settings)
        else:
            log.warning(
                "event writes of %s are not retried through database outages: only SQL event "
                "log storages are supported",
                type(events).__name__,
            )
        events.__dict__[_INSTALLED] = set()
    if not runs.__dict__.get(_INSTALLED):
        for name in RUN_STORAGE_WRITES:
            _shadow(runs, name, _retrying_wrapper, name, "run storage", settings)
        runs.__dict__[_INSTALLED] = set()
    if reads:
        for storage, names, label in (
            (events, EVENT_STORAGE_READS, "event log"),
            (runs, RUN_STORAGE_READS, "run storage"),
        ):
            done = storage.__dict__[_INSTALLED]
            for name in names:
                if name not in done and hasattr(storage, name):
                    _shadow(storage, name, _retrying_wrapper, name, label, settings)
                    done.add(name)
    return instance


def _shadow(storage: Any, name: str, make: Callable[..., Callable[..., Any]], *args: Any) -> None:
    """Replace ``storage.name`` (on this object only) by ``make(original, *args)``."""
    orig = getattr(storage, name, None)
    if orig is None:
        return
    wrapper = make(orig, *args)
    functools.update_wrapper(wrapper, orig)
    setattr(storage, name, wrapper)


def _outermost(call: Callable[[], T], orig: Callable[[], T]) -> T:
    """``call()`` unless a wrapped call is already retrying on this thread, then ``orig()``."""
    if getattr(_local, "active", False):
        return orig()
    _local.active = True
    try:
        return call()
    finally:
        _local.active = False


def _retrying_wrapper(orig: Callable[..., T], name: str, label: str, settings: dict) -> Callable[..., T]:
    def wrapper(*args: Any, **kwargs: Any) -> T:
        run_id = args[0] if args and isinstance(args[0], str) else None
        what = f"in {label} {name}" + (f" for run {run_id}" if run_id else "")
        return _outermost(
            lambda: retry_transient(lambda: orig(*args, **kwargs), what=what, **settings), lambda: orig(*args, **kwargs)
        )

    return wrapper


def _store_event_wrapper(orig: Callable[[Any], None], storage: Any, settings: dict) -> Callable[[Any], None]:
    def store_event(event: Any) -> None:
        _outermost(lambda: _store_event_once(storage, orig, event, settings, maybe_stored=False), lambda: orig(event))

    return store_event


def _store_event_batch_wrapper(
    orig: Callable[[Any], None], storage: Any, store_one: Callable[[Any], None], settings: dict
) -> Callable[[Any], None]:
    def store_event_batch(events: Any) -> None:
        def call() -> None:
            try:
                orig(events)
                return
            except Exception as exc:
                if not is_transient_db_error(exc):
                    raise
                log.warning(
                    "database unavailable storing a batch of %d events (%s); storing them one by one",
                    len(events),
                    describe_db_error(exc),
                )
            # The batch insert is one statement, but whether it committed is unknown: each event
            # is looked up before it is written again.
            for event in events:
                _store_event_once(storage, store_one, event, settings, maybe_stored=True)

        _outermost(call, lambda: orig(events))

    return store_event_batch


def _store_event_once(
    storage: Any, orig: Callable[[Any], None], event: Any, settings: dict, *, maybe_stored: bool
) -> None:
    attempts = 0

    def attempt() -> None:
        nonlocal attempts
        attempts += 1
        if attempts > 1 or maybe_stored:
            event_id = stored_event_id(storage, event, index=False)
            if event_id is not None:
                finish_stored_event(storage, event, event_id)
                return
        orig(event)

    kind = event.dagster_event_type.value if getattr(event, "dagster_event_type", None) else "log message"
    retry_transient(attempt, what=f"writing event {kind} of run {event.run_id}", **settings)
