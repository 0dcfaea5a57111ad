"""Every private Dagster import this package uses, in one place.

A Dagster upgrade that moves one of these is fixed here and nowhere else. The tox matrix
(dagster 1.11 / 1.12 / 1.13) imports this module first, and ``tests/test_dagster_private.py``
imports every module name listed here on the pinned Dagster.

Nothing here changes Dagster at import time: each behaviour change is an explicit installer
(``install_*``) that the process which wants it calls once (the executor, or a step child).
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import json
import os
import threading
from collections.abc import Iterable, Iterator
from typing import Any

from dagster import _check as check
from dagster._check import CheckError
from dagster._cli import api as _cli_api
from dagster._cli.api import _execute_run_command_body as execute_run_command_body
from dagster._cli.api import _execute_step_command_body as execute_step_command_body
from dagster._cli.api import _resume_run_command_body as resume_run_command_body
from dagster._config import post_process_config, validate_config
from dagster._core.definitions.reconstruct import ReconstructableJob
from dagster._core.errors import DagsterExecutionInterruptedError, DagsterExecutionStepNotFoundError
from dagster._core.events import DagsterEvent, EngineEventData
from dagster._core.execution import compute_logs as _compute_logs
from dagster._core.execution.plan.active import ActiveExecution
from dagster._core.execution.plan.plan import ExecutionPlan
from dagster._core.execution.plan.state import KnownExecutionState
from dagster._core.execution.plan.step import ExecutionStep
from dagster._core.execution.retries import RetryMode, get_retries_config
from dagster._core.execution.tags import get_tag_concurrency_limits_config
from dagster._core.executor.in_process import InProcessExecutor
from dagster._core.executor.step_delegating import (
    CheckStepHealthResult,
    StepDelegatingExecutor,
    StepHandler,
    StepHandlerContext,
)
from dagster._core.executor.step_delegating import step_delegating_executor as _sde_module
from dagster._core.launcher import CheckRunHealthResult, LaunchRunContext, ResumeRunContext, RunLauncher, WorkerStatus
from dagster._core.system_config.objects import ResolvedRunConfig
from dagster._grpc.types import ExecuteStepArgs
from dagster._record import copy as _copy_record
from dagster._record import is_record as _is_record
from dagster._serdes import ConfigurableClass, ConfigurableClassData, deserialize_value, serialize_value
from dagster._utils.error import serializable_error_info_from_exc_info
from dagster._utils.hosted_user_process import recon_job_from_origin
from dagster._utils.interrupts import capture_interrupts
from dagster.version import __version__ as _dagster_version

try:  # dagster >= 1.13 names sqlite's busy timeout; 1.11 / 1.12 leave pysqlite's 5 s default
    from dagster._core.storage.sqlite import SQLITE_BUSY_TIMEOUT_SECONDS
except ImportError:  # the value dagster 1.13 uses: a long busy wait beats a "database is locked"
    SQLITE_BUSY_TIMEOUT_SECONDS = 30


def _minor(version: str) -> tuple[int, int]:
    """(major, minor) of a Dagster version; a source checkout ("1!0+dev") counts as newest."""
    try:
        major, minor = version.split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return (999, 0)


_DAGSTER_MINOR = _minor(_dagster_version)

__all__ = [
    "PRELOAD_MODULES",
    "ActiveExecution",
    "CheckRunHealthResult",
    "CheckStepHealthResult",
    "ConfigurableClass",
    "ConfigurableClassData",
    "DagsterEvent",
    "DagsterExecutionInterruptedError",
    "DagsterExecutionStepNotFoundError",
    "EngineEventData",
    "ExecuteStepArgs",
    "InProcessExecutor",
    "KnownExecutionState",
    "LaunchRunContext",
    "ResumeRunContext",
    "RetryMode",
    "RunLauncher",
    "StepDelegatingExecutor",
    "StepHandler",
    "StepHandlerContext",
    "WorkerStatus",
    "capture_interrupts",
    "check",
    "copy_record",
    "deserialize_value",
    "execute_run_command_body",
    "execute_step_command_body",
    "finish_stored_event",
    "get_retries_config",
    "get_tag_concurrency_limits_config",
    "is_sql_event_storage",
    "keep_sqlite_connections",
    "kv_delete",
    "kv_scan",
    "post_process_config",
    "recon_job_from_origin",
    "resume_run_command_body",
    "run_interrupted",
    "serializable_error_info_from_exc_info",
    "serialize_value",
    "step_launch_policy",
    "stored_event_id",
    "validate_config",
]

# What a step needs beyond `import dagster`, imported once by the worker's fork server. Without
# these a step spends ~0.7 s importing SQLAlchemy, alembic and Dagster's storages (measured with
# DAGSTER_TASKIQ_SYNC_PROFILE_DIR). A rename in Dagster would silently cost that per step again:
# tests/test_dagster_private.py imports each one on the pinned Dagster. dagster_postgres is
# optional (skipped when not installed).
PRELOAD_MODULES = (
    "dagster._core.storage.sqlite_storage",
    "dagster._core.storage.runs.sqlite",
    "dagster._core.storage.event_log.sqlite",
    "dagster._core.storage.schedules.sqlite",
    "dagster._core.storage.local_compute_log_manager",
    "dagster._core.storage.fs_io_manager",
    "dagster._core.execution.api",
    "dagster._core.execution.plan.execute_plan",
    "dagster._core.definitions.reconstruct",
    "alembic.command",
    "alembic.config",
    "alembic.runtime.migration",
    "dagster._core.instance.factory",
    "dagster._core.storage.root",
    "dagster._core.storage.migration.utils",
    "dagster._core.system_config.composite_descent",
    "dagster._core.types.transform_typing",
    "dagster._core.workspace.autodiscovery",
    "dagster._core.definitions.repository_definition.repository_data_builder",
    "dagster._core.definitions.external_asset",
    "dagster._utils.test.definitions",
    "upath",
    "fsspec.implementations.local",
    "sqlalchemy.dialects.sqlite",
)
OPTIONAL_PRELOAD_MODULES = ("dagster_postgres",)


def copy_record(obj: Any, **changes: Any) -> Any:
    """A copy of a Dagster value object with some fields changed: ``@record`` classes in dagster
    1.12+, NamedTuples in 1.11 (ExecuteStepArgs changed between them)."""
    if _is_record(obj):
        return _copy_record(obj, **changes)
    return obj._replace(**changes)


# --- the key-value store's rows -------------------------------------------------------------------
# Dagster's run storage offers get/set of key-value rows but no delete or scan; liveness records
# are deleted when their run's execution ends, so the table holds O(running runs) of them.


def kv_delete(run_storage: Any, keys: Iterable[str]) -> int:
    """Delete key-value rows; 0 (nothing deleted) on a storage that is not SQL-backed."""
    keys = list(dict.fromkeys(keys))
    if not keys or not hasattr(run_storage, "connect"):
        return 0
    from dagster._core.storage.runs.schema import KeyValueStoreTable

    deleted = 0
    with run_storage.connect() as conn:
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            result = conn.execute(KeyValueStoreTable.delete().where(KeyValueStoreTable.c.key.in_(chunk)))
            deleted += result.rowcount or 0
    return deleted


def kv_insert_new(run_storage: Any, key: str, value: str) -> bool:
    """Insert a key-value row unless the key exists; True when this call inserted it.

    Atomic on SQL storages (the ``kvs`` table's unique index on ``key``): of two processes inserting
    the same key at once, exactly one gets True. Elsewhere a read then a write (not atomic)."""
    if not hasattr(run_storage, "connect"):
        if run_storage.get_cursor_values({key}).get(key) is not None:
            return False
        run_storage.set_cursor_values({key: value})
        return True
    from dagster._core.storage.runs.schema import KeyValueStoreTable
    from sqlalchemy.exc import IntegrityError

    try:
        with run_storage.connect() as conn:
            conn.execute(KeyValueStoreTable.insert().values(key=key, value=value))
    except IntegrityError:
        return False
    return True


def kv_scan(run_storage: Any, prefix: str, limit: int) -> list[tuple[str, str]]:
    """Up to ``limit`` key-value rows whose key starts with ``prefix`` (oldest rows first)."""
    if not hasattr(run_storage, "connect"):
        return []
    import sqlalchemy as db
    from dagster._core.storage.runs.schema import KeyValueStoreTable

    table = KeyValueStoreTable
    query = (
        db.select(table.c.key, table.c.value)
        .where(table.c.key.like(prefix.replace("%", r"\%") + "%"))
        .order_by(table.c.id)
        .limit(limit)
    )
    with run_storage.connect() as conn:
        return [(row[0], row[1]) for row in conn.execute(query).fetchall()]


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


# --- the orchestrator's loop ------------------------------------------------------------------------


class PollingStepDelegatingExecutor(StepDelegatingExecutor):
    """StepDelegatingExecutor with a hook run on every loop iteration that has steps in flight.

    Dagster's loop reads new events through ``_pop_events`` once per iteration; the hook lets
    the executor notice a run being canceled (``instance.report_run_canceling``, the UI) without
    waiting for a signal that an in-process caller never sends.

    It also builds each step's handler context with the known state *that step* needs (see
    ``_TaskiqActiveExecution.known_state_for``): Dagster builds it with the whole run's state for
    every launch and every health check, O(run size) each, O(n^2) per run.
    """

    def on_poll(self, instance: Any, run_id: str) -> None:
        """Called before every read of the event log; subclasses override it."""

    def _pop_events(self, instance, run_id, seen_storage_ids):  # Dagster's signature
        self.on_poll(instance, run_id)
        return super()._pop_events(instance, run_id, seen_storage_ids)

    def _get_step_handler_context(self, plan_context, steps, active_execution):  # Dagster's signature
        known_state_for = getattr(active_execution, "known_state_for", None)
        if known_state_for is None or len(steps) != 1:
            return super()._get_step_handler_context(plan_context, steps, active_execution)
        return StepHandlerContext(
            instance=plan_context.plan_data.instance,
            plan_context=plan_context,
            steps=steps,
            execute_step_args=ExecuteStepArgs(
                job_origin=plan_context.reconstructable_job.get_python_origin(),
                run_id=plan_context.dagster_run.run_id,
                step_keys_to_execute=[steps[0].key],
                instance_ref=plan_context.plan_data.instance.get_ref(),
                retry_mode=self.retries.for_inner_plan(),
                known_state=known_state_for(steps[0]),
                should_verify_step=self._should_verify_step,
                print_serialized_events=False,
            ),
            dagster_run=plan_context.dagster_run,
        )


# --- step submission order and run cancellation -----------------------------------------------------
# dagster-celery submits ready steps by (step priority + run priority), higher first, through
# ActiveExecution's sort_key_fn. StepDelegatingExecutor builds its ActiveExecution without one, so
# its module gets a subclass that takes the sort key from a context variable only taskiq_executor
# sets while it orchestrates; every other executor keeps Dagster's default order.
# The same subclass lets taskiq_executor stop a run being canceled (UI, report_run_canceling) through
# Dagster's own interrupt path: "termination signal, forwarding to steps", terminate_step for each
# running step, the run ends CANCELED. Dagster's interrupt flag is process-wide, so a per-run
# context variable says "this run's cancel was seen".

step_sort_key: contextvars.ContextVar[Any] = contextvars.ContextVar("dagster_taskiq_sync_step_sort_key", default=None)
run_interrupted: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "dagster_taskiq_sync_run_interrupted", default=None
)
_install_lock = threading.Lock()


step_launch_policy: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "dagster_taskiq_sync_step_launch_policy", default=None
)


class _TaskiqActiveExecution(ActiveExecution):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        sort_key = step_sort_key.get()
        if sort_key is not None and kwargs.get("sort_key_fn") is None:
            kwargs["sort_key_fn"] = sort_key
        self._taskiq_run_interrupted = run_interrupted.get()
        self._taskiq_policy = step_launch_policy.get()
        self._taskiq_replaying = False
        self._taskiq_dynamic_ancestors: dict[str, frozenset[str]] = {}
        super().__init__(*args, **kwargs)

    def check_for_interrupts(self) -> bool:
        return super().check_for_interrupts() or bool(
            self._taskiq_run_interrupted is not None and self._taskiq_run_interrupted()
        )

    # --- what a step's message carries ----------------------------------------------------------
    # Dagster hands every step the run's whole KnownExecutionState: every output produced so far
    # (~107 bytes each in a message: 110 KB for the gather step of a 1000-way fan-out), every
    # retry count and every dynamic mapping, built and validated (O(run size)) for each launch and
    # each health check. A step reads only its own retry count (attempt number, verify_step), the
    # ready outputs among its inputs' sources (StepExecutionContext.can_load) and the dynamic
    # mappings its plan is resolved with (those of its dynamic ancestors). tests/test_step_children.py
    # checks that the plan a step child builds from this state equals the one from the full state.

    def known_state_for(self, step: Any) -> KnownExecutionState:
        """The part of the run's known state ``step`` needs (see above)."""
        ready = self._step_outputs
        needed = {
            handle
            for step_input in step.step_inputs
            for handle in step_input.get_step_output_handle_dependencies()
            if handle in ready
        }
        attempts = self._retry_state.get_attempt_count(step.key)
        plan_state = self._plan.known_state
        return KnownExecutionState(
            previous_retry_attempts={step.key: attempts} if attempts else {},
            dynamic_mappings=self._dynamic_mappings_for(step.key),
            ready_outputs=needed,
            step_output_versions=plan_state.step_output_versions,
            parent_state=plan_state.parent_state,
        )

    def _dynamic_mappings_for(self, step_key: str) -> dict[str, Any]:
        mappings = self._completed_dynamic_outputs
        if not mappings:
            return {}
        try:
            wanted = self._dynamic_ancestors_of(step_key)
        except CheckError:  # a step outside this plan's executable steps (re-execution): all of them
            return dict(mappings)
        return {key: value for key, value in mappings.items() if key in wanted}

    def _dynamic_ancestors_of(self, step_key: str) -> frozenset[str]:
        """Keys of the upstream steps of ``step_key`` (transitively) that have dynamic outputs."""
        memo = self._taskiq_dynamic_ancestors
        stack = [step_key]
        while stack:
            key = stack[-1]
            if key in memo:
                stack.pop()
                continue
            deps = self.get_step_by_key(key).get_execution_dependency_keys()
            missing = [dep for dep in deps if dep not in memo]
            if missing:
                stack.extend(missing)
                continue
            found: set[str] = set()
            for dep in deps:
                found |= memo[dep]
                if any(output.is_dynamic for output in self.get_step_by_key(dep).step_outputs):
                    found.add(dep)
            memo[key] = frozenset(found)
            stack.pop()
        return memo[step_key]

    # --- how many steps go out, and when -------------------------------------------------------
    # taskiq_executor's launch policy (executor.LaunchPolicy) caps this run's steps in flight per
    # queue (fair sharing between runs on one queue, README "Fair sharing between runs"), refills
    # in batches (one SendMessageBatch rather than one call per step), and launches at most a
    # bounded number per loop iteration, so the loop reads results between launches. Replaying a
    # resumed run's events must see every step as Dagster would, so the policy is off meanwhile.

    def rebuild_from_events(self, dagster_events: Any) -> Any:
        self._taskiq_replaying = True
        try:
            return super().rebuild_from_events(dagster_events)
        finally:
            self._taskiq_replaying = False

    def get_steps_to_execute(self, limit: int | None = None) -> Any:
        policy = self._taskiq_policy
        if policy is None or self._taskiq_replaying:
            return super().get_steps_to_execute(limit)
        if policy.per_iteration is not None:
            limit = policy.per_iteration if limit is None else min(limit, policy.per_iteration)
        held: list[str] = []
        if policy.capped:
            self._update()
            held = self._over_caps(policy)
        try:
            batch = super().get_steps_to_execute(limit)
        finally:
            if held:
                self._executable.extend(held)
        if batch:
            policy.launching(len(batch))
        return batch

    def _over_caps(self, policy: Any) -> list[str]:
        """Take the ready steps the policy does not let out yet off ``_executable``; returns them."""
        if not self._executable:
            return []
        in_flight: dict[str, int] = collections.Counter(
            policy.queue_of(self.get_step_by_key(key)) for key in self._in_flight
        )
        room: dict[str, int] = {}
        allowed, held = [], []
        for key in sorted(self._executable, key=lambda k: self._sort_key_fn(self.get_step_by_key(k))):
            queue = policy.queue_of(self.get_step_by_key(key))
            if queue not in room:
                room[queue] = policy.room(queue, in_flight.get(queue, 0))
            if room[queue] > 0:
                room[queue] -= 1
                allowed.append(key)
            else:
                held.append(key)
                policy.held_back(queue)
        self._executable = allowed
        return held


