"""The ``dagster-taskiq-sync`` command: ``worker start|list|terminate``, ``queues create``, ...

Flags follow ``dagster-celery worker start`` so deployment scripts carry over. This is a thin
layer: ``worker start`` builds a :class:`~.worker_config.WorkerConfig` and runs a
:class:`~.worker.Worker` until a signal stops it.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

import click

from dagster_taskiq_sync.config.worker_config import load_executor_config, settings_from_yaml
from dagster_taskiq_sync.errors import ConfigError, TaskiqSyncError

__all__ = ["load_executor_config", "main", "settings_from_yaml"]

LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


@click.group()
def main() -> None:
    """Run Dagster steps on SQS through TaskIQ."""


@main.group()
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
    metrics_port,
    metrics_host,
    scale_in_protection,
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


# Libraries whose records below WARNING are protocol chatter and, at DEBUG, secrets: botocore logs
# request headers, AssumeRole's secret key and every session token. They stay at WARNING whatever
# --loglevel says unless named with --debug-logger.
QUIET_LOGGERS = ("botocore", "aiobotocore", "boto3", "s3transfer", "urllib3", "aiohttp", "alembic", "asyncio")


def configure_logging(level: int, debug_loggers: Sequence[str] = ()) -> None:
    """The worker's log on stderr at ``level``; library loggers at WARNING or above unless named."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    named = set(debug_loggers)
    for name in QUIET_LOGGERS:
        if name not in named:
            logging.getLogger(name).setLevel(max(logging.WARNING, level))
    for name in named:
        logging.getLogger(name).setLevel(level)


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


@main.group()
def queues() -> None:
    """Manage the SQS queues a config names."""


@queues.command("create")
@click.option("-y", "--config-yaml", type=click.Path(dir_okay=False), help="Run-config YAML with the executor block.")
@click.option(
    "-q",
    "--queue",
    "extra",
    multiple=True,
    help="Also create this queue (repeatable), e.g. one named by a dagster-celery/queue tag (the config's default and routed queues are always created).",
)
@click.option(
    "--max-receive-count",
    type=click.IntRange(1, 1000),
    default=5,
    show_default=True,
    help="Receives before SQS moves a message to the dead-letter queue NAME-dlq.",
)
@click.option("--no-dead-letter", is_flag=True, help="Create no dead-letter queue or redrive policy.")
@click.option(
    "--kms-key",
    help="Encrypt the queues and the S3 bucket with this KMS key (id, ARN or alias/NAME) instead of SQS-managed keys and SSE-S3. Default: sqs-creation-attributes' KmsMasterKeyId.",
)
@click.option(
    "--payload-expiry-days",
    type=int,
    help="Days after which offloaded payloads under the backend's S3 prefix expire (a bucket lifecycle rule; default 7): payloads of dead-lettered or purged messages would otherwise stay forever.",
)
def queues_create(config_yaml, extra, max_receive_count, no_dead_letter, kms_key, payload_expiry_days) -> None:
    """Create the queues (with dead-letter queues and redrive policy) and the S3 bucket a config names.

    Queues are encrypted at rest (SQS-managed keys, or --kms-key); the bucket gets default
    encryption and a lifecycle rule expiring offloaded payloads.
    """
    from dagster_taskiq_sync.ops.admin import provision
    from dagster_taskiq_sync.wire.bridge import Bridge
    from dagster_taskiq_sync.wire.broker_client import translate_error

    try:
        settings = settings_from_yaml(config_yaml)
        with Bridge() as bridge:
            try:
                create = functools.partial(provision, kms_key=kms_key, payload_expiry_days=payload_expiry_days)
                # Every pool's queue of the routing table (execution.config.routes), then -q's.
                queues = [*settings.routes.queues, *extra]
                report = bridge.call(
                    create, settings.sqs, queues, None if no_dead_letter else max_receive_count, timeout=60
                )
            except TaskiqSyncError:
                raise
            except Exception as exc:  # noqa: BLE001 - translated below into one sentence
                raise translate_error(exc, settings.sqs, "creating queues", None) from None
    except TaskiqSyncError as exc:
        raise click.ClickException(str(exc)) from None
    for line in report:
        click.echo(line)


