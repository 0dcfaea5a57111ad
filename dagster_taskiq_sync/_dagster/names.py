"""The private Dagster names this package uses, re-exported, and the modules a step child preloads.

A Dagster upgrade that moves one of these is fixed here and nowhere else;
``tests/unit/test_dagster_private.py`` imports every name in ``__all__`` and every module in
``PRELOAD_MODULES`` on each Dagster minor of the matrix.
"""

from __future__ import annotations

from typing import Any

from dagster import _check as check
from dagster._cli.api import _execute_run_command_body as execute_run_command_body
from dagster._cli.api import _execute_step_command_body as execute_step_command_body
from dagster._cli.api import _resume_run_command_body as resume_run_command_body
from dagster._config import post_process_config, validate_config
from dagster._core.errors import DagsterExecutionInterruptedError, DagsterExecutionStepNotFoundError
from dagster._core.events import DagsterEvent, EngineEventData
from dagster._core.execution.plan.active import ActiveExecution
from dagster._core.execution.plan.objects import StepFailureData
from dagster._core.execution.plan.state import KnownExecutionState
from dagster._core.execution.retries import RetryMode, get_retries_config
from dagster._core.execution.tags import get_tag_concurrency_limits_config
from dagster._core.executor.in_process import InProcessExecutor
from dagster._core.executor.step_delegating import (
    CheckStepHealthResult,
    StepDelegatingExecutor,
    StepHandler,
    StepHandlerContext,
)
from dagster._core.launcher import CheckRunHealthResult, LaunchRunContext, ResumeRunContext, RunLauncher, WorkerStatus
from dagster._grpc.types import ExecuteStepArgs
from dagster._record import copy as _copy_record
from dagster._record import is_record as _is_record
from dagster._serdes import ConfigurableClass, ConfigurableClassData, deserialize_value, serialize_value
from dagster._utils.error import SerializableErrorInfo, serializable_error_info_from_exc_info
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
    "SerializableErrorInfo",
    "StepDelegatingExecutor",
    "StepFailureData",
    "StepHandler",
    "StepHandlerContext",
    "WorkerStatus",
    "capture_interrupts",
    "check",
    "copy_record",
    "deserialize_value",
    "execute_run_command_body",
    "execute_step_command_body",
    "get_retries_config",
    "get_tag_concurrency_limits_config",
    "post_process_config",
    "recon_job_from_origin",
    "resume_run_command_body",
    "serializable_error_info_from_exc_info",
    "serialize_value",
    "validate_config",
]

# What a step needs beyond `import dagster`, imported once by the worker's fork server. Without
# these a step spends ~0.7 s importing SQLAlchemy, alembic and Dagster's storages (measured with
# DAGSTER_TASKIQ_SYNC_PROFILE_DIR). A rename in Dagster would silently cost that per step again:
# tests/unit/test_dagster_private.py imports each one on the pinned Dagster. dagster_postgres is
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