def install_step_sort_key() -> None:
    """Let taskiq_executor order ready steps by priority and stop canceled runs through Dagster's
    interrupt path (idempotent; other executors unchanged)."""
    with _install_lock:
        if _sde_module.ActiveExecution is ActiveExecution:
            _sde_module.ActiveExecution = _TaskiqActiveExecution  # type: ignore[misc]  # Dagster has no hook for it


# --- compute log mirroring in step children -------------------------------------------------------
# Dagster's local compute log manager captures a step's stdout/stderr into files and mirrors them
# back to the process's own streams by starting, per stream and per step, a `tail -F` process and
# a Python interpreter that watches it for orphaning: four processes per step, ~50 ms and most of
# a core's worth of CPU on a busy worker. A step child runs many steps, so it swaps that for a
# thread that copies the file to the original stream. Capture itself (the files the UI shows) is
# unchanged.


def install_thread_log_mirror() -> None:
    """Install the thread-based mirror in this process (step children only)."""
    _compute_logs.execute_posix_tail = _thread_tail


@contextlib.contextmanager
def _thread_tail(path: str, stream: Any) -> Iterator[tuple[None, None]]:
    fileno = _compute_logs._fileno(stream)
    target = os.dup(fileno) if fileno is not None else None  # the stream before redirection
    stop = threading.Event()

    def copy(source: Any) -> None:
        while True:
            chunk = source.read(65536)
            if chunk:
                if target is not None:
                    with contextlib.suppress(OSError):
                        os.write(target, chunk)
                continue
            if stop.is_set():
                return
            stop.wait(0.2)

    source = open(path, "rb")
    thread = threading.Thread(target=copy, args=(source,), name="compute-log-mirror", daemon=True)
    thread.start()
    try:
        yield (None, None)
    finally:
        stop.set()
        thread.join(5)
        source.close()
        if target is not None:
            os.close(target)