@queues.command("stats")
@click.option("-y", "--config-yaml", type=click.Path(dir_okay=False), help="Run-config YAML with the executor block.")
@click.option(
    "-q",
    "--queue",
    "only",
    multiple=True,
    help="Queue to show (repeatable). Default: the config's task_default_queue, its routed queues (execution.config.routes) and every queue a live worker consumes.",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print JSON (one document per line with --watch) instead of a table."
)
@click.option("--watch", type=float, metavar="SECONDS", help="Print again every SECONDS until Ctrl-C.")
@click.option(
    "--target-backlog-per-worker",
    "target",
    type=int,
    metavar="N",
    help="Messages one worker should hold (default: its concurrency x worker_prefetch_multiplier); replicas needed = ceil((visible + in flight) / N).",
)
@click.option(
    "--serve",
    "serve_port",
    type=click.IntRange(1, 65535),
    metavar="PORT",
    help="Serve these numbers as Prometheus metrics on PORT (/metrics, /livez, /readyz) until Ctrl-C, instead of printing them.",
)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address --serve binds to; 0.0.0.0 in a container, so Prometheus reaches it.",
)
@click.option(
    "--cache-seconds",
    type=float,
    default=10.0,
    show_default=True,
    help="With --serve: read SQS at most once per this many seconds; scrapes in between get the last reading.",
)
def queues_stats(config_yaml, only, as_json, watch, target, serve_port, host, cache_seconds) -> None:
    """Per queue: visible / in-flight / delayed messages, dead-letter depth, live workers, free slots, replicas needed."""
    from dagster_taskiq_sync.ops.stats import RegistryReader
    from dagster_taskiq_sync.wire.bridge import Bridge
    from dagster_taskiq_sync.worker.signals import SignalInbox

    if watch is not None and not watch > 0:
        raise click.UsageError(f"--watch {watch:g} must be a positive number of seconds; pass e.g. --watch 5.")
    if target is not None and target < 1:
        raise click.UsageError(
            f"--target-backlog-per-worker {target} must be a whole number of at least 1; pass e.g. 4."
        )
    if serve_port is not None:
        if watch is not None or as_json:
            raise click.UsageError("--serve serves metrics instead of printing; drop --watch and --json.")
        _serve_stats(config_yaml, only, target, serve_port, host, cache_seconds)
        return
    # With --watch, Ctrl-C / SIGTERM end the loop between rounds (exit 0, as before): a
    # KeyboardInterrupt raised in the middle of a broker call could leave the bridge's loop waiting
    # on a call it never settles.
    inbox = SignalInbox().install() if watch is not None else None
    stopped = False
    registry = RegistryReader()
    try:
        settings = settings_from_yaml(config_yaml)
        with Bridge() as bridge:
            while True:
                failed = _print_stats(bridge, settings, only, as_json, target, registry)
                if inbox is None or (stopped := bool(inbox.wait(watch))):
                    break
    except TaskiqSyncError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        registry.close()
        if inbox is not None:
            inbox.uninstall()
    if failed and not stopped:
        sys.exit(1)


def _serve_stats(config_yaml, only, target, port, host, cache_seconds) -> None:
    """`queues stats --serve`: a Prometheus exporter of the queues' numbers until a signal."""
    from dagster_taskiq_sync.ops.queue_exporter import QueueExporter
    from dagster_taskiq_sync.worker.signals import SignalInbox

    if not cache_seconds >= 1:
        raise click.UsageError(
            f"--cache-seconds {cache_seconds:g} must be at least 1, so scrapes cannot hammer SQS; pass e.g. 10."
        )
    configure_logging(logging.INFO)
    try:
        settings = settings_from_yaml(config_yaml)
        exporter = QueueExporter(settings, port, host, only=only, target=target, cache_seconds=cache_seconds).start()
    except TaskiqSyncError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(
        f"queue metrics at {exporter.url}/metrics (SQS {settings.sqs.describe_endpoint()} read at most every "
        f"{cache_seconds:g} s); Ctrl-C stops it",
    )
    inbox = SignalInbox().install()  # not an Event: Event.set in a handler can deadlock on its lock
    try:
        while not inbox.wait(1.0):
            pass
    finally:
        inbox.uninstall()
        exporter.stop()


