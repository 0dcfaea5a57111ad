"""The ``dagster-taskiq-sync`` command: ``worker start|list|terminate``, ``queues create``, ...

One module per command group: ``cli/worker`` (``worker ...``), ``cli/queues`` (``queues ...``),
``cli/tools`` (``iam-policy``, ``celery-mapping``, ``local-endpoint``, ``dashboard``), and
``cli/logs`` (the log set-up they share). The console script is ``dagster_taskiq_sync.cli:main``.
"""

from __future__ import annotations

import click

from dagster_taskiq_sync.cli import queues as queue_commands
from dagster_taskiq_sync.cli import tools
from dagster_taskiq_sync.cli import worker as worker_commands
from dagster_taskiq_sync.cli.logs import LOG_LEVELS, QUIET_LOGGERS, configure_logging
from dagster_taskiq_sync.cli.queues import queues_create, queues_redrive, queues_stats
from dagster_taskiq_sync.cli.tools import celery_mapping, dashboard, iam_policy, local_endpoint
from dagster_taskiq_sync.cli.worker import parse_celery_args, worker_list, worker_start, worker_terminate
from dagster_taskiq_sync.config.worker_config import load_executor_config, settings_from_yaml

__all__ = [
    "LOG_LEVELS",
    "QUIET_LOGGERS",
    "celery_mapping",
    "configure_logging",
    "dashboard",
    "iam_policy",
    "load_executor_config",
    "local_endpoint",
    "main",
    "parse_celery_args",
    "queues_create",
    "queues_redrive",
    "queues_stats",
    "settings_from_yaml",
    "worker_list",
    "worker_start",
    "worker_terminate",
]


@click.group()
def main() -> None:
    """Run Dagster steps on SQS through TaskIQ."""


main.add_command(worker_commands.worker)
main.add_command(queue_commands.queues)
for _command in (tools.iam_policy, tools.celery_mapping, tools.local_endpoint, tools.dashboard):
    main.add_command(_command)