# --- execution plans in step children ---------------------------------------------------------------
# Dagster's step command builds the whole job's execution plan (and resolves its run config) for
# every step, then keeps the one step: O(job size) per step, ~20 ms for a 100-op job, O(n^2) for
# the run. A step child runs many steps of the same run, so it builds the full plan once per
# (job, run config) and takes each step's subset of it, with that step's known state, exactly as
# Dagster's plan builder does at its end. Jobs with dynamic outputs (whose plans depend on the
# known state) and repository load data are built the usual way.

_original_create_execution_plan = _cli_api.create_execution_plan
_PLAN_CACHE: collections.OrderedDict[Any, Any] = collections.OrderedDict()
_PLAN_CACHE_SIZE = 8


def _full_plan(job: Any, run_config: Any) -> Any:
    """(job definition, resolved config, full plan) for a static job, None otherwise; cached."""
    try:
        key = (repr(job), json.dumps(run_config or {}, sort_keys=True, default=repr))
    except (TypeError, ValueError):
        return None
    if key not in _PLAN_CACHE:
        job_def = job.get_definition()
        resolved = ResolvedRunConfig.build(job_def, run_config or {})
        full = ExecutionPlan.build(job_def, resolved)
        static = all(isinstance(step, ExecutionStep) for step in full.step_dict.values())
        _PLAN_CACHE[key] = (job_def, resolved, full) if static else None
        while len(_PLAN_CACHE) > _PLAN_CACHE_SIZE:
            _PLAN_CACHE.popitem(last=False)
    _PLAN_CACHE.move_to_end(key)
    return _PLAN_CACHE[key]


