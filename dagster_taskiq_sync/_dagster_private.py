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
from dagster._serdes import deserialize_value, serialize_value
from dagster._config import post_process_config, validate_config
