"""``dagster-taskiq-sync worker start|list|terminate``.

Flags follow ``dagster-celery worker start`` so deployment scripts carry over: ``worker start``
builds a :class:`~.worker_config.WorkerConfig` and runs a :class:`~.worker.Worker` until a signal
stops it.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import click

from dagster_taskiq_sync.cli.logs import LOG_LEVELS, configure_logging
from dagster_taskiq_sync.config.worker_config import STEP_NICENESS, settings_from_yaml
from dagster_taskiq_sync.errors import ConfigError, TaskiqSyncError
from dagster_taskiq_sync.wire.lanes import BULK_YIELD


@click.group()
def worker() -> None:
    """Start workers."""


@worker.command("start")
@click.option(
    "-y",
    "--config-yaml",
    type=click.Path(dir_okay=False),
    help="Run-config YAML with the executor block (the same file the job uses).",
)
@click.option(
    "-q",
    "--queue",
    "queues",
    multiple=True,
    help="Queue to consume (repeatable). Default: the config's task_default_queue ('dagster').",
)
@click.option("-n", "--name", help="Worker name (default dagster-XXXXXX); '@HOST' is appended.")
@click.option(
    "-c",
    "--concurrency",
    type=click.IntRange(1, 1000),
    help="Most steps running at once in this worker (worker threads). Default: worker_concurrency or the CPU count.",
)
@click.option(
    "-i",
    "--includes",
    multiple=True,
    help="Python module every step should have imported (repeatable); imported once, before steps fork.",
)
@click.option(
    "-l", "--loglevel", type=click.Choice(LOG_LEVELS, case_sensitive=False), default="INFO", show_default=True
)
@click.option(
    "--debug-logger",
    "debug_loggers",
    multiple=True,
    metavar="NAME",
    help="A library logger (botocore, aiobotocore, taskiq_aio_sqs, ...) that logs at --loglevel too (repeatable); "
    "they stay at WARNING otherwise: botocore's DEBUG lines hold credentials.",
)
@click.option(
    "--shutdown-timeout",
    type=click.FloatRange(0),
    default=60.0,
    show_default=True,
    help="Seconds running steps get to finish after SIGTERM before they are killed.",
)
@click.option(
    "--heartbeat-interval",
    type=click.FloatRange(0.1, 3600),
    default=5.0,
    show_default=True,
    help="Seconds between liveness records of running steps; the orchestrator's worker_lost_timeout must exceed 3x this.",
)
@click.option(
    "--max-tasks-per-child",
    type=click.IntRange(1),
    help="Steps a step child runs before it is replaced by a fresh process (default: worker_max_tasks_per_child, else no limit).",
)
@click.option(
    "--max-memory-per-child",
    type=click.IntRange(1),
    help="KiB of resident memory after which a step child is replaced once its step ends (default: worker_max_memory_per_child, else no limit).",
)
@click.option(
    "--signing-key-file",
    "signing_key_files",
    multiple=True,
    type=click.Path(dir_okay=False),
    help="File holding message signing keys, one per line (first: current); adds to the config's signing_key (repeatable).",
)
@click.option(
    "--step-user",
    metavar="USER",
    help="Run the children that run steps (and launched runs) as this user, name or uid (Celery's --uid, "
    "for the user code only); the worker must run as root. They then cannot read its signing key.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(1, 65535),
    help="Serve Prometheus /metrics and the /livez (restart me) and /readyz (send me work) probes on this port.",
)
@click.option(
    "--metrics-host",
    default="127.0.0.1",
    show_default=True,
    help="Address the metrics port binds to; 0.0.0.0 in a container, so probes and scrapes reach it.",
)
@click.option(
    "--scale-in-protection",
    type=click.Choice(["ecs", "k8s"]),
    help="While it holds steps, protect this worker from scale-in: ECS task scale-in protection, or a high Kubernetes pod-deletion-cost.",
)
@click.option(
    "--interactive-slots",
    type=click.IntRange(0, 16),
    default=None,
    help="With execution.config.lanes: slots beyond -c that only interactive steps use while bulk-lane steps fill the worker (default 1; 0 where two steps must never share the machine, e.g. a sized pool).",
)
@click.option(
    "--step-niceness",
    type=click.IntRange(0, 19),
    default=STEP_NICENESS,
    show_default=True,
    help="Niceness added to step processes, so the worker's own threads (receives, heartbeats, visibility extensions) and other services on the machine get the cores first; 0 runs steps at the worker's priority. Bulk-lane steps run at 19 regardless.",
)
@click.option(
    "--bulk-yield",
    type=click.FloatRange(0, 60),
    default=BULK_YIELD,
    show_default=True,
    metavar="SECONDS",
    help="With execution.config.lanes: after an interactive step starts or ends, the bulk lane takes no new step for this long (its running steps go on), so a chain of interactive steps gets the machine; 0 turns it off.",
)
@click.option("-A", "--app", help="Accepted for dagster-celery scripts; not needed (the worker has no Celery app).")
@click.option("-d", "--background", is_flag=True, help="Run the worker in the background (its log goes to --logfile).")
@click.option(
    "-f",
    "--logfile",
    type=click.Path(dir_okay=False),
    help="Log file for --background (default ./dagster-taskiq-sync-worker-NAME.log).",
)
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def worker_start(
    config_yaml,
    queues,
    name,
    concurrency,
    includes,
    loglevel,
    debug_loggers,
    shutdown_timeout,
    heartbeat_interval,
    max_tasks_per_child,
    max_memory_per_child,
    signing_key_files,
    step_user,
    metrics_port,
    metrics_host,
    scale_in_protection,
    interactive_slots,
    step_niceness,
    bulk_yield,
    app,
    background,
    logfile,
    celery_args,
) -> None:
    """Start a worker that runs the steps sent to its queues.

    Celery worker options after `--` that mean something here are honoured: --concurrency N,
    --prefetch-multiplier N, --max-tasks-per-child N, --max-memory-per-child KIB, --loglevel LEVEL
    (flags before `--` win).
    """
    try:
        passthrough = parse_celery_args(celery_args)
    except TaskiqSyncError as exc:
        raise click.UsageError(str(exc)) from None
    concurrency = concurrency or passthrough.get("concurrency")
    if loglevel.upper() == "INFO" and "loglevel" in passthrough:
        loglevel = passthrough["loglevel"]
    if background:
        _start_in_background(name, logfile)
        return
    configure_logging(getattr(logging, loglevel.upper()), debug_loggers)
    log = logging.getLogger("dagster_taskiq_sync.worker")
    if app:
        log.warning("-A/--app %s is not needed: dagster-taskiq-sync workers have no Celery app; ignoring it.", app)
    from dagster_taskiq_sync.config.worker_config import WorkerConfig
    from dagster_taskiq_sync.worker.worker import Worker

    try:
        config = WorkerConfig.from_yaml(
            config_yaml,
            queues=queues,
            name=name,
            concurrency=concurrency,
            includes=includes,
            shutdown_timeout=shutdown_timeout,
            heartbeat_interval=heartbeat_interval,
            prefetch_multiplier=passthrough.get("prefetch_multiplier"),
            max_tasks_per_child=max_tasks_per_child or passthrough.get("max_tasks_per_child"),
            max_memory_per_child=max_memory_per_child or passthrough.get("max_memory_per_child"),
            signing_key_files=signing_key_files,
            metrics_port=metrics_port,
            metrics_host=metrics_host,
            scale_in_protection=scale_in_protection,
            step_user=step_user,
            interactive_slots=interactive_slots,
            step_niceness=step_niceness,
            bulk_yield=bulk_yield,
        )
        for note in config.settings.notes:
            log.warning(note)
        code = Worker(config).run_until_stopped(handle_signals=True)
    except TaskiqSyncError as exc:
        raise click.ClickException(str(exc)) from None
    sys.exit(code)


CELERY_WORKER_OPTIONS = {
    "--concurrency": "concurrency",
    "-c": "concurrency",
    "--prefetch-multiplier": "prefetch_multiplier",
    "--max-tasks-per-child": "max_tasks_per_child",
    "--max-memory-per-child": "max_memory_per_child",
    "--loglevel": "loglevel",
    "-l": "loglevel",
}


def parse_celery_args(args) -> dict[str, Any]:
    """Celery `worker` options passed after `--` by dagster-celery deployment scripts."""
    found: dict[str, Any] = {}
    items = list(args)
    while items:
        arg = items.pop(0)
        flag, _, inline = arg.partition("=")
        key = CELERY_WORKER_OPTIONS.get(flag)
        if key is None:
            raise ConfigError(
                f"Celery worker option {arg!r} after '--' has no meaning for dagster-taskiq-sync workers; "
                "remove it (supported after '--': --concurrency N, --prefetch-multiplier N, "
                "--max-tasks-per-child N, --max-memory-per-child KIB, --loglevel LEVEL)."
            )
        value = inline or (items.pop(0) if items else None)
        if value is None:
            raise ConfigError(f"Celery worker option {flag} after '--' needs a value.")
        if key == "loglevel":
            if value.upper() not in LOG_LEVELS:
                raise ConfigError(
                    f"{flag} {value!r} after '--' is not a log level; use one of {', '.join(LOG_LEVELS)}."
                )
            found[key] = value.upper()
        else:
            try:
                number = int(value)
                if number < 1:
                    raise ValueError
            except ValueError:
                raise ConfigError(f"{flag} {value!r} after '--' must be a whole number of at least 1.") from None
            found[key] = number
    return found


def _start_in_background(name, logfile) -> None:
    """Re-run this command without -d, detached from the terminal, logging to a file."""
    import subprocess

    args = [a for a in sys.argv[1:] if a not in ("-d", "--background")]
    path = os.path.abspath(logfile or f"dagster-taskiq-sync-worker-{name or 'dagster'}.log")
    with open(path, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dagster_taskiq_sync.cli", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    click.echo(f"worker started in the background: pid {proc.pid}, log {path}")


def _registry():
    """The worker registry in DAGSTER_HOME's instance (a ClickException saying how to set it)."""
    from dagster_taskiq_sync.storage.instance import InstanceOptions, open_home_instance
    from dagster_taskiq_sync.storage.registry import WorkerRegistry

    try:
        return WorkerRegistry(open_home_instance(InstanceOptions(pool_connections=False)))
    except TaskiqSyncError as exc:
        raise click.ClickException(f"the worker registry lives in the Dagster instance: {exc}") from None


