"""Who talks to Dagster on the orchestrator side: ``taskiq_executor`` and its step handler.

Steps go through Dagster's own step-delegation machinery (``StepDelegatingExecutor``), which
already gives ordering, retries, ``max_concurrent``, tag concurrency limits, op concurrency
pools, resume and termination, and which reads step events from the instance's event log. The
handler's only job is to turn "launch this step" into one SQS message.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

from dagster import (
    DagsterRunStatus,
    Field,
    Noneable,
    Permissive,
    StringSource,
    executor,
    multiple_process_executor_requirements,
)
from dagster import _check as check

from ._dagster_private import (
    CheckStepHealthResult,
    DagsterEvent,
    DagsterExecutionInterruptedError,
    EngineEventData,
    InProcessExecutor,
    PollingStepDelegatingExecutor,
    RetryMode,
    StepHandler,
    StepHandlerContext,
    copy_record,
    get_retries_config,
    get_tag_concurrency_limits_config,
    serialize_value,
    step_sort_key,
)
from .bridge import shared_bridge
from .broker import BrokerClient
from .celery_compat import settings_from_executor_config
from .errors import ConfigError, TaskiqSyncError
from .secrets import pooled, redact_instance_ref
from .liveness import EXITED, QUEUED, RUNNING, LivenessStore, StepRecord, step_handle_id
from .settings import Settings

# dagster-celery's tag, so existing ops keep routing; the taskiq alias wins when both are set.
QUEUE_TAGS = ("dagster-taskiq/queue", "dagster-celery/queue")
STEP_PRIORITY_TAGS = ("dagster-taskiq/priority", "dagster-celery/priority")
RUN_PRIORITY_TAGS = ("dagster-taskiq/run_priority", "dagster-celery/run_priority")
MESSAGE_VERSION = 1
STATUS_CHECK_INTERVAL = 0.5  # seconds between run-status reads while steps are in flight
# A step process that exited is given this long for its last events to be read before the
# orchestrator concludes it ended without reporting a result.
EXIT_GRACE_SECONDS = 3.0

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
        description="Seconds between reads of the event log for step results (default 0.02).",
    ),
    "health_check_interval": Field(
        Noneable(int),
        is_required=False,
        description="Seconds between liveness checks of running steps (default 5).",
    ),
    "worker_lost_timeout": Field(
        Noneable(float),
        is_required=False,
        description="A running step whose worker has not heartbeated for this long is failed, "
        "or retried under its RetryPolicy (default 30).",
    ),
    "queued_step_warning": Field(
        Noneable(float),
        is_required=False,
        description="Log an engine event when no worker has taken a step after this long (default 60).",
    ),
    "queued_step_timeout": Field(
        Noneable(float),
        is_required=False,
        description="Fail a step no worker has taken after this long (default: wait).",
    ),
    "broker_outage_timeout": Field(
        Noneable(float),
        is_required=False,
        description="Keep retrying to send a step through an SQS outage this long (default 60).",
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
    if config_error is None and settings.always_eager:
        # Celery's task_always_eager runs tasks inline, without a broker; dagster-celery's eager
        # tests rely on it. Dagster's in-process executor is exactly that.
        return InProcessExecutor(retries=RetryMode.from_config(config["retries"]))
    return TaskiqExecutor(
        settings,
        retries=RetryMode.from_config(config["retries"]),
        max_concurrent=config.get("max_concurrent"),
        tag_concurrency_limits=config.get("tag_concurrency_limits"),
        config_error=config_error,
    )


class TaskiqExecutor(PollingStepDelegatingExecutor):
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
            check_step_health_interval_seconds=settings.health_check_interval,
        )
        self._next_status_check = 0.0

    def on_poll(self, instance, run_id: str) -> None:
        """Fail the run on a step that could not be sent, and stop orchestrating as soon as the
        run is being canceled (UI, report_run_canceling).

        Workers watch the run's status too and kill its running steps; Dagster then ends the
        run CANCELED because its status is CANCELING when the interrupt reaches it.
        """
        self._taskiq_handler.report_sends(instance, run_id)
        now = time.monotonic()
        if now < self._next_status_check:
            return
        self._next_status_check = now + STATUS_CHECK_INTERVAL
        run = instance.get_run_by_id(run_id)
        if run is not None and run.status in (DagsterRunStatus.CANCELING, DagsterRunStatus.CANCELED):
            raise DagsterExecutionInterruptedError(
                f"run {run_id} is being canceled; its workers stop the steps still running"
            )

    def execute(self, plan_context, execution_plan):  # type: ignore[override]
        for note in self.settings.notes:
            plan_context.log.warning(note)
        run_priority = _int_tag(plan_context.dagster_run.tags, RUN_PRIORITY_TAGS, 0)
        default_priority = self.settings.default_priority
        self._warn_on_priorities(plan_context, execution_plan, run_priority)
        sort_token = step_sort_key.set(
            lambda step: -(_int_tag(step.tags, STEP_PRIORITY_TAGS, default_priority) + run_priority)
        )
        queues = {queue_for_tags(step.tags, self.settings) for step in execution_plan.steps}
        # The loop below reads the event log every step_poll_interval: on PostgreSQL, one
        # connection for the run rather than one per read.
        pooled(plan_context.instance)
        with contextlib.ExitStack() as stack:
            try:
                if self._config_error is not None:
                    raise self._config_error
                stack.enter_context(self._taskiq_handler.connected(sorted(queues)))
            except TaskiqSyncError as exc:
                # One sentence in the run's log before Dagster records the failure.
                plan_context.log.error(str(exc))
                raise
            try:
                yield from super().execute(plan_context, execution_plan)
            finally:
                step_sort_key.reset(sort_token)
                if self._taskiq_handler.sender is not None:
                    self._taskiq_handler.sender.flush(timeout=5)
                    self._taskiq_handler.report_sends(plan_context.instance, plan_context.run_id, raise_errors=False)

    def _warn_on_priorities(self, plan_context, execution_plan, run_priority: int) -> None:
        with_celery = [s.key for s in execution_plan.steps if any(t in s.tags for t in STEP_PRIORITY_TAGS)]
        if with_celery or run_priority:
            plan_context.log.warning(
                "dagster-celery/priority and dagster-celery/run_priority: SQS has no message priority; "
                "ready steps are sent in priority order (higher first), as dagster-celery's orchestrator "
                "does, but a step already in the queue is not overtaken by a later, higher one."
            )
        misused = [s.key for s in execution_plan.steps
                   if s.tags.get("dagster/priority") is not None and not any(t in s.tags for t in STEP_PRIORITY_TAGS)]
        if misused:
            plan_context.log.warning(
                'The following steps do not have "dagster-celery/priority" set but do have '
                f'"dagster/priority" set, which taskiq_executor does not use: [{", ".join(misused)}]. '
                'Set "dagster-celery/priority" instead.'
            )


def _int_tag(tags: Mapping[str, str], names: tuple[str, ...], default: int) -> int:
    for name in names:
        value = tags.get(name)
        if value is not None:
            try:
                return int(value)
            except (TypeError, ValueError):
                raise ConfigError(f"tag {name}={value!r} must be a whole number; fix the tag.") from None
    return default


def queue_for_tags(tags: Mapping[str, str], settings: Settings) -> str:
    for tag in QUEUE_TAGS:
        if tags.get(tag):
            return tags[tag]
    return settings.sqs.default_queue


log = logging.getLogger("dagster_taskiq_sync.executor")
SEND_CONCURRENCY = 8  # messages in flight at once when many steps become ready together


@dataclass(frozen=True)
class PendingSend:
    instance: Any
    run_id: str
    step_key: str
    attempt: int
    task_id: str
    queue: str
    priority: int
    kwargs: Mapping[str, Any]


class StepSender:
    """Sends launched steps from a background thread, so the orchestrator loop never waits on SQS.

    Steps that become ready together (a fan-out) are sent concurrently, highest priority first
    (a lower-priority group waits until the higher one is on the queue). Their ``queued``
    liveness records are written in one batch after the sends. A send that still fails after
    ``broker_outage_timeout`` is raised by :meth:`raise_errors`, which the executor calls on
    every loop iteration: the run fails as it would have had the send been inline.
    """

    def __init__(self, client: BrokerClient, retry_for: float) -> None:
        self._client = client
        self._retry_for = retry_for
        self._cond = threading.Condition()
        self._pending: list[PendingSend] = []
        self._busy = False
        self._closing = False
        self._errors: list[TaskiqSyncError] = []
        self.offloaded: list[tuple[PendingSend, str]] = []  # (step, S3 URL): reported by the executor
        self._pool = concurrent.futures.ThreadPoolExecutor(SEND_CONCURRENCY, thread_name_prefix="taskiq-send")
        self._thread = threading.Thread(target=self._run, name="taskiq-step-sender", daemon=True)
        self._thread.start()

    def put(self, item: PendingSend) -> None:
        with self._cond:
            self._pending.append(item)
            self._cond.notify_all()

    def take_offloaded(self) -> list[tuple[PendingSend, str]]:
        with self._cond:
            offloaded, self.offloaded = self.offloaded, []
        return offloaded

    def raise_errors(self) -> None:
        with self._cond:
            errors, self._errors = self._errors, []
        if errors:
            raise errors[0]

    def flush(self, timeout: float) -> bool:
        """Wait until everything put so far was sent (or failed); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self, timeout: float) -> None:
        self.flush(timeout)
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if not self._pending:
                    return
                batch, self._pending = self._pending, []
                self._busy = True
            try:
                self._send(batch)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _send(self, batch: list[PendingSend]) -> None:
        sent: list[PendingSend] = []
        for priority in sorted({item.priority for item in batch}, reverse=True):
            group = [item for item in batch if item.priority == priority]
            futures = {self._pool.submit(self._send_one, item): item for item in group}
            for future, item in futures.items():
                try:
                    offloaded = future.result()
                except TaskiqSyncError as exc:
                    self._fail(item, exc)
                    continue
                except Exception as exc:  # noqa: BLE001 - reported as the run's failure
                    self._fail(item, TaskiqSyncError(f"{type(exc).__name__}: {exc}"))
                    continue
                sent.append(item)
                if offloaded:
                    with self._cond:
                        self.offloaded.append((item, offloaded))
        by_instance: dict[int, tuple[Any, dict[str, StepRecord]]] = {}
        for item in sent:
            by_instance.setdefault(id(item.instance), (item.instance, {}))[1][item.task_id] = StepRecord(
                QUEUED, queue=item.queue)
        for instance, records in by_instance.values():
            try:
                LivenessStore(instance).write_queued(records)
            except Exception as exc:  # noqa: BLE001 - the steps are sent; only queued-age warnings suffer
                log.warning("could not record %d queued step(s): %s", len(records), exc)

    def _send_one(self, item: PendingSend) -> str | None:
        return self._client.send(queue=item.queue, task_id=item.task_id, group_id=item.task_id,
                                 kwargs=item.kwargs, retry_for=self._retry_for)

    def _fail(self, item: PendingSend, exc: TaskiqSyncError) -> None:
        error = type(exc)(f"step {item.step_key} (attempt {item.attempt}) of run {item.run_id} could not be "
                          f"sent: {exc}")
        with self._cond:
            self._errors.append(error)


