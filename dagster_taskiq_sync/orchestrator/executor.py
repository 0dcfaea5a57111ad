"""Who talks to Dagster on the orchestrator side: ``taskiq_executor`` and its step handler.

Steps go through Dagster's own step-delegation machinery (``StepDelegatingExecutor``), which
already gives ordering, retries, ``max_concurrent``, tag concurrency limits, op concurrency
pools, resume and termination, and which reads step events from the instance's event log. The
handler's only job is to turn "launch this step" into one :class:`~.messages.StepMessage`, which
the background :class:`~.sender.StepSender` puts on SQS, and to answer health checks from the
step attempt's liveness record.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from dagster import DagsterRunStatus, executor, multiple_process_executor_requirements

from dagster_taskiq_sync._dagster.execution import (
    PollingStepDelegatingExecutor,
    install_step_sort_key,
    run_interrupted,
    step_launch_policy,
    step_sort_key,
)
from dagster_taskiq_sync._dagster.names import (
    CheckStepHealthResult,
    DagsterEvent,
    EngineEventData,
    InProcessExecutor,
    RetryMode,
    StepHandler,
    StepHandlerContext,
    check,
    serialize_value,
)
from dagster_taskiq_sync.config.celery_compat import settings_from_executor_config
from dagster_taskiq_sync.config.schema import TASKIQ_CONFIG
from dagster_taskiq_sync.errors import ConfigError, TaskiqSyncError
from dagster_taskiq_sync.orchestrator.fair_share import LaunchPolicy, live_slots
from dagster_taskiq_sync.orchestrator.sender import PendingSend, StepSender
from dagster_taskiq_sync.storage.instance import InstanceOptions, prepared
from dagster_taskiq_sync.storage.liveness import (
    DEAD_LETTERED,
    EXITED,
    FINAL_DELIVERY,
    QUEUED,
    RUNNING,
    LivenessStore,
    StepRecord,
)
from dagster_taskiq_sync.storage.registry import WorkerRegistry
from dagster_taskiq_sync.wire.bridge import shared_bridge
from dagster_taskiq_sync.wire.broker_client import BrokerClient
from dagster_taskiq_sync.wire.messages import (
    RUN_PRIORITY_TAGS,
    STEP_PRIORITY_TAGS,
    StepMessage,
    encode,
    int_tag,
    queue_for_tags,
)
from dagster_taskiq_sync.wire.settings import Settings

log = logging.getLogger("dagster_taskiq_sync.executor")
STATUS_CHECK_INTERVAL = 0.5  # seconds between run-status reads while steps are in flight
# A step process that exited is given this long for its last events to be read before the
# orchestrator concludes it ended without reporting a result.
EXIT_GRACE_SECONDS = 3.0
DB_SLOW_SECONDS = 2.0  # a liveness read slower than this waited out a database outage
# Dagster checks every in-flight step in one loop iteration: records read for the first answer
# the rest of the round (and nothing older than this).
ROUND_SECONDS = 1.0

_result_observers: list[Callable[[str, str, float], None]] = []


def observe_results(callback: Callable[[str, str, float], None]) -> None:
    """Call ``callback(run_id, step_key, wall_time)`` when the orchestrator reads a step's
    success or failure from the event log (``bin/bench`` measures that link with it)."""
    _result_observers.append(callback)


@executor(
    name="taskiq",
    config_schema=TASKIQ_CONFIG,
    requirements=multiple_process_executor_requirements(),
)
def taskiq_executor(init_context):  # Dagster's executor factory
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
        return InProcessExecutor(retries=check.not_none(RetryMode.from_config(config["retries"])))
    return TaskiqExecutor(
        settings,
        retries=check.not_none(RetryMode.from_config(config["retries"])),
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
        self._canceled = False
        self._policy: LaunchPolicy | None = None
        self._queues: list[str] = []
        self._next_cap_refresh = 0.0
        self._caps_said: set[str] = set()

    def _refresh_caps(self, instance: Any, run_id: str) -> None:
        """Per-queue caps on this run's steps in flight, from the live workers' slots (fair_share.py)."""
        policy = self._policy
        if policy is None or policy.per_slot is None:
            return
        self._next_cap_refresh = time.monotonic() + self.settings.health_check_interval
        try:
            slots = live_slots(WorkerRegistry(instance).workers())
        except Exception as exc:  # noqa: BLE001 - any registry read failure: keep the caps we have (none before the first read: no cap)
            log.warning("run %s: could not read the worker registry for its in-flight caps: %s", run_id, exc)
            return
        policy.refresh(self._queues, slots)

    def _say_caps(self, instance: Any, run_id: str) -> None:
        """Once per queue, when the cap first holds steps back: say so in the run's log."""
        policy = self._policy
        if policy is None:
            return
        for queue in sorted(policy.held_queues - self._caps_said):
            self._caps_said.add(queue)
            instance.report_engine_event(
                f"This run keeps at most {policy.caps.get(queue)} of its steps in flight on SQS queue "
                f"{self.settings.sqs.queue_name(queue)!r} ({policy.per_slot:g} per live worker slot, "
                f"{policy.slots.get(queue, 0)} slots, at least {policy.floor}), so other runs' steps are not "
                "queued behind all of it; the others are sent as these finish (execution.config."
                "steps_in_flight_per_slot, 'none' for no cap).",
                instance.get_run_by_id(run_id),
                EngineEventData(
                    metadata={
                        "queue": queue,
                        "cap": str(policy.caps.get(queue)),
                        "live_slots": str(policy.slots.get(queue, 0)),
                    }
                ),
            )

    def on_poll(self, instance: Any, run_id: str) -> None:
        """Fail the run on a step that could not be sent, and stop orchestrating as soon as the
        run is being canceled (UI, report_run_canceling).

        Workers watch the run's status too and kill its running steps; Dagster then ends the
        run CANCELED because its status is CANCELING when the interrupt reaches it.
        """
        self._taskiq_handler.report_sends(instance, run_id)
        now = time.monotonic()
        if self._policy is not None:
            if now >= self._next_cap_refresh:
                self._refresh_caps(instance, run_id)
            if self._policy.held_queues - self._caps_said:
                self._say_caps(instance, run_id)
        if now < self._next_status_check:
            return
        self._next_status_check = now + STATUS_CHECK_INTERVAL
        run = instance.get_run_by_id(run_id)
        if run is not None and run.status in (DagsterRunStatus.CANCELING, DagsterRunStatus.CANCELED):
            # Dagster's loop sees it on its next check for interrupts (run_interrupted): it logs the
            # termination, asks each running step's worker to stop it, and ends the run CANCELED.
            self._canceled = True

    def _pop_events(self, instance, run_id, seen_storage_ids):  # Dagster's signature
        started = time.monotonic()
        events = super()._pop_events(instance, run_id, seen_storage_ids)
        if time.monotonic() - started > DB_SLOW_SECONDS:
            self._taskiq_handler.database_was_down()
        now = time.time()
        for event in events:
            if event.is_step_success or event.is_step_failure or event.is_step_up_for_retry:
                self._taskiq_handler.step_finished(event.step_key)
                if _result_observers and not event.is_step_up_for_retry:
                    for observer in _result_observers:
                        observer(run_id, event.step_key, now)
        return events

    def execute(self, plan_context, execution_plan):  # Dagster's signature
        for note in self.settings.notes:
            plan_context.log.warning(note)
        install_step_sort_key()
        run_priority = int_tag(plan_context.dagster_run.tags, RUN_PRIORITY_TAGS, 0)
        default_priority = self.settings.default_priority
        self._warn_on_priorities(plan_context, execution_plan, run_priority)
        sort_token = step_sort_key.set(
            lambda step: -(int_tag(step.tags, STEP_PRIORITY_TAGS, default_priority) + run_priority)
        )
        self._canceled = False
        interrupt_token = run_interrupted.set(lambda: self._canceled)
        queues = {queue_for_tags(step.tags, self.settings.sqs.default_queue) for step in execution_plan.steps}
        self._queues, self._caps_said = sorted(queues), set()
        self._policy = LaunchPolicy(
            self.settings.sqs.default_queue,
            self.settings.steps_in_flight_per_slot,
            self.settings.min_steps_in_flight,
            on_launching=self._taskiq_handler.expect_launches,
        )
        policy_token = step_launch_policy.set(self._policy)
        # The loop below reads the event log every step_poll_interval: on PostgreSQL, one
        # connection for the run rather than one per read, and reads that ride out a restart.
        prepared(plan_context.instance, InstanceOptions.from_env(outage_timeout=self.settings.database_outage_timeout))
        with contextlib.ExitStack() as stack:
            try:
                if self._config_error is not None:
                    raise self._config_error
                stack.enter_context(
                    self._taskiq_handler.connected(plan_context.instance, plan_context.run_id, sorted(queues))
                )
            except TaskiqSyncError as exc:
                # One sentence in the run's log before Dagster records the failure.
                plan_context.log.error(str(exc))
                step_sort_key.reset(sort_token)
                run_interrupted.reset(interrupt_token)
                step_launch_policy.reset(policy_token)
                raise
            try:
                self._refresh_caps(plan_context.instance, plan_context.run_id)
                yield from super().execute(plan_context, execution_plan)
            finally:
                step_sort_key.reset(sort_token)
                run_interrupted.reset(interrupt_token)
                step_launch_policy.reset(policy_token)
                self._taskiq_handler.finish(plan_context.instance, plan_context.run_id)

    def _warn_on_priorities(self, plan_context: Any, execution_plan: Any, run_priority: int) -> None:
        with_celery = [s.key for s in execution_plan.steps if any(t in s.tags for t in STEP_PRIORITY_TAGS)]
        if with_celery or run_priority:
            plan_context.log.warning(
                "dagster-celery/priority and dagster-celery/run_priority: SQS has no message priority; "
                "ready steps are sent in priority order (higher first), as dagster-celery's orchestrator "
                "does, but a step already in the queue is not overtaken by a later, higher one."
            )
        misused = [
            s.key
            for s in execution_plan.steps
            if s.tags.get("dagster/priority") is not None and not any(t in s.tags for t in STEP_PRIORITY_TAGS)
        ]
        if misused:
            plan_context.log.warning(
                'The following steps do not have "dagster-celery/priority" set but do have '
                f'"dagster/priority" set, which taskiq_executor does not use: [{", ".join(misused)}]. '
                'Set "dagster-celery/priority" instead.'
            )


