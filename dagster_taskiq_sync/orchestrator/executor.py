"""Who talks to Dagster on the orchestrator side: ``taskiq_executor`` (its step handler is in
``step_handler.py``).

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
from typing import Any

from dagster import DagsterRunStatus, executor, multiple_process_executor_requirements

from dagster_taskiq_sync._dagster.execution import (
    LateCommits,
    PollingStepDelegatingExecutor,
    install_step_sort_key,
    loop_wait,
    run_interrupted,
    step_launch_policy,
    step_sort_key,
)
from dagster_taskiq_sync._dagster.names import (
    EngineEventData,
    RetryMode,
    check,
)
from dagster_taskiq_sync._dagster.sqlite import run_event_log_path
from dagster_taskiq_sync.config.celery_compat import settings_from_executor_config
from dagster_taskiq_sync.config.schema import TASKIQ_CONFIG
from dagster_taskiq_sync.errors import ConfigError, TaskiqSyncError
from dagster_taskiq_sync.orchestrator.eager import EagerExecutor
from dagster_taskiq_sync.orchestrator.fair_share import LaunchPolicy, live_slots
from dagster_taskiq_sync.orchestrator.step_handler import DB_SLOW_SECONDS, TaskiqStepHandler
from dagster_taskiq_sync.storage.event_watch import RunBell, run_bell
from dagster_taskiq_sync.storage.instance import InstanceOptions, prepared
from dagster_taskiq_sync.storage.registry import WorkerRegistry
from dagster_taskiq_sync.wire.lanes import BULK, lane_queue, message_group, run_lane
from dagster_taskiq_sync.wire.messages import (
    RUN_PRIORITY_TAGS,
    STEP_PRIORITY_TAGS,
    int_tag,
)
from dagster_taskiq_sync.wire.settings import Settings
from dagster_taskiq_sync.wire.time_limits import limits_for_step

log = logging.getLogger("dagster_taskiq_sync.executor")
STATUS_CHECK_INTERVAL = 0.5  # seconds between run-status reads while steps are in flight


def literal_secrets(run_config: Any) -> list[str]:
    """The signing-key settings of ``run_config``'s executor block written as literal strings
    (rather than ``{env: NAME}``), by their config path."""
    execution = run_config.get("execution") if isinstance(run_config, dict) else None
    if not isinstance(execution, dict):
        return []
    blocks = [("execution.config", execution.get("config"))]
    blocks += [
        (f"execution.{name}.config", b.get("config"))
        for name, b in execution.items()
        if name != "config" and isinstance(b, dict)
    ]
    found = []
    for path, block in blocks:
        if not isinstance(block, dict):
            continue
        if isinstance(block.get("signing_key"), str):
            found.append(f"{path}.signing_key")
        previous = block.get("previous_signing_keys")
        if isinstance(previous, list) and any(isinstance(p, str) for p in previous):
            found.append(f"{path}.previous_signing_keys")
    return found


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
        # tests rely on it. Dagster's in-process executor is exactly that (which says in the run's
        # log which steps' time limits it cannot apply).
        return EagerExecutor(settings, retries=check.not_none(RetryMode.from_config(config["retries"])))
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
        self._bell: RunBell | None = None
        self._read_at = 0.0  # when the loop last read the event log

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
        if self._bell is not None:
            self._bell.clear()  # before the read: a change during it rings again
        self._read_at = started
        events = super()._pop_events(instance, run_id, seen_storage_ids)
        if time.monotonic() - started > DB_SLOW_SECONDS:
            self._taskiq_handler.database_was_down()
        now = time.time()
        for event in events:
            if event.is_step_success or event.is_step_failure or event.is_step_up_for_retry:
                self._taskiq_handler.step_finished(event.step_key)
                if not event.is_step_up_for_retry and log.isEnabledFor(logging.DEBUG):
                    # bin/bench reads seen_at: when the orchestrator learned of the step's end.
                    log.debug(
                        "run %s: read the result of step %s",
                        run_id,
                        event.step_key,
                        extra={"run_id": run_id, "step_key": event.step_key, "seen_at": now},
                    )
        return events

    def _wait(self, seconds: float) -> None:
        """Dagster's wait between two reads of the event log: until the run's bell rings, at most
        ``seconds``. With one step in flight (a chain) its end is read at once. With several, each
        of their ~12 events would ring for a read and a loop iteration (orchestrator CPU per step
        +40% at fanout-100), so the next read comes no sooner than half of ``seconds`` after the
        last one: a step's end is still seen sooner than by polling, at a bounded cost."""
        bell = self._bell
        if bell is None:
            time.sleep(seconds)
            return
        now = time.monotonic()
        until = now + seconds
        if self._taskiq_handler.steps_in_flight > 1:
            time.sleep(max(0.0, min(until, self._read_at + seconds / 2) - now))
        bell.wait(max(0.0, until - time.monotonic()))

    def execute(self, plan_context, execution_plan):  # Dagster's signature
        for note in self.settings.notes:
            plan_context.log.warning(note)
        for setting in literal_secrets(plan_context.dagster_run.run_config):
            plan_context.log.warning(
                f"{setting} is written into the run config as a literal, so it is stored with the run and shown "
                "to anyone who can see the run in Dagster's UI; give it as {env: NAME} and rotate this key."
            )
        install_step_sort_key()
        run_priority = int_tag(plan_context.dagster_run.tags, RUN_PRIORITY_TAGS, 0)
        default_priority = self.settings.default_priority
        self._warn_on_priorities(plan_context, execution_plan, run_priority)
        sort_token = step_sort_key.set(
            lambda step: -(int_tag(step.tags, STEP_PRIORITY_TAGS, default_priority) + run_priority)
        )
        self._canceled = False
        interrupt_token = run_interrupted.set(lambda: self._canceled)
        handler = self._taskiq_handler
        try:
            self._choose_lane(plan_context, execution_plan, run_priority)
        except TaskiqSyncError as exc:
            plan_context.log.error(str(exc))
            step_sort_key.reset(sort_token)
            run_interrupted.reset(interrupt_token)
            raise
        decisions = [handler.decision(step.key, step.tags) for step in execution_plan.steps]
        queues = {d.queue for d in decisions if d.refused is None} or {self.settings.sqs.default_queue}
        self._queues, self._caps_said = sorted(queues), set()
        self._policy = LaunchPolicy(
            self.settings.sqs.default_queue,
            self.settings.steps_in_flight_per_slot,
            self.settings.min_steps_in_flight,
            on_launching=self._taskiq_handler.expect_launches,
            route=self._taskiq_handler.queue_of,
        )
        policy_token = step_launch_policy.set(self._policy)
        # The loop below reads the event log whenever the run's events change, and at least every
        # step_poll_interval: on PostgreSQL, one connection for the run rather than one per read,
        # and reads that ride out a restart.
        instance = prepared(
            plan_context.instance, InstanceOptions.from_env(outage_timeout=self.settings.database_outage_timeout)
        )
        # sqlite commits a run's events in the order of their ids; other databases may not.
        self.late_commits = None if run_event_log_path(instance, plan_context.run_id) else LateCommits()
        with contextlib.ExitStack() as stack:
            self._bell = stack.enter_context(run_bell(instance, plan_context.run_id))
            wait_token = loop_wait.set(self._wait)
            stack.callback(loop_wait.reset, wait_token)
            stack.callback(setattr, self, "_bell", None)
            try:
                if self._config_error is not None:
                    raise self._config_error
                self._check_time_limits(execution_plan)  # before anything is sent
                stack.enter_context(
                    self._taskiq_handler.connected(
                        plan_context.instance, plan_context.run_id, sorted(queues), bulk=bool(handler.lanes)
                    )
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

    def _check_time_limits(self, execution_plan: Any) -> None:
        """Every step's time-limit tags, read now: a bad one fails the run naming the tag and the op."""
        for step in execution_plan.steps:
            limits_for_step(
                str(step.node_handle),
                step.tags or {},
                self.settings.task_time_limit,
                self.settings.task_soft_time_limit,
            )

    def _choose_lane(self, plan_context: Any, execution_plan: Any, run_priority: int) -> None:
        """The run's fair-queue group, and for a bulk run (lanes.run_lane) the bulk lane of each of
        its queues that a live worker consumes; the others keep their queue (an old worker knows no
        lane: nothing is sent where nobody would take it)."""
        run = plan_context.dagster_run
        handler = self._taskiq_handler
        handler.group = message_group(run.run_id, run.tags, self.settings.message_group_tag)
        if not self.settings.lanes:
            return
        lane, why = run_lane(run.tags, run_priority)
        if lane != BULK:
            return
        queues = {handler.queue_of(step.key, step.tags) for step in execution_plan.steps}
        try:
            slots = live_slots(WorkerRegistry(plan_context.instance).workers())
        except Exception as exc:  # noqa: BLE001 - no registry: no lane (the queue itself always works)
            log.warning("run %s: could not read the worker registry for its lanes: %s", run.run_id, exc)
            slots = {}
        sqs = self.settings.sqs
        for queue in sorted(queues):
            bulk = lane_queue(queue, sqs.queue_name(queue))
            if bulk is None:
                continue
            if slots.get(bulk):
                handler.lanes[queue] = bulk
                plan_context.log.info(
                    f"This run's steps for SQS queue {sqs.queue_name(queue)!r} go to its bulk lane "
                    f"{sqs.queue_name(bulk)!r} because {why}: interactive runs' steps are served first."
                )
            else:
                plan_context.log.info(
                    f"This run is bulk ({why}) but no live worker consumes {sqs.queue_name(bulk)!r}, so its "
                    f"steps stay on {sqs.queue_name(queue)!r} (workers consume lanes with execution.config.lanes)."
                )

    def _warn_on_priorities(self, plan_context: Any, execution_plan: Any, run_priority: int) -> None:
        with_priority = [s.key for s in execution_plan.steps if any(t in s.tags for t in STEP_PRIORITY_TAGS)]
        if with_priority or run_priority:
            plan_context.log.warning(
                "Step and run priorities (dagster-taskiq/, dagster-celery/ and dagster/priority tags): SQS has no "
                "message priority; ready steps are sent in priority order (higher first), as dagster-celery's "
                "orchestrator does, but a step already in the queue is not overtaken by a later, higher one. "
                "With execution.config.lanes, runs of negative priority go to the bulk lane and are served after "
                "the others."
            )
