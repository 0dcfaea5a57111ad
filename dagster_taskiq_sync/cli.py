"""The ``dagster-taskiq-sync`` command: ``worker start|list|terminate``, ``queues create``, ...

Flags follow ``dagster-celery worker start`` so deployment scripts carry over. This is a thin
layer: ``worker start`` builds a :class:`~.worker_config.WorkerConfig` and runs a
:class:`~.worker.Worker` until a signal stops it.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import Any

import click

from .errors import ConfigError, TaskiqSyncError
from .worker_config import load_executor_config, settings_from_yaml

__all__ = ["load_executor_config", "main", "settings_from_yaml"]

LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


@click.group()
def main() -> None:
    """Run Dagster steps on SQS through TaskIQ."""


@main.group()
def worker() -> None:
    """Start workers."""


@worker.command("start")
@click.option("-y", "--config-yaml", type=click.Path(dir_okay=False), help="Run-config YAML with the executor block (the same file the job uses).")
@click.option("-q", "--queue", "queues", multiple=True, help="Queue to consume (repeatable). Default: the config's task_default_queue ('dagster').")
@click.option("-n", "--name", help="Worker name (default dagster-XXXXXX); '@HOST' is appended.")
@click.option("-c", "--concurrency", type=click.IntRange(1, 1000), help="Most steps running at once in this worker (worker threads). Default: worker_concurrency or the CPU count.")
@click.option("-i", "--includes", multiple=True, help="Python module every step should have imported (repeatable); imported once, before steps fork.")
@click.option("-l", "--loglevel", type=click.Choice(LOG_LEVELS, case_sensitive=False), default="INFO", show_default=True)
@click.option("--shutdown-timeout", type=click.FloatRange(0), default=60.0, show_default=True, help="Seconds running steps get to finish after SIGTERM before they are killed.")
@click.option("--heartbeat-interval", type=click.FloatRange(0.1, 3600), default=5.0, show_default=True, help="Seconds between liveness records of running steps; the orchestrator's worker_lost_timeout must exceed 3x this.")
@click.option("--max-tasks-per-child", type=click.IntRange(1), help="Steps a step child runs before it is replaced by a fresh process (default: worker_max_tasks_per_child, else no limit).")
@click.option("--max-memory-per-child", type=click.IntRange(1), help="KiB of resident memory after which a step child is replaced once its step ends (default: worker_max_memory_per_child, else no limit).")
@click.option("--signing-key-file", "signing_key_files", multiple=True, type=click.Path(dir_okay=False), help="File holding message signing keys, one per line (first: current); adds to the config's signing_key (repeatable).")
@click.option("-A", "--app", help="Accepted for dagster-celery scripts; not needed (the worker has no Celery app).")
@click.option("-d", "--background", is_flag=True, help="Run the worker in the background (its log goes to --logfile).")
@click.option("-f", "--logfile", type=click.Path(dir_okay=False), help="Log file for --background (default ./dagster-taskiq-sync-worker-NAME.log).")
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def worker_start(config_yaml, queues, name, concurrency, includes, loglevel, shutdown_timeout, heartbeat_interval,  # type: ignore[no-untyped-def]
                 max_tasks_per_child, max_memory_per_child, signing_key_files, app, background, logfile, celery_args) -> None:
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
    logging.basicConfig(
        level=getattr(logging, loglevel.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Instance setup chatter (alembic's plugin and migration context lines) is not worker news.
    logging.getLogger("alembic").setLevel(max(logging.WARNING, getattr(logging, loglevel.upper())))
    log = logging.getLogger("dagster_taskiq_sync.worker")
    if app:
        log.warning("-A/--app %s is not needed: dagster-taskiq-sync workers have no Celery app; ignoring it.", app)
    from .worker import Worker
    from .worker_config import WorkerConfig

    try:
        config = WorkerConfig.from_yaml(
            config_yaml, queues=queues, name=name, concurrency=concurrency, includes=includes,
            shutdown_timeout=shutdown_timeout, heartbeat_interval=heartbeat_interval,
            prefetch_multiplier=passthrough.get("prefetch_multiplier"),
            max_tasks_per_child=max_tasks_per_child or passthrough.get("max_tasks_per_child"),
            max_memory_per_child=max_memory_per_child or passthrough.get("max_memory_per_child"),
            signing_key_files=signing_key_files,
        )
        for note in config.settings.notes:
            log.warning(note)
        code = Worker(config).run_until_stopped(handle_signals=True)
    except TaskiqSyncError as exc:
        raise click.ClickException(str(exc)) from None
    sys.exit(code)


CELERY_WORKER_OPTIONS = {
    "--concurrency": "concurrency", "-c": "concurrency",
    "--prefetch-multiplier": "prefetch_multiplier",
    "--max-tasks-per-child": "max_tasks_per_child",
    "--max-memory-per-child": "max_memory_per_child",
    "--loglevel": "loglevel", "-l": "loglevel",
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
                raise ConfigError(f"{flag} {value!r} after '--' is not a log level; use one of {', '.join(LOG_LEVELS)}.")
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
        proc = subprocess.Popen([sys.executable, "-m", "dagster_taskiq_sync.cli", *args], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    click.echo(f"worker started in the background: pid {proc.pid}, log {path}")


def _registry():  # type: ignore[no-untyped-def]
    """The worker registry in DAGSTER_HOME's instance (a ClickException saying how to set it)."""
    from .instance import InstanceOptions, open_home_instance
    from .registry import WorkerRegistry

    try:
        return WorkerRegistry(open_home_instance(InstanceOptions(pool_connections=False)))
    except TaskiqSyncError as exc:
        raise click.ClickException(f"the worker registry lives in the Dagster instance: {exc}") from None