class TaskiqStepHandler(StepHandler):
    """Stateless but for the open broker client: ids are derived from run id, step and attempt."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._client: BrokerClient | None = None
        self.sender: StepSender | None = None
        self._warned_queued: set[str] = set()  # only dedups a warning; health lives in the store

    @property
    def name(self) -> str:
        return "TaskiqStepHandler"

    @contextlib.contextmanager
    def connected(self, queues: list[str]) -> Iterator[BrokerClient]:
        with shared_bridge() as bridge:
            client = BrokerClient(self.settings.sqs, bridge, queues)
            client.start()
            self._client = client
            self.sender = StepSender(client, self.settings.broker_outage_timeout)
            try:
                yield client
            finally:
                self.sender.close(timeout=self.settings.broker_outage_timeout + 5)
                self.sender = None
                self._client = None
                client.stop()

    def _step_key(self, ctx: StepHandlerContext) -> str:
        keys = ctx.execute_step_args.step_keys_to_execute
        check.invariant(keys is not None and len(keys) == 1, "TaskiqStepHandler launches one step at a time")
        return keys[0]  # type: ignore[index]

    def _identity(self, ctx: StepHandlerContext) -> tuple[str, int, str, str]:
        """(step key, attempt, step handle id, Celery queue name) of the step in ``ctx``."""
        args = ctx.execute_step_args
        step_key = self._step_key(ctx)
        attempt = args.known_state.get_retry_state().get_attempt_count(step_key) + 1 if args.known_state else 1
        queue = queue_for_tags(ctx.step_tags[step_key], self.settings)
        return step_key, attempt, step_handle_id(args.run_id, step_key, attempt), queue

    def launch_step(self, step_handler_context: StepHandlerContext) -> Iterator[DagsterEvent]:
        sender = check.not_none(self.sender, "taskiq_executor used outside its connected() block")
        launched = time.monotonic()
        args = step_handler_context.execute_step_args
        step_key, attempt, task_id, queue = self._identity(step_handler_context)
        sqs_queue = self.settings.sqs.queue_name(queue)
        instance_ref, _ = redact_instance_ref(args.instance_ref)
        payload = serialize_value(copy_record(args, instance_ref=instance_ref))
        tags = step_handler_context.step_tags[step_key]
        sender.put(PendingSend(
            instance=step_handler_context.instance,
            run_id=args.run_id,
            step_key=step_key,
            attempt=attempt,
            task_id=task_id,
            queue=queue,
            priority=_int_tag(tags, STEP_PRIORITY_TAGS, self.settings.default_priority)
            + _int_tag(step_handler_context.dagster_run.tags, RUN_PRIORITY_TAGS, 0),
            kwargs={
                "version": MESSAGE_VERSION,
                "run_id": args.run_id,
                "step_key": step_key,
                "attempt": attempt,
                "execute_step_args": payload,
            },
        ))
        yield DagsterEvent.step_worker_starting(
            step_handler_context.get_step_context(step_key),
            message=f"Sending step {step_key} (attempt {attempt}) to SQS queue {sqs_queue!r}.",
            metadata={"queue": queue, "task_id": task_id, "attempt": str(attempt),
                      "payload_bytes": str(len(payload)),
                      "launch_ms": f"{(time.monotonic() - launched) * 1000:.1f}"},
        )

    def report_sends(self, instance, run_id: str, raise_errors: bool = True) -> None:
        """Raise a send that failed for good; log where offloaded payloads went. Called by the
        executor on every loop iteration, in the orchestrating thread."""
        sender = self.sender
        if sender is None:
            return
        if raise_errors:
            sender.raise_errors()
        offloaded = sender.take_offloaded() if sender.offloaded else []
        if offloaded:
            run = instance.get_run_by_id(run_id)
            for item, url in offloaded:
                instance.report_engine_event(
                    f"Step {item.step_key} (attempt {item.attempt}): its payload was larger than SQS queue "
                    f"{self.settings.sqs.queue_name(item.queue)!r} accepts, so the message carries a pointer to {url}.",
                    run, EngineEventData(metadata={"payload": url, "task_id": item.task_id}), step_key=item.step_key,
                )

    def check_step_health(self, step_handler_context: StepHandlerContext) -> CheckStepHealthResult:
        step_key, attempt, handle, queue = self._identity(step_handler_context)
        record = LivenessStore(step_handler_context.instance).read([handle]).get(handle)
        settings = self.settings
        now = time.time()
        if record is None or record.state == QUEUED:
            waited = record.age(now) if record else 0.0
            sqs_queue = settings.sqs.queue_name(queue)
            if settings.queued_step_timeout is not None and waited > settings.queued_step_timeout:
                return CheckStepHealthResult.unhealthy(
                    f"step {step_key} was still queued on SQS queue {sqs_queue!r} after {waited:.0f} s "
                    f"(queued_step_timeout is {settings.queued_step_timeout:g} s): no live worker "
                    f"consumes it; start one with `dagster-taskiq-sync worker start -q {queue}`."
                )
            if waited > settings.queued_step_warning and handle not in self._warned_queued:
                self._warned_queued.add(handle)
                DagsterEvent.engine_event(
                    step_handler_context.get_step_context(step_key),
                    f"Step {step_key} is still queued on SQS queue {sqs_queue!r} after {waited:.0f} s: "
                    f"no live worker has taken it. Start one with `dagster-taskiq-sync worker start "
                    f"-q {queue}`.",
                    EngineEventData(metadata={"queue": queue, "waited_seconds": f"{waited:.0f}"}),
                )
            return CheckStepHealthResult.healthy()
        if record.state == RUNNING:
            limit = max(settings.worker_lost_timeout, 3 * (record.heartbeat_interval or 0.0))
            if record.age(now) > limit:
                return CheckStepHealthResult.unhealthy(
                    f"worker {record.worker} (host {record.host}, pid {record.worker_pid}) running "
                    f"step {step_key} stopped heartbeating {record.age(now):.0f} s ago; the worker "
                    f"was lost (worker_lost_timeout is {settings.worker_lost_timeout:g} s)."
                )
            return CheckStepHealthResult.healthy()
        if record.state == EXITED and record.age(now) > EXIT_GRACE_SECONDS:
            how = record.reason or f"exit code {record.exit_code}"
            return CheckStepHealthResult.unhealthy(
                f"the process running step {step_key} on worker {record.worker} ended ({how}) "
                "without reporting a result."
            )
        return CheckStepHealthResult.healthy()

    def terminate_step(self, step_handler_context: StepHandlerContext) -> Iterator[DagsterEvent]:
        step_key, attempt, handle, _ = self._identity(step_handler_context)
        LivenessStore(step_handler_context.instance).request_cancel(handle, "the run was terminated")
        yield DagsterEvent.engine_event(
            step_handler_context.get_step_context(step_key),
            f"Asked the worker running step {step_key} (attempt {attempt}) to stop it.",
            EngineEventData(metadata={"task_id": handle}),
        )