def cached_create_execution_plan(
    job,
    run_config=None,
    step_keys_to_execute=None,
    known_state=None,
    instance_ref=None,
    tags=None,
    repository_load_data=None,
):
    """``create_execution_plan`` for one step, from a cached full plan where that is exact."""
    usable = (
        isinstance(job, ReconstructableJob)
        and step_keys_to_execute
        and instance_ref is None
        and not tags
        and repository_load_data is None
        and not (known_state is not None and known_state.dynamic_mappings)
    )
    entry = _full_plan(job, run_config) if usable else None
    if entry is None:
        return _original_create_execution_plan(
            job, run_config, step_keys_to_execute, known_state, instance_ref, tags, repository_load_data
        )
    job_def, resolved, full = entry
    plan = full._replace(known_state=known_state or KnownExecutionState())
    return plan.build_subset_plan(step_keys_to_execute, job_def, resolved)


# Dagster also validates the whole run config against the whole job's config schema when it
# creates each step's execution context (ResolvedRunConfig.build: one field per op, ~0.1 ms per
# op here, so O(job size) per step, O(n^2) per run: the main reason a step of a 1000-op fan-out
# took longer to set up than a step of a 100-op one). The result depends only on the job
# definition and the run config, and a step child runs many steps of the same run.

_original_resolved_build = ResolvedRunConfig.build
_RESOLVED_CACHE: collections.OrderedDict[Any, Any] = collections.OrderedDict()


