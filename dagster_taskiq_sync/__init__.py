"""Run Dagster steps on AWS SQS through TaskIQ: a drop-in for dagster-celery."""
# ruff: noqa: E402  (the version check runs before the imports that would fail without it)

from .versions import check_versions

check_versions()  # before anything imports Dagster's private modules: one clear sentence, not an ImportError

from .errors import ConfigError, EndpointUnreachableError, QueueMissingError, TaskiqSyncError
from .executor import taskiq_executor
from .launcher import TaskiqRunLauncher
from .version import __version__
from .worker import Worker
from .worker_config import WorkerConfig

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
