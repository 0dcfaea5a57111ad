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