def cached_resolved_run_config(job_def: Any, run_config: Any = None) -> Any:
    """``ResolvedRunConfig.build``, remembered per (job definition object, run config)."""
    try:
        key = (id(job_def), json.dumps(run_config or {}, sort_keys=True, default=repr))
    except (TypeError, ValueError):
        return _original_resolved_build(job_def, run_config)
    hit = _RESOLVED_CACHE.get(key)
    if hit is not None and hit[0] is job_def:  # the definition itself is kept, so its id is not reused
        _RESOLVED_CACHE.move_to_end(key)
        return hit[1]
    resolved = _original_resolved_build(job_def, run_config)  # invalid config raises, uncached
    _RESOLVED_CACHE[key] = (job_def, resolved)
    while len(_RESOLVED_CACHE) > _PLAN_CACHE_SIZE:
        _RESOLVED_CACHE.popitem(last=False)
    return resolved


def install_cached_step_plans() -> None:
    """Install the plan and run-config caches in this process (step children only)."""
    _cli_api.create_execution_plan = cached_create_execution_plan
    ResolvedRunConfig.build = staticmethod(cached_resolved_run_config)  # type: ignore[method-assign]  # no hook


def retry_mode_of_run(job: Any, run_config: Any) -> Any:
    """The retry mode a step of this run executes with, from the run's own executor config
    (what StepDelegatingExecutor hands its step workers: deferred when retries are enabled)."""
    entry = _full_plan(job, run_config)
    resolved = entry[1] if entry is not None else ResolvedRunConfig.build(job.get_definition(), run_config or {})
    config = resolved.execution.execution_engine_config or {}
    retries = config.get("retries") if isinstance(config, dict) else None
    mode = RetryMode.from_config(retries) if retries else RetryMode.ENABLED
    return (mode or RetryMode.ENABLED).for_inner_plan()