@worker.command("list")
@click.option("-y", "--config-yaml", type=click.Path(dir_okay=False), help="Accepted for dagster-celery scripts; the registry is DAGSTER_HOME's instance.")
def worker_list(config_yaml) -> None:
    """List the workers registered in DAGSTER_HOME's instance, with their running steps."""
    rows = _registry().workers()
    if not rows:
        click.echo("no workers registered")
        return
    click.echo(f"{'NAME':<28} {'HOST':<16} {'PID':>7} {'QUEUES':<20} {'CONC':>4}  {'LAST HEARTBEAT':<15} {'STATE':<9} RUNNING")
    for row in sorted(rows, key=lambda r: r.name):
        state = row.state if row.looks_alive() else "lost?"
        click.echo(f"{row.name:<28} {row.host:<16} {row.pid:>7} {','.join(row.queues):<20} {row.concurrency:>4}  "
                   f"{row.age():>6.0f} s ago     {state:<9} {', '.join(row.running) or '-'}")


@worker.command("terminate")
@click.argument("name", required=False)
@click.option("-a", "--all", "all_", is_flag=True, help="Ask every registered worker to stop.")
@click.option("-y", "--config-yaml", type=click.Path(dir_okay=False), help="Accepted for dagster-celery scripts.")
@click.option("--wait", "wait_seconds", type=click.FloatRange(0), default=0, help="Wait up to this many seconds for them to stop.")
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


@main.group()
def queues() -> None:
    """Manage the SQS queues a config names."""


@queues.command("create")
@click.option("-y", "--config-yaml", type=click.Path(dir_okay=False), help="Run-config YAML with the executor block.")
@click.option("-q", "--queue", "extra", multiple=True, help="Also create this queue (repeatable), e.g. one named by a dagster-celery/queue tag.")
@click.option("--max-receive-count", type=click.IntRange(1, 1000), default=5, show_default=True, help="Receives before SQS moves a message to the dead-letter queue NAME-dlq.")
@click.option("--no-dead-letter", is_flag=True, help="Create no dead-letter queue or redrive policy.")
def queues_create(config_yaml, extra, max_receive_count, no_dead_letter) -> None:
    """Create the queues (with dead-letter queues and redrive policy) and the S3 bucket a config names."""
    from .bridge import Bridge
    from .broker import provision
    from .broker_client import translate_error

    try:
        settings = settings_from_yaml(config_yaml)
        with Bridge() as bridge:
            try:
                report = bridge.call(provision, settings.sqs, extra, None if no_dead_letter else max_receive_count, timeout=60)
            except TaskiqSyncError:
                raise
            except Exception as exc:
                raise translate_error(exc, settings.sqs, "creating queues", None) from None
    except TaskiqSyncError as exc:
        raise click.ClickException(str(exc)) from None
    for line in report:
        click.echo(line)


@main.command("celery-mapping")
def celery_mapping() -> None:
    """Print the table of what each Celery setting does on SQS (Markdown)."""
    from .celery_compat import mapping_table_markdown

    click.echo(mapping_table_markdown())


@main.command("local-endpoint")
@click.option("--port", type=click.IntRange(1, 65535), default=9324, show_default=True)
def local_endpoint(port) -> None:
    """Serve a local SQS/S3 endpoint on 127.0.0.1:PORT (moto) until interrupted."""
    from .local_endpoint import LocalEndpoint

    try:
        endpoint = LocalEndpoint(port).start()
    except TaskiqSyncError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"local SQS/S3 endpoint at {endpoint.url} (broker: {endpoint.broker_url}); Ctrl-C stops it")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    finally:
        endpoint.stop()


if __name__ == "__main__":  # pragma: no cover
    main()