def _print_stats(bridge, settings, only, as_json, target, registry) -> bool:
    """One round of `queues stats`; returns True when a queue could not be read."""
    import json

    from dagster_taskiq_sync.ops.admin import size_text
    from dagster_taskiq_sync.ops.stats import gather

    report = gather(bridge, settings, only, target=target, registry=registry)
    stats, notes, now = report.queues, report.notes, report.time
    if as_json:
        click.echo(json.dumps(report.as_dict()))
        return report.failed
    header = f"{'QUEUE':<20} {'VISIBLE':>7} {'IN FLIGHT':>9} {'DELAYED':>7} {'MAX MSG':>8}  {'DEAD-LETTER':<24} {'WORKERS':>7} {'FREE':>5} {'TARGET':>6} {'REPLICAS':>8}"
    click.echo(f"{now}  {settings.sqs.describe_endpoint()}")
    click.echo(header)
    for s in stats:
        if s.error:
            click.echo(f"{s.queue:<20} {s.error}")
            continue
        if s.dead_letter_queue is None:
            dlq = "none"
        elif s.dead_letter_error:
            dlq = f"{s.dead_letter_queue}: missing"
        else:
            dlq = f"{s.dead_letter_queue}: {s.dead_letter_depth}"
        live = "?" if s.workers is None else str(len(s.workers))
        free = "?" if s.free_slots is None else str(s.free_slots)
        click.echo(
            f"{s.queue:<20} {s.visible:>7} {s.in_flight:>9} {s.delayed:>7} {size_text(s.max_message_size):>8}  "
            f"{dlq:<24} {live:>7} {free:>5} "
            f"{s.target_backlog_per_worker:>6} {s.replicas_needed:>8}"
        )
    click.echo(
        "replicas = ceil((visible + in flight) / target); target per queue: "
        + "; ".join(f"{s.queue}: {s.target_source}" for s in stats if not s.error)
    )
    for s in stats:
        if s.dead_letter_error:
            click.echo(f"note: {s.dead_letter_error}")
    for note in notes:
        click.echo(f"note: {note}")
    return report.failed


@queues.command("redrive")
@click.argument("name")
@click.option("-y", "--config-yaml", type=click.Path(dir_okay=False), help="Run-config YAML with the executor block.")
@click.option(
    "--max",
    "max_messages",
    type=int,
    metavar="N",
    help="Move at most N messages (default: as many as the dead-letter queue holds when this starts).",
)
def queues_redrive(name, config_yaml, max_messages) -> None:
    """Move the messages in queue NAME's dead-letter queue back to NAME (after the cause is fixed)."""
    from dagster_taskiq_sync.ops.admin import redrive
    from dagster_taskiq_sync.wire.bridge import Bridge
    from dagster_taskiq_sync.wire.broker_client import translate_error

    if max_messages is not None and max_messages < 1:
        raise click.UsageError(
            f"--max {max_messages} must be a whole number of at least 1; pass e.g. --max 100, or leave it out to move them all."
        )
    try:
        settings = settings_from_yaml(config_yaml)
        with Bridge() as bridge:
            try:
                result = bridge.call(redrive, settings.sqs, name, max_messages, timeout=3600)
            except TaskiqSyncError:
                raise
            except Exception as exc:  # noqa: BLE001 - translated below into one sentence
                raise translate_error(exc, settings.sqs, f"redriving queue {name!r}", name) from None
    except TaskiqSyncError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(
        f"moved {result.moved} message(s) from {result.dead_letter_queue} back to {result.queue} "
        f"({result.left} left in {result.dead_letter_queue})"
    )


@main.command("iam-policy")
@click.option(
    "-y",
    "--config-yaml",
    type=click.Path(dir_okay=False),
    help="Run-config YAML with the executor block (queues, bucket, prefix, region).",
)
@click.option(
    "--role",
    "roles",
    multiple=True,
    type=click.Choice(["orchestrator", "worker", "launcher"]),
    help="Role to print the policy of (repeatable: the union, e.g. --role worker --role orchestrator for a worker serving TaskiqRunLauncher runs). Default: one policy per role, keyed by role.",
)
@click.option(
    "-q",
    "--queue",
    "extra",
    multiple=True,
    help="Also cover this queue (repeatable), e.g. one named by a dagster-celery/queue tag or the launcher's default_queue.",
)
@click.option(
    "--kms-key",
    help="KMS key of the queues and bucket (default: sqs-creation-attributes' KmsMasterKeyId); adds kms:GenerateDataKey / kms:Decrypt.",
)
@click.option(
    "--account-id",
    help="AWS account that owns the queues (default: the predefined queue URLs, else STS GetCallerIdentity).",
)
@click.option(
    "--no-dead-letter", is_flag=True, help="The queues have no dead-letter queues (created with --no-dead-letter)."
)
def iam_policy(config_yaml, roles, extra, kms_key, account_id, no_dead_letter) -> None:
    """Print the least-privilege IAM policy (JSON) for the queues, dead-letter queues and S3 offload prefix a config names."""
    import json

    from dagster_taskiq_sync.ops.admin import kms_key_for
    from dagster_taskiq_sync.ops.iam import ROLES, policy, resolve_resources
    from dagster_taskiq_sync.wire.bridge import Bridge

    try:
        settings = settings_from_yaml(config_yaml)
        key = kms_key_for(settings.sqs, kms_key)
        resolve = functools.partial(
            resolve_resources, account_id=account_id, kms_key=key, dead_letter=not no_dead_letter
        )
        with Bridge() as bridge:
            resources = bridge.call(resolve, settings.sqs, [*settings.routes.queues, *extra], timeout=60)
        document = policy(roles, resources) if roles else {role: policy([role], resources) for role in ROLES}
    except TaskiqSyncError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(document, indent=2))