# --- who picked a step up, in Dagster's own "step worker started" event --------------------------
# Each event is a write to the run's event log, the scarcest resource of a sqlite instance under
# parallel steps. Rather than a separate engine event per step, the step child adds the worker,
# host, queue and message details to the STEP_WORKER_STARTED event Dagster writes anyway.

step_worker_details: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "dagster_taskiq_sync_step_worker_details", default=None
)
_original_step_worker_started = DagsterEvent.step_worker_started


def _step_worker_started(log_manager, job_name, message, metadata, step_key):
    details = step_worker_details.get()
    if details is not None:
        suffix, extra = details
        message = f"{message.rstrip('.')}: {suffix}"
        metadata = {**metadata, **extra}
    return _original_step_worker_started(log_manager, job_name, message, metadata, step_key)


def install_step_worker_details() -> None:
    """Install the richer STEP_WORKER_STARTED event in this process (step children only)."""
    DagsterEvent.step_worker_started = staticmethod(_step_worker_started)  # type: ignore[method-assign]  # no hook


# --- Resuming an event write that committed part of its rows (db_retry) ----------------------
# ``store_event`` writes the event row, then (for some event types) a mirror row in sqlite's
# index shard, the asset row and its tags, and the asset-check row. A transient database error
# after the first commit leaves a prefix written; these finish the rest without duplicating it.
# How the rest is written differs by Dagster minor, which is why it lives here:
# - 1.13 writes the asset row and its tags in one ``index_transaction`` through
#   ``_store_asset_event`` / ``_store_asset_event_tags``; 1.11 / 1.12 make two separate public
#   calls (``store_asset_event``, then ``store_asset_event_tags``), so either may be missing.
# - sqlite 1.12 / 1.13 mirror asset-check events into the index shard and key the check row by
#   the mirror's id; 1.11 does not mirror them and stores the check row with no event id.


