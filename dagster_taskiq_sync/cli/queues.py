"""``dagster-taskiq-sync queues create|stats|redrive``: the SQS queues a config names."""

from __future__ import annotations

import functools
import logging
import sys

import click

from dagster_taskiq_sync.cli.logs import configure_logging
from dagster_taskiq_sync.config.worker_config import settings_from_yaml
from dagster_taskiq_sync.errors import TaskiqSyncError


@click.group()
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
        # Every pool's queue of the routing table (execution.config.routes), then -q's; with
        # execution.config.lanes, each one's bulk lane too (a -q named like a lane is refused here).
        queues = settings.config_queues(extra)
        with Bridge() as bridge:
            try:
                create = functools.partial(provision, kms_key=kms_key, payload_expiry_days=payload_expiry_days)
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

    from dagster_taskiq_sync.ops.queue_depths import size_text
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
        # A bulk lane's workers are its queue's (one set of slots), and that row's replicas count it.
        pool = (
            f"bulk lane of {s.lane_of}: same workers and slots, replicas counted there"
            if s.lane_of
            else f"{live:>7} {free:>5} {s.target_backlog_per_worker:>6} {s.replicas_needed:>8}"
        )
        click.echo(
            f"{s.queue:<20} {s.visible:>7} {s.in_flight:>9} {s.delayed:>7} {size_text(s.max_message_size):>8}  "
            f"{dlq:<24} {pool}"
        )
    with_lane = ", ".join(s.queue for s in stats if s.lane and not s.error)
    click.echo(
        "replicas = ceil((visible + in flight) / target)"
        + (f", for {with_lane} with its bulk lane's messages" if with_lane else "")
        + "; target per queue: "
        + "; ".join(f"{s.queue}: {s.target_source}" for s in stats if not s.error and not s.lane_of)
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
    from dagster_taskiq_sync.ops.redrive import redrive
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
