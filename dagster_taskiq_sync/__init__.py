"""Run Dagster steps on AWS SQS through TaskIQ: a drop-in for dagster-celery."""
# ruff: noqa: E402  (the version check runs before the imports that would fail without it)

from dagster_taskiq_sync.versions import check_versions

check_versions()  # before anything imports Dagster's private modules: one clear sentence, not an ImportError

from dagster_taskiq_sync.config.worker_config import WorkerConfig
from dagster_taskiq_sync.errors import ConfigError, EndpointUnreachableError, QueueMissingError, TaskiqSyncError
from dagster_taskiq_sync.orchestrator.executor import taskiq_executor
from dagster_taskiq_sync.orchestrator.launcher import TaskiqRunLauncher
from dagster_taskiq_sync.version import __version__
from dagster_taskiq_sync.worker.worker import Worker

__all__ = [
    "ConfigError",
    "EndpointUnreachableError",
    "QueueMissingError",
    "TaskiqRunLauncher",
    "TaskiqSyncError",
    "Worker",
    "WorkerConfig",
    "__version__",
    "taskiq_executor",
]