# 1.13+: ``store_event`` writes an asset event's tags and asset row in one index transaction.
_ONE_ASSET_TRANSACTION = _DAGSTER_MINOR >= (1, 13)


def is_sql_event_storage(storage: Any) -> bool:
    from dagster._core.storage.event_log.sql_event_log import SqlEventLogStorage

    return isinstance(storage, SqlEventLogStorage)


def stored_event_id(storage: Any, event: Any, *, index: bool) -> int | None:
    """The id of the row holding exactly ``event`` in its run's event log (or, ``index=True``,
    sqlite's cross-run index shard), or None."""
    import sqlalchemy as db
    from dagster._core.storage.event_log.schema import SqlEventLogStorageTable as table

    body = _event_row(storage, event)["event"]
    connection = storage.index_connection() if index else storage.run_connection(event.run_id)
    with connection as conn:
        query = (
            db.select(table.c.id)
            .where(table.c.run_id == event.run_id, table.c.event == body)
            .order_by(table.c.id)
            .limit(1)
        )
        found = conn.execute(query).scalar()
    return None if found is None else int(found)


def _event_row(storage: Any, event: Any) -> dict:
    to_row = getattr(storage, "_event_to_row", None)  # what prepare_insert_event writes
    if to_row is not None:
        return to_row(event)
    return {"event": serialize_value(event)}