@main.command("celery-mapping")
def celery_mapping() -> None:
    """Print the table of what each Celery setting does on SQS (Markdown)."""
    from dagster_taskiq_sync.config.celery_compat import mapping_table_markdown

    click.echo(mapping_table_markdown())


@main.command("local-endpoint")
@click.option("--port", type=click.IntRange(1, 65535), default=9324, show_default=True)
def local_endpoint(port) -> None:
    """Serve a local SQS/S3 endpoint on 127.0.0.1:PORT (moto) until interrupted."""
    from dagster_taskiq_sync.ops.local_endpoint import LocalEndpoint
    from dagster_taskiq_sync.worker.signals import SignalInbox

    try:
        endpoint = LocalEndpoint(port).start()
    except TaskiqSyncError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"local SQS/S3 endpoint at {endpoint.url} (broker: {endpoint.broker_url}); Ctrl-C stops it")
    inbox = SignalInbox().install()  # not an Event: Event.set in a handler can deadlock on its lock
    try:
        while not inbox.wait(1.0):
            pass
    finally:
        inbox.uninstall()
        endpoint.stop()


@main.command("dashboard")
@click.option("-y", "--config-yaml", type=click.Path(dir_okay=False), help="Run-config YAML with the executor block.")
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to bind; 0.0.0.0 exposes the page to the network."
)
@click.option("--port", type=click.IntRange(0, 65535), default=8787, show_default=True, help="Port (0: any free one).")
@click.option(
    "--refresh",
    type=click.FloatRange(1, 3600),
    default=5.0,
    show_default=True,
    help="Seconds between reads of SQS and the registry (and page reloads).",
)
@click.option(
    "--dagster-url", help="The Dagster UI (e.g. http://localhost:3000): run ids link to its /runs/RUN_ID page."
)
@click.option(
    "-q",
    "--queue",
    "only",
    multiple=True,
    help="Queue to show (repeatable). Default: the config's task_default_queue, its routed queues (execution.config.routes) and every queue a live worker consumes.",
)
@click.option(
    "--allow-redrive",
    is_flag=True,
    help="Offer a redrive action per dead-letter queue; needs a token (--redrive-token-file or DAGSTER_TASKIQ_SYNC_DASHBOARD_TOKEN).",
)
@click.option(
    "--redrive-token-file",
    type=click.Path(dir_okay=False),
    help="File holding the token a redrive must be submitted with (at least 16 characters).",
)
def dashboard(config_yaml, host, port, refresh, dagster_url, only, allow_redrive, redrive_token_file) -> None:
    """Serve the operator page: queues, live workers and their running steps, recent dead letters.

    Read-only unless --allow-redrive is given (POST with the token, from the page's own origin).
    Needs DAGSTER_HOME for the workers (the registry lives in the instance).
    """
    from dagster_taskiq_sync.ops import dashboard as board
    from dagster_taskiq_sync.ops.dashboard_guard import TOKEN_ENV
    from dagster_taskiq_sync.wire.bridge import Bridge
    from dagster_taskiq_sync.worker.signals import SignalInbox

    try:
        settings = settings_from_yaml(config_yaml)
        options = board.DashboardOptions.from_flags(
            allow_redrive=allow_redrive,
            token_file=redrive_token_file,
            dagster_url=dagster_url,
            host=host,
            port=port,
            refresh=refresh,
            queues=tuple(only),
        )
    except TaskiqSyncError as exc:
        raise click.ClickException(str(exc)) from None
    if not allow_redrive and os.environ.get(TOKEN_ENV):
        click.echo(f"note: {TOKEN_ENV} is set but --allow-redrive is not, so the page stays read-only.")
    configure_logging(logging.INFO)
    inbox = SignalInbox().install()
    try:
        with Bridge() as bridge:
            try:
                server = board.start(settings, options, bridge)
            except TaskiqSyncError as exc:
                raise click.ClickException(str(exc)) from None
            mode = "redrive allowed with the token" if allow_redrive else "read-only"
            click.echo(f"dashboard at {server.url}/ ({mode}); Ctrl-C stops it")
            sys.stdout.flush()  # a supervisor or a test reads the URL (with --port 0, the port) from this line
            try:
                while not inbox.wait(1.0):
                    pass
            finally:
                server.stop()
    finally:
        inbox.uninstall()


if __name__ == "__main__":  # pragma: no cover
    main()