@worker.command("list")
@click.option(
    "-y",
    "--config-yaml",
    type=click.Path(dir_okay=False),
    help="Run-config YAML: its lost_worker_expiry applies (the registry is DAGSTER_HOME's instance).",
)
def worker_list(config_yaml) -> None:
    """List the workers registered in DAGSTER_HOME's instance, with their running steps.

    Workers that stopped heartbeating (killed, node lost) show as `lost?`, and leave the list
    lost_worker_expiry seconds (default 3600) after their last heartbeat.
    """
    from dagster_taskiq_sync.wire.settings import Settings

    try:
        expiry = settings_from_yaml(config_yaml).lost_worker_expiry if config_yaml else Settings().lost_worker_expiry
    except TaskiqSyncError as exc:
        raise click.ClickException(str(exc)) from None
    registry = _registry()
    registry.prune(expiry)
    rows = registry.workers()
    if not rows:
        click.echo("no workers registered")
        return
    click.echo(
        f"{'NAME':<28} {'HOST':<16} {'PID':>7} {'QUEUES':<20} {'CONC':>4}  {'LAST HEARTBEAT':<15} {'STATE':<9} RUNNING"
    )
    for row in sorted(rows, key=lambda r: r.name):
        state = row.state if row.looks_alive() else "lost?"
        click.echo(
            f"{row.name:<28} {row.host:<16} {row.pid:>7} {','.join(row.queues):<20} {row.concurrency:>4}  "
            f"{row.age():>6.0f} s ago     {state:<9} {', '.join(row.running) or '-'}"
        )