def finish_stored_event(storage: Any, event: Any, event_id: int) -> None:
    """The writes ``store_event`` makes after the event row, for an event whose row was
    committed by an attempt that then failed. Mirrors ``store_event`` of
    ``SqlEventLogStorage`` / ``PostgresEventLogStorage`` and ``SqliteEventLogStorage`` on the
    installed Dagster minor."""
    from dagster._core.events import ASSET_CHECK_EVENTS, ASSET_EVENTS
    from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage

    if not event.is_dagster_event:
        return
    if isinstance(storage, SqliteEventLogStorage):
        _finish_sqlite_mirror(storage, event)
        return
    # One event table (PostgreSQL, MySQL, consolidated sqlite).
    event_type = event.dagster_event_type
    if event_type in ASSET_EVENTS and event.dagster_event.asset_key:
        _store_asset_rows(storage, event, event_id)
    if event_type in ASSET_CHECK_EVENTS:
        storage.store_asset_check_event(event, event_id)


def _finish_sqlite_mirror(storage: Any, event: Any) -> None:
    """Per-run shards: asset, asset-check (1.12+) and run-status events are mirrored into the
    index shard, and the asset / check rows key on the mirror's id."""
    from dagster._core.events import (
        ASSET_CHECK_EVENTS,
        ASSET_EVENTS,
        EVENT_TYPE_TO_PIPELINE_RUN_STATUS,
    )

    event_type = event.dagster_event_type
    check_mirrored = _DAGSTER_MINOR >= (1, 12)
    mirrored = (
        event_type in ASSET_EVENTS
        or (check_mirrored and event_type in ASSET_CHECK_EVENTS)
        or event_type in EVENT_TYPE_TO_PIPELINE_RUN_STATUS
    )
    mirror_id = stored_event_id(storage, event, index=True) if mirrored else None
    if event_type in ASSET_EVENTS and _ONE_ASSET_TRANSACTION:
        # 1.13 commits the mirror, the tags and the asset row in one transaction: a mirror
        # row means all three are there; no mirror row means none is.
        if mirror_id is None:
            with storage.index_transaction() as conn:
                mirror_id = _inserted_id(conn.execute(storage.prepare_insert_event(event)))
                storage._store_asset_event_tags(conn, [event], [mirror_id])
                storage._store_asset_event(conn, event, mirror_id)
        return
    if mirrored and mirror_id is None:
        with storage.index_connection() as conn:
            mirror_id = _inserted_id(conn.execute(storage.prepare_insert_event(event)))
    if event_type in ASSET_EVENTS:
        _store_asset_rows(storage, event, check.not_none(mirror_id))
    elif event_type in ASSET_CHECK_EVENTS:
        # sqlite reports "locked" before writing, so a failed check write wrote nothing.
        storage.store_asset_check_event(event, mirror_id)


def _store_asset_rows(storage: Any, event: Any, event_id: int) -> None:
    """The asset row and the asset-event tags of stored event ``event_id``."""
    if _ONE_ASSET_TRANSACTION:
        # 1.13: tags and asset row commit together, so tags present means both are written
        # (an event with no tags is rewritten harmlessly: the asset row is an upsert).
        if not _has_asset_event_tags(storage, event_id):
            with storage.index_transaction() as conn:
                storage._store_asset_event_tags(conn, [event], [event_id])
                storage._store_asset_event(conn, event, event_id)
        return
    # 1.11 / 1.12: the asset row is an upsert (safe to repeat); the tags are plain inserts, so
    # they are written only when the failed attempt wrote none.
    storage.store_asset_event(event, event_id)
    if not _has_asset_event_tags(storage, event_id):
        storage.store_asset_event_tags([event], [event_id])


def _has_asset_event_tags(storage: Any, event_id: int) -> bool:
    import sqlalchemy as db
    from dagster._core.storage.event_log.schema import AssetEventTagsTable as tags

    with storage.index_connection() as conn:
        query = db.select(tags.c.id).where(tags.c.event_id == event_id).limit(1)
        return conn.execute(query).scalar() is not None


def _inserted_id(result: Any) -> int:
    key = result.inserted_primary_key
    if not key or key[0] is None:
        raise RuntimeError("the event log did not return the id of the event it stored")
    return int(key[0])
