"""Every private Dagster import this package uses, in one place.

A Dagster upgrade that moves one of these is fixed here and nowhere else. The tox matrix
(dagster 1.11 / 1.12 / 1.13) imports this module first.
"""

# ruff: noqa: F401
from dagster._cli.api import _execute_step_command_body as execute_step_command_body
from dagster._core.events import DagsterEvent, EngineEventData
from dagster._core.execution.retries import RetryMode, get_retries_config
from dagster._core.executor.step_delegating import (
    CheckStepHealthResult,
    StepDelegatingExecutor,
    StepHandler,
    StepHandlerContext,
)
from dagster._core.execution.tags import get_tag_concurrency_limits_config
from dagster._grpc.types import ExecuteStepArgs
from dagster._serdes import ConfigurableClassData, deserialize_value, serialize_value
from dagster._config import post_process_config, validate_config
from dagster._utils.hosted_user_process import recon_job_from_origin
from dagster._utils.error import serializable_error_info_from_exc_info
from dagster._core.errors import DagsterExecutionInterruptedError


class PollingStepDelegatingExecutor(StepDelegatingExecutor):
    """StepDelegatingExecutor with a hook run on every loop iteration that has steps in flight.

    Dagster's loop reads new events through ``_pop_events`` once per iteration; the hook lets
    the executor notice a run being canceled (``instance.report_run_canceling``, the UI) without
    waiting for a signal that an in-process caller never sends.
    """

    def on_poll(self, instance, run_id: str) -> None:  # pragma: no cover - overridden
        pass

    def _pop_events(self, instance, run_id, seen_storage_ids):  # type: ignore[override]
        self.on_poll(instance, run_id)
        return super()._pop_events(instance, run_id, seen_storage_ids)
from dagster._record import copy as _copy_record
from dagster._record import is_record as _is_record


def copy_record(obj, **changes):
    """A copy of a Dagster value object with some fields changed: ``@record`` classes in dagster
    1.12+, NamedTuples in 1.11 (ExecuteStepArgs changed between them)."""
    if _is_record(obj):
        return _copy_record(obj, **changes)
    return obj._replace(**changes)
from dagster._cli.api import _execute_run_command_body as execute_run_command_body
from dagster._cli.api import _resume_run_command_body as resume_run_command_body
from dagster._grpc.types import ExecuteRunArgs, ResumeRunArgs
from dagster._utils.interrupts import capture_interrupts
from dagster._core.launcher import CheckRunHealthResult, LaunchRunContext, ResumeRunContext, RunLauncher, WorkerStatus
from dagster._serdes import ConfigurableClass
from dagster._core.executor.in_process import InProcessExecutor

# --- step submission order ---------------------------------------------------------------------
# dagster-celery submits ready steps by (step priority + run priority), higher first, through
# ActiveExecution's sort_key_fn. StepDelegatingExecutor builds its ActiveExecution without one, so
# its module gets a subclass that takes the sort key from a context variable only taskiq_executor
# sets while it orchestrates; every other executor keeps Dagster's default order.
import contextlib as _contextlib
import contextvars as _contextvars

from dagster._core.execution.plan.active import ActiveExecution as _ActiveExecution
from dagster._core.executor.step_delegating import step_delegating_executor as _sde_module

step_sort_key = _contextvars.ContextVar("dagster_taskiq_sync_step_sort_key", default=None)


class _SortableActiveExecution(_ActiveExecution):
    def __init__(self, *args, **kwargs):
        sort_key = step_sort_key.get()
        if sort_key is not None and kwargs.get("sort_key_fn") is None:
            kwargs["sort_key_fn"] = sort_key
        super().__init__(*args, **kwargs)


if _sde_module.ActiveExecution is _ActiveExecution:
    _sde_module.ActiveExecution = _SortableActiveExecution

# --- compute log mirroring in step children ------------------------------------------------------
# Dagster's local compute log manager captures a step's stdout/stderr into files and mirrors them
# back to the process's own streams by starting, per stream and per step, a `tail -F` process and
# a Python interpreter that watches it for orphaning: four processes per step, ~50 ms and most of
# a core's worth of CPU on a busy worker. A step child runs many steps, so it swaps that for a
# thread that copies the file to the original stream. Capture itself (the files the UI shows) is
# unchanged.
from dagster._core.execution import compute_logs as _compute_logs