class TaskiqStepHandler(StepHandler):
    """Stateless but for the open broker client: ids are derived from run id, step and attempt.

    Health lives in the instance's liveness records. Dagster asks about each in-flight step in
    turn every health-check round; one read answers the whole round (``_round_records``), so a
    round costs one query, not one per step in flight. The step -> id map it reads for is only
    a list of what to read: a step missing from it is read on its own.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.sender: StepSender | None = None
        self._warned_queued: set[str] = set()  # only dedups a warning; health lives in the store
        self._database_back_at = 0.0  # wall clock: heartbeats older than an outage do not mean "lost"
        self._run_id = ""
        self._next_probe = 0.0
        self._in_flight: dict[str, str] = {}  # step key -> step handle id of its attempt in flight
        self._round: dict[str, StepRecord] = {}  # the current health-check round's records
        self._round_handles: set[str] = set()
        self._round_at = -1e9

    @property
    def name(self) -> str:
        return "TaskiqStepHandler"

    @contextlib.contextmanager
    def connected(self, instance: Any, run_id: str, queues: list[str]) -> Iterator[BrokerClient]:
        self._run_id = run_id
        with shared_bridge() as bridge:
            client = BrokerClient(self.settings.sqs, bridge, queues, keyring=self.settings.keyring, dead_letters=False)
            client.start()
            sender = self.sender = StepSender(client, instance, self.settings.broker_outage_timeout)
            try:
                yield client
            finally:
                sender.close(timeout=self.settings.broker_outage_timeout + 5)
                self.sender = None
                client.stop()

    def expect_launches(self, count: int) -> None:
        """Dagster is about to launch ``count`` steps: the sender sends them together."""
        if self.sender is not None:
            self.sender.expect(count)

    def step_finished(self, step_key: str | None) -> None:
        """The orchestrator read the step's result: no more health checks for it."""
        if step_key is not None:
            self._in_flight.pop(step_key, None)

    def _round_records(self, instance: Any, handle: str) -> dict[str, StepRecord]:
        """The liveness records of every step in flight, read once per health-check round."""
        now = time.monotonic()
        if handle in self._round_handles and now - self._round_at < ROUND_SECONDS:
            return self._round
        handles = set(self._in_flight.values()) | {handle}
        records = LivenessStore(instance).read(handles)
        if time.monotonic() - now > DB_SLOW_SECONDS:
            self.database_was_down()
        self._round, self._round_handles, self._round_at = records, handles, time.monotonic()
        return records

    def finish(self, instance: Any, run_id: str) -> None:
        """The run's execution is over: send what is left, say what failed, forget its records."""
        sender = self.sender
        if sender is None:
            return
        sender.flush(timeout=5)
        self.report_sends(instance, run_id, raise_errors=False)
        try:  # bounded state: the run's step records are no use to anyone now
            LivenessStore(instance).forget(
                sender.sent_task_ids, run_id=run_id, outage_timeout=self.settings.database_outage_timeout
            )
        except Exception as exc:  # noqa: BLE001 - workers' sweep deletes them later
            log.warning("could not delete the step records of run %s: %s", run_id, exc)

    def _probe_writes(self, instance: Any) -> None:
        """Once per health-check round, one write: if it had to wait (a locked sqlite, a restarting
        PostgreSQL), workers' heartbeat writes had to wait too, and stale records do not mean lost."""
        now = time.monotonic()
        if now < self._next_probe:
            return
        LivenessStore(instance).probe(self._run_id)
        if time.monotonic() - now > DB_SLOW_SECONDS:
            self.database_was_down()
        self._next_probe = time.monotonic() + max(0.5, self.settings.health_check_interval / 2)

    def database_was_down(self) -> None:
        """A read of the instance just waited out a database outage: workers could not heartbeat
        during it either, so their stale records do not mean they were lost."""
        if time.time() - self._database_back_at > DB_SLOW_SECONDS:
            log.warning(
                "the Dagster instance's database was unavailable; workers get %g s (worker_lost_timeout) "
                "to heartbeat again before a step counts as lost",
                self.settings.worker_lost_timeout,
            )
        self._database_back_at = time.time()

    def _identity(self, ctx: StepHandlerContext) -> tuple[str, int, str, str]:
        """(step key, attempt, step handle id, Celery queue name) of the step in ``ctx``."""
        args = ctx.execute_step_args
        keys = args.step_keys_to_execute
        check.invariant(keys is not None and len(keys) == 1, "TaskiqStepHandler launches one step at a time")
        step_key = keys[0]  # type: ignore[index]  # checked just above
        attempt = args.known_state.get_retry_state().get_attempt_count(step_key) + 1 if args.known_state else 1
        message = StepMessage(args.run_id, step_key, attempt, "")
        return (
            step_key,
            attempt,
            message.handle,
            queue_for_tags(ctx.step_tags[step_key], self.settings.sqs.default_queue),
        )

    def launch_step(self, step_handler_context: StepHandlerContext) -> Iterator[DagsterEvent]:
        sender = check.not_none(self.sender, "taskiq_executor used outside its connected() block")
        launched = time.monotonic()
        args = step_handler_context.execute_step_args
        step_key, attempt, task_id, queue = self._identity(step_handler_context)
        self._in_flight[step_key] = task_id
        sqs_queue = self.settings.sqs.queue_name(queue)
        message = StepMessage(args.run_id, step_key, attempt, serialize_value(args.known_state))
        body = encode(message, sqs_queue)
        tags = step_handler_context.step_tags[step_key]
        sender.put(
            PendingSend(
                run_id=args.run_id,
                step_key=step_key,
                attempt=attempt,
                task_id=task_id,
                queue=queue,
                priority=int_tag(tags, STEP_PRIORITY_TAGS, self.settings.default_priority)
                + int_tag(step_handler_context.dagster_run.tags, RUN_PRIORITY_TAGS, 0),
                body=body,
            )
        )
        yield DagsterEvent.step_worker_starting(
            step_handler_context.get_step_context(step_key),
            message=f"Sending step {step_key} (attempt {attempt}) to SQS queue {sqs_queue!r}.",
            metadata={
                "queue": queue,
                "task_id": task_id,
                "attempt": str(attempt),
                "payload_bytes": str(len(body)),
                "launch_ms": f"{(time.monotonic() - launched) * 1000:.1f}",
            },
        )

    def report_sends(self, instance: Any, run_id: str, raise_errors: bool = True) -> None:
        """Raise a send that failed for good; log where offloaded payloads went. Called by the
        executor on every loop iteration, in the orchestrating thread."""
        sender = self.sender
        if sender is None:
            return
        if raise_errors:
            sender.raise_errors()
        offloaded = sender.take_offloaded()
        if offloaded:
            run = instance.get_run_by_id(run_id)
            for item, url in offloaded:
                instance.report_engine_event(
                    f"Step {item.step_key} (attempt {item.attempt}): its payload was larger than SQS queue "
                    f"{self.settings.sqs.queue_name(item.queue)!r} accepts, so the message carries a pointer to {url}.",
                    run,
                    EngineEventData(metadata={"payload": url, "task_id": item.task_id}),
                    step_key=item.step_key,
                )

    def check_step_health(self, step_handler_context: StepHandlerContext) -> CheckStepHealthResult:
        step_key, _attempt, handle, queue = self._identity(step_handler_context)
        self._probe_writes(step_handler_context.instance)
        self._in_flight.setdefault(step_key, handle)  # a resumed run's step from before
        record = self._round_records(step_handler_context.instance, handle).get(handle)
        now = time.time()
        if record is None or record.state in (QUEUED, FINAL_DELIVERY):
            return self._queued_health(step_handler_context, step_key, handle, queue, record, now)
        if record.state == RUNNING:
            lost = record.lost_for(self.settings.worker_lost_timeout, now)
            # After a database outage, workers get a full worker_lost_timeout to heartbeat again.
            if lost is not None and time.time() - self._database_back_at > self.settings.worker_lost_timeout:
                return CheckStepHealthResult.unhealthy(
                    f"worker {record.worker} (host {record.host}, pid {record.worker_pid}) running "
                    f"step {step_key} stopped heartbeating {lost:.0f} s ago; the worker "
                    f"was lost (worker_lost_timeout is {self.settings.worker_lost_timeout:g} s)."
                )
            return CheckStepHealthResult.healthy()
        if record.state == DEAD_LETTERED:
            return CheckStepHealthResult.unhealthy(
                f"step {step_key} can never run: worker {record.worker} moved its message from SQS queue "
                f"{self.settings.sqs.queue_name(queue)!r} {record.reason or ''}"
            )
        if record.state == EXITED and record.age(now) > EXIT_GRACE_SECONDS:
            how = record.reason or f"exit code {record.exit_code}"
            return CheckStepHealthResult.unhealthy(
                f"the process running step {step_key} on worker {record.worker} ended ({how}) "
                "without reporting a result."
            )
        return CheckStepHealthResult.healthy()

    def _queued_health(
        self, ctx: StepHandlerContext, step_key: str, handle: str, queue: str, record: StepRecord | None, now: float
    ) -> CheckStepHealthResult:
        settings = self.settings
        sqs_queue = settings.sqs.queue_name(queue)
        if record is not None and record.state == FINAL_DELIVERY:
            # Its last allowed delivery went back to the queue unrun (a worker stopped or died with
            # it): SQS's redrive policy moves it to the dead-letter queue on the next receive.
            silent = record.age(now) - (settings.sqs.visibility_timeout + 2 * settings.sqs.wait_time_seconds + 10)
            if silent > 0:
                return CheckStepHealthResult.unhealthy(
                    f"step {step_key} was dead-lettered: its message on SQS queue {sqs_queue!r} was received "
                    f"{record.reason or 'its maxReceiveCount times'} without running, so the queue's redrive policy "
                    f"moved it to {record.queue or 'its dead-letter queue'}; see `dagster-taskiq-sync queues redrive`."
                )
            return CheckStepHealthResult.healthy()
        waited = record.age(now) if record else 0.0
        if settings.queued_step_timeout is not None and waited > settings.queued_step_timeout:
            return CheckStepHealthResult.unhealthy(
                f"step {step_key} was still queued on SQS queue {sqs_queue!r} after {waited:.0f} s "
                f"(queued_step_timeout is {settings.queued_step_timeout:g} s): no live worker "
                f"consumes it; start one with `dagster-taskiq-sync worker start -q {queue}`."
            )
        if waited > settings.queued_step_warning and handle not in self._warned_queued:
            self._warned_queued.add(handle)
            DagsterEvent.engine_event(
                ctx.get_step_context(step_key),
                f"Step {step_key} is still queued on SQS queue {sqs_queue!r} after {waited:.0f} s: "
                f"no live worker has taken it. Start one with `dagster-taskiq-sync worker start "
                f"-q {queue}`.",
                EngineEventData(metadata={"queue": queue, "waited_seconds": f"{waited:.0f}"}),
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