@worker.command("terminate")
@click.argument("name", required=False)
@click.option("-a", "--all", "all_", is_flag=True, help="Ask every registered worker to stop.")
@click.option("-y", "--config-yaml", type=click.Path(dir_okay=False), help="Accepted for dagster-celery scripts.")
@click.option(
    "--wait", "wait_seconds", type=click.FloatRange(0), default=0, help="Wait up to this many seconds for them to stop."
)
def worker_terminate(name, all_, config_yaml, wait_seconds) -> None:
    """Ask a worker (by name, with or without @HOST) or all workers to stop gracefully."""
    import time

    if not (name or all_):
        raise click.UsageError("name a worker (see `dagster-taskiq-sync worker list`) or pass -a/--all.")
    registry = _registry()
    rows = [r for r in registry.workers() if r.state != "stopped" and (all_ or name in (r.name, r.name.split("@")[0]))]
    if not rows:
        raise click.ClickException(f"no registered worker is named {name!r}; see `dagster-taskiq-sync worker list`.")
    for row in rows:
        registry.request_terminate(row.name)
        click.echo(f"asked worker {row.name} (pid {row.pid} on {row.host}) to stop")
    deadline = time.monotonic() + wait_seconds
    while wait_seconds and time.monotonic() < deadline:
        states = {r.name: r.state for r in registry.workers()}
        if all(states.get(r.name, "stopped") == "stopped" for r in rows):
            click.echo("stopped")
            return
        time.sleep(0.5)
    if wait_seconds:
        raise click.ClickException(f"not every worker stopped within {wait_seconds:g} s; see `worker list`.")
