"""Dagster behaviour a step child installs: thread-based compute log mirroring, cached
execution plans, the worker details in Dagster's STEP_WORKER_STARTED event, and the soft time
limit as Dagster's own interrupt."""

from __future__ import annotations

import collections
import contextlib
import contextvars
import json
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

from dagster._cli import api as _cli_api
from dagster._core.definitions.reconstruct import ReconstructableJob
from dagster._core.errors import DagsterExecutionInterruptedError
from dagster._core.events import DagsterEvent
from dagster._core.execution import compute_logs as _compute_logs
from dagster._core.execution.plan.plan import ExecutionPlan
from dagster._core.execution.plan.state import KnownExecutionState
from dagster._core.execution.plan.step import ExecutionStep
from dagster._core.execution.retries import RetryMode
from dagster._core.system_config.objects import ResolvedRunConfig
from dagster._utils.interrupts import pop_captured_interrupt

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


# --- soft time limits -------------------------------------------------------------------------------
# Celery's soft time limit: billiard sends the pool process SIGUSR1 and the task gets
# SoftTimeLimitExceeded. Here the worker sends the step child that signal, and the op gets Dagster's
# own interrupt: the handler calls whatever SIGINT handler Dagster has installed at that moment.
# Inside an op (or an IO manager) Dagster's handler raises DagsterExecutionInterruptedError, which
# the op may clean up after, and which Dagster turns into the step's failure, or a retry under its
# RetryPolicy; the handler raises it as SoftTimeLimitExceeded (a subclass, so Dagster handles it the
# same), carrying the sentence that names the limit. Between Dagster's interrupt checkpoints its
# handler only records the interrupt, and before Dagster runs the step (the job still loading) there
# is nothing to interrupt yet: the child takes it back and tries again a moment later, so the
# interrupt lands in the op and says why.

SOFT_LIMIT_RETRY_SECONDS = 0.1
_armed: dict[str, str | None] = {"sentence": None}  # set while a step with a soft limit runs


class SoftTimeLimitExceeded(DagsterExecutionInterruptedError):
    """The step ran past its soft time limit (Celery's name); an interrupt to Dagster."""


def _on_soft_limit(signum: int, frame: Any) -> None:
    sentence = _armed["sentence"]
    if sentence is None:
        return  # a late signal: no step with a soft limit runs here now
    handler = signal.getsignal(signal.SIGINT)
    try:
        if callable(handler):
            handler(signal.SIGINT, frame)
    except DagsterExecutionInterruptedError:
        _armed["sentence"] = None
        raise SoftTimeLimitExceeded(sentence) from None
    except KeyboardInterrupt:  # Python's own handler: Dagster is not running the step yet
        pass
    pop_captured_interrupt()  # Dagster only recorded it: raise it ourselves at the next try
    retry = threading.Timer(SOFT_LIMIT_RETRY_SECONDS, os.kill, (os.getpid(), signum))
    retry.daemon = True
    retry.start()


def install_soft_time_limit(signum: int) -> Any:
    """Take ``signum`` as "soft time limit reached" in this process (a step child; an eager run's
    process while the run executes, main thread only); returns the handler it replaced."""
    return signal.signal(signum, _on_soft_limit)


def arm_soft_time_limit(sentence: str | None) -> None:
    """From now on the soft-limit signal interrupts the running step with ``sentence`` (None: it is
    ignored); for code that cannot use :func:`soft_time_limit`'s block (an executor's generator)."""
    _armed["sentence"] = sentence


@contextlib.contextmanager
def soft_time_limit(sentence: str | None) -> Iterator[None]:
    """While this block runs a step, the soft-limit signal interrupts it with ``sentence``."""
    _armed["sentence"] = sentence
    try:
        yield
    finally:
        _armed["sentence"] = None
