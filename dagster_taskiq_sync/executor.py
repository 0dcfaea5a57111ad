"""Who talks to Dagster on the orchestrator side: ``taskiq_executor`` and its step handler.

Steps go through Dagster's own step-delegation machinery (``StepDelegatingExecutor``), which
already gives ordering, retries, ``max_concurrent``, tag concurrency limits, op concurrency
pools, resume and termination, and which reads step events from the instance's event log. The
handler's only job is to turn "launch this step" into one SQS message.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
from typing import Any, Iterator, Mapping

from dagster import Field, Noneable, Permissive, StringSource, executor, multiple_process_executor_requirements
from dagster import _check as check

from ._dagster_private import (
    CheckStepHealthResult,
    DagsterEvent,
    RetryMode,
    StepDelegatingExecutor,
    StepHandler,
    StepHandlerContext,
    get_retries_config,
    get_tag_concurrency_limits_config,
    serialize_value,
)
from .bridge import shared_bridge
from .broker import BrokerClient
from .celery_compat import settings_from_executor_config
from .errors import ConfigError, TaskiqSyncError
from .settings import Settings

# dagster-celery's tag, so existing ops keep routing; the taskiq alias wins when both are set.
QUEUE_TAGS = ("dagster-taskiq/queue", "dagster-celery/queue")
MESSAGE_VERSION = 1

TASKIQ_CONFIG: dict[str, Any] = {
    # --- the celery_executor schema, unchanged (dagster-celery 0.29) ---
    "broker": Field(
        Noneable(StringSource),
        is_required=False,
        description="SQS broker URL: 'sqs://' (AWS defaults), 'sqs://host:port', 'sqs://key:secret@host:port'.",
    ),
    "backend": Field(
        Noneable(StringSource),
        is_required=False,
        default_value="rpc://",
        description="'rpc://' (default: results via the Dagster event log) or 's3://bucket/prefix'.",
    ),
    "include": Field([str], is_required=False, description="Modules every worker should import."),
    "config_source": Field(
        Noneable(Permissive()),
        is_required=False,
        description="Celery settings; see the README's mapping table for what each does on SQS.",
    ),
    "retries": get_retries_config(),
    # --- native keys ---
    "max_concurrent": Field(
        Noneable(int),
        is_required=False,
        description="Most steps of this run in flight at once (default: no limit).",
    ),
    "tag_concurrency_limits": get_tag_concurrency_limits_config(),
    "step_poll_interval": Field(
        Noneable(float),
        is_required=False,
        description="Seconds between reads of the event log for step results (default 0.05).",
    ),
}


@executor(
    name="taskiq",
    config_schema=TASKIQ_CONFIG,
    requirements=multiple_process_executor_requirements(),
)
def taskiq_executor(init_context):
    """Run each step as a message on SQS, executed by ``dagster-taskiq-sync worker start``.

    Accepts a ``celery_executor`` config block unchanged:

    .. code-block:: yaml

        execution:
          config:
            broker: "sqs://127.0.0.1:9324"
            config_source:
              broker_transport_options: {region: us-east-1}
    """
    config = init_context.executor_config
    config_error = None
    try:
        settings = settings_from_executor_config(config)
    except ConfigError as exc:
        # Raised from execute() instead, where it becomes one ERROR line and the run's failure
        # (raised here, Dagster's CLI prints it under a wall of orchestration frames).
        settings, config_error = Settings(), exc
    return TaskiqExecutor(
        settings,
        retries=RetryMode.from_config(config["retries"]),
        max_concurrent=config.get("max_concurrent"),
        tag_concurrency_limits=config.get("tag_concurrency_limits"),
        config_error=config_error,
    )


class TaskiqExecutor(StepDelegatingExecutor):
    def __init__(
        self,
        settings: Settings,
        retries: RetryMode,
        max_concurrent: int | None = None,
        tag_concurrency_limits: list[dict[str, Any]] | None = None,
        config_error: ConfigError | None = None,
    ) -> None:
        self.settings = check.inst_param(settings, "settings", Settings)
        self._config_error = config_error
        self._taskiq_handler = TaskiqStepHandler(settings)
        super().__init__(
            self._taskiq_handler,
            retries=retries,
            sleep_seconds=settings.step_poll_interval,
            max_concurrent=max_concurrent,
            tag_concurrency_limits=tag_concurrency_limits,
            # A redelivered message for an attempt that already started is dropped by the
            # step process instead of running user code twice.
            should_verify_step=True,
        )

    def execute(self, plan_context, execution_plan):  # type: ignore[override]
        for note in self.settings.notes:
            plan_context.log.warning(note)
        queues = {queue_for_tags(step.tags, self.settings) for step in execution_plan.steps}
        with contextlib.ExitStack() as stack:
            try:
                if self._config_error is not None:
                    raise self._config_error
                stack.enter_context(self._taskiq_handler.connected(sorted(queues)))
            except TaskiqSyncError as exc:
                # One sentence in the run's log before Dagster records the failure.
                plan_context.log.error(str(exc))
                raise
            yield from super().execute(plan_context, execution_plan)


def queue_for_tags(tags: Mapping[str, str], settings: Settings) -> str:
    for tag in QUEUE_TAGS:
        if tags.get(tag):
            return tags[tag]
    return settings.sqs.default_queue


def step_handle_id(run_id: str, step_key: str, attempt: int) -> str:
    """Deterministic id of one step attempt: the message's task id and FIFO dedup id."""
    digest = hashlib.sha256(f"{run_id}\0{step_key}\0{attempt}".encode()).hexdigest()
    return f"{run_id[:8]}-{digest[:40]}"


