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

This module gives the worker, the step child and the orchestrator two things, on top of
``db_errors.is_transient_db_error`` (is this the database being briefly unavailable, worth
waiting for, or a real error, a bug or a constraint, that must surface now?):

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
from collections.abc import Callable
from typing import Any, TypeVar

from dagster_taskiq_sync._dagster.event_writes import finish_stored_event, is_sql_event_storage, stored_event_id
from dagster_taskiq_sync.storage.db_errors import describe_db_error, is_transient_db_error

log = logging.getLogger("dagster_taskiq_sync.db_retry")

T = TypeVar("T")

FIRST_DELAY_SECONDS = 0.25
MAX_DELAY_SECONDS = 5.0
DEFAULT_DEADLINE_SECONDS = 60.0


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