def use_thread_log_mirror() -> None:
    """Install the thread-based mirror in this process (step children only)."""
    _compute_logs.execute_posix_tail = _thread_tail


@_contextlib.contextmanager
def _thread_tail(path, stream):
    import os
    import threading

    fileno = _compute_logs._fileno(stream)
    target = os.dup(fileno) if fileno is not None else None  # the stream before redirection
    stop = threading.Event()

    def copy(source) -> None:
        while True:
            chunk = source.read(65536)
            if chunk:
                if target is not None:
                    try:
                        os.write(target, chunk)
                    except OSError:
                        pass
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
import collections as _collections
import json as _json

from dagster._cli import api as _cli_api
from dagster._core.definitions.reconstruct import ReconstructableJob as _ReconstructableJob
from dagster._core.execution.plan.plan import ExecutionPlan as _ExecutionPlan
from dagster._core.execution.plan.state import KnownExecutionState as _KnownExecutionState
from dagster._core.execution.plan.step import ExecutionStep as _ExecutionStep
from dagster._core.system_config.objects import ResolvedRunConfig as _ResolvedRunConfig

_original_create_execution_plan = _cli_api.create_execution_plan
_PLAN_CACHE: "_collections.OrderedDict[tuple, tuple | None]" = _collections.OrderedDict()
_PLAN_CACHE_SIZE = 8


def cached_create_execution_plan(job, run_config=None, step_keys_to_execute=None, known_state=None,
                                 instance_ref=None, tags=None, repository_load_data=None):
    """``create_execution_plan`` for one step, from a cached full plan where that is exact."""
    usable = (
        isinstance(job, _ReconstructableJob)
        and step_keys_to_execute
        and instance_ref is None
        and not tags
        and repository_load_data is None
        and not (known_state is not None and known_state.dynamic_mappings)
    )
    if not usable:
        return _original_create_execution_plan(job, run_config, step_keys_to_execute, known_state, instance_ref,
                                               tags, repository_load_data)
    try:
        key = (repr(job), _json.dumps(run_config or {}, sort_keys=True, default=repr))
    except (TypeError, ValueError):
        key = None
    entry = _PLAN_CACHE.get(key) if key is not None else None
    if key is not None and key not in _PLAN_CACHE:
        job_def = job.get_definition()
        resolved = _ResolvedRunConfig.build(job_def, run_config or {})
        full = _ExecutionPlan.build(job_def, resolved)
        static = all(isinstance(step, _ExecutionStep) for step in full.step_dict.values())
        entry = (job_def, resolved, full) if static else None
        _PLAN_CACHE[key] = entry
        while len(_PLAN_CACHE) > _PLAN_CACHE_SIZE:
            _PLAN_CACHE.popitem(last=False)
    if entry is None:
        return _original_create_execution_plan(job, run_config, step_keys_to_execute, known_state, instance_ref,
                                               tags, repository_load_data)
    _PLAN_CACHE.move_to_end(key)
    job_def, resolved, full = entry
    plan = full._replace(known_state=known_state or _KnownExecutionState())
    return plan.build_subset_plan(step_keys_to_execute, job_def, resolved)


def use_cached_step_plans() -> None:
    """Install the plan cache in this process (step children only)."""
    _cli_api.create_execution_plan = cached_create_execution_plan


# --- who picked a step up, in Dagster's own "step worker started" event --------------------------
# Each event is a write to the run's event log, the scarcest resource of a sqlite instance under
# parallel steps. Rather than a separate engine event per step, the step child adds the worker,
# host, queue and message details to the STEP_WORKER_STARTED event Dagster writes anyway.
step_worker_details = _contextvars.ContextVar("dagster_taskiq_sync_step_worker_details", default=None)
_original_step_worker_started = DagsterEvent.step_worker_started


def _step_worker_started(log_manager, job_name, message, metadata, step_key):
    details = step_worker_details.get()
    if details is not None:
        suffix, extra = details
        message = f"{message.rstrip('.')}: {suffix}"
        metadata = {**metadata, **extra}
    return _original_step_worker_started(log_manager, job_name, message, metadata, step_key)


def use_step_worker_details() -> None:
    """Install the richer STEP_WORKER_STARTED event in this process (step children only)."""
    DagsterEvent.step_worker_started = staticmethod(_step_worker_started)