class TaskiqStepHandler(StepHandler):
    """Stateless but for the open broker client: ids are derived from run id, step and attempt."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._client: BrokerClient | None = None
        self._host = socket.gethostname()

    @property
    def name(self) -> str:
        return "TaskiqStepHandler"

    @contextlib.contextmanager
    def connected(self, queues: list[str]) -> Iterator[BrokerClient]:
        with shared_bridge() as bridge:
            client = BrokerClient(self.settings.sqs, bridge, queues)
            client.start()
            self._client = client
            try:
                yield client
            finally:
                self._client = None
                client.stop()

    def _step_key(self, ctx: StepHandlerContext) -> str:
        keys = ctx.execute_step_args.step_keys_to_execute
        check.invariant(keys is not None and len(keys) == 1, "TaskiqStepHandler launches one step at a time")
        return keys[0]  # type: ignore[index]

    def launch_step(self, step_handler_context: StepHandlerContext) -> Iterator[DagsterEvent]:
        client = check.not_none(self._client, "taskiq_executor used outside its connected() block")
        args = step_handler_context.execute_step_args
        step_key = self._step_key(step_handler_context)
        attempt = args.known_state.get_retry_state().get_attempt_count(step_key) + 1 if args.known_state else 1
        queue = queue_for_tags(step_handler_context.step_tags[step_key], self.settings)
        task_id = step_handle_id(args.run_id, step_key, attempt)
        yield DagsterEvent.step_worker_starting(
            step_handler_context.get_step_context(step_key),
            message=f"Sending step {step_key} (attempt {attempt}) to SQS queue {client.settings.queue_name(queue)!r}.",
            metadata={"queue": queue, "task_id": task_id, "attempt": str(attempt)},
        )
        client.send_step(
            queue=queue,
            task_id=task_id,
            # FIFO queues deliver one message per group at a time: one group per step attempt
            # lets independent steps run side by side.
            group_id=task_id,
            kwargs={
                "version": MESSAGE_VERSION,
                "run_id": args.run_id,
                "step_key": step_key,
                "attempt": attempt,
                "execute_step_args": serialize_value(args),
            },
        )

    def check_step_health(self, step_handler_context: StepHandlerContext) -> CheckStepHealthResult:
        # Worker liveness is not tracked yet: a step is assumed healthy while its message is
        # held. Lost-worker detection replaces this (see the README's "Failure modes").
        return CheckStepHealthResult.healthy()

    def terminate_step(self, step_handler_context: StepHandlerContext) -> Iterator[DagsterEvent]:
        step_key = self._step_key(step_handler_context)
        yield DagsterEvent.engine_event(
            step_handler_context.get_step_context(step_key),
            f"Step {step_key} was not stopped on its worker: termination of running steps is not "
            "supported yet; queued steps of a canceled run are skipped when a worker receives them.",
            event_specific_data=None,
        )

