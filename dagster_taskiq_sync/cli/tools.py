"""The operator commands outside a group: ``iam-policy``, ``celery-mapping``, ``local-endpoint``,
``dashboard``."""

from __future__ import annotations

import functools
import logging
import os
import sys

import click

from dagster_taskiq_sync.cli.logs import configure_logging
from dagster_taskiq_sync.config.worker_config import settings_from_yaml
from dagster_taskiq_sync.errors import TaskiqSyncError


@click.command("iam-policy")
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
        queues = settings.config_queues(extra)
        with Bridge() as bridge:
            resources = bridge.call(resolve, settings.sqs, queues, timeout=60)
        document = policy(roles, resources) if roles else {role: policy([role], resources) for role in ROLES}
    except TaskiqSyncError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(document, indent=2))


@click.command("celery-mapping")
def celery_mapping() -> None:
    """Print the table of what each Celery setting does on SQS (Markdown)."""
    from dagster_taskiq_sync.config.celery_compat import mapping_table_markdown

    click.echo(mapping_table_markdown())


@click.command("local-endpoint")
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


@click.command("dashboard")
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
