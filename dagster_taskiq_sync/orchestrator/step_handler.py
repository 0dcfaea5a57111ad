"""``taskiq_executor``'s step handler: one step -> one message, health from liveness records.

Dagster's ``StepDelegatingExecutor`` calls it to launch, check and terminate steps. Launching
turns a step into one :class:`~dagster_taskiq_sync.wire.messages.StepMessage` for the
background :class:`~dagster_taskiq_sync.orchestrator.sender.StepSender`; health is read from the
step attempt's liveness record (``storage/liveness.py``), never held in memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Generator, Iterator
from typing import Any

from dagster_taskiq_sync._dagster.names import (
    CheckStepHealthResult,
    DagsterEvent,
    EngineEventData,
    SerializableErrorInfo,
    StepFailureData,
    StepHandler,
    StepHandlerContext,
    check,
    serialize_value,
)
from dagster_taskiq_sync.orchestrator.sender import PendingSend, StepSender, send_span
from dagster_taskiq_sync.storage.liveness import (
    DEAD_LETTERED,
    EXITED,
    FINAL_DELIVERY,
    QUEUED,
    RUNNING,
    LivenessStore,
    StepRecord,
)
from dagster_taskiq_sync.wire.bridge import Bridge, shared_bridge
from dagster_taskiq_sync.wire.broker_client import BrokerClient
from dagster_taskiq_sync.wire.lanes import BULK, BULK_ORCHESTRATOR_NICENESS, LANE_TAG, lowered_thread_priority
from dagster_taskiq_sync.wire.messages import (
    RUN_PRIORITY_TAGS,
    STEP_PRIORITY_TAGS,
    StepMessage,
    encode,
    int_tag,
)
from dagster_taskiq_sync.wire.routing import Decision
from dagster_taskiq_sync.wire.settings import Settings
from dagster_taskiq_sync.wire.time_limits import limits_for_step
from dagster_taskiq_sync.wire.tracing import FLUSH_SECONDS, active

log = logging.getLogger("dagster_taskiq_sync.executor")
# A step process that exited is given this long for its last events to be read before the
# orchestrator concludes it ended without reporting a result.
EXIT_GRACE_SECONDS = 3.0
DB_SLOW_SECONDS = 2.0  # a liveness read slower than this waited out a database outage
# Dagster checks every in-flight step in one loop iteration: records read for the first answer
# the rest of the round (and nothing older than this).
ROUND_SECONDS = 1.0


class TaskiqStepHandler(StepHandler):
    """Launches, checks and terminates one run's steps. A step's id is derived from its run id,
    step key and attempt, and its health lives in the instance's liveness records, so nothing here
    is needed to find a step again; what it keeps is the open sender, warning dedup, the steps in
    flight (a list of what to read) and the current health-check round's records.

    Dagster asks about each in-flight step in
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
        self._in_flight: dict[str, str] = {}  # step key -> step task id of its attempt in flight
        self._round: dict[str, StepRecord] = {}  # the current health-check round's records
        self._round_task_ids: set[str] = set()
        self._round_at = -1e9
        self._decisions: dict[str, Decision] = {}  # step key -> its queue (routing.py), decided once
        self._routes_said: set[str] = set()  # steps whose route is in the run's log
        self.lanes: dict[str, str] = {}  # queue -> its bulk lane, for a bulk run whose lane a live worker consumes
        self.group: str | None = None  # the run's fair-queue MessageGroupId (lanes.message_group)

    @property
    def name(self) -> str:
        return "TaskiqStepHandler"

    @contextlib.contextmanager
    def connected(self, instance: Any, run_id: str, queues: list[str], bulk: bool = False) -> Iterator[BrokerClient]:
        """SQS clients and the step sender for the run's ``queues``. A ``bulk`` run's orchestrating
        thread yields the CPU to interactive runs for the run (lanes.lowered_thread_priority), and
        so do the threads it starts: its sender, and an event-loop thread of its own (an
        interactive run in the same process keeps the process's shared one, at its priority)."""
        self._run_id = run_id
        with contextlib.ExitStack() as stack:
            if bulk:
                stack.enter_context(
                    lowered_thread_priority(BULK_ORCHESTRATOR_NICENESS, f"the orchestrating thread of run {run_id}")
                )
                bridge = stack.enter_context(Bridge(name=f"taskiq-bridge-bulk-{run_id[:8]}"))
            else:
                bridge = stack.enter_context(shared_bridge())
            client = BrokerClient(self.settings.sqs, bridge, queues, keyring=self.settings.keyring, dead_letters=False)
            client.start()
            sender = self.sender = StepSender(client, instance, self.settings.broker_outage_timeout)
            try:
                yield client
            finally:
                sender.close(timeout=self.settings.broker_outage_timeout + 5)
                self.sender = None
                client.stop()
                if (tracing := active()) is not None:  # a run process may exit right after its run
                    tracing.flush(FLUSH_SECONDS)

    def expect_launches(self, count: int) -> None:
        """Dagster is about to launch ``count`` steps: the sender sends them together."""
        if self.sender is not None:
            self.sender.expect(count)

    @property
    def steps_in_flight(self) -> int:
        return len(self._in_flight)

    def step_finished(self, step_key: str | None) -> None:
        """The orchestrator read the step's result: no more health checks for it."""
        if step_key is not None:
            self._in_flight.pop(step_key, None)

    def _round_records(self, instance: Any, task_id: str) -> dict[str, StepRecord]:
        """The liveness records of every step in flight, read once per health-check round."""
        now = time.monotonic()
        if task_id in self._round_task_ids and now - self._round_at < ROUND_SECONDS:
            return self._round
        task_ids = set(self._in_flight.values()) | {task_id}
        records = LivenessStore(instance).read(task_ids)
        if time.monotonic() - now > DB_SLOW_SECONDS:
            self.database_was_down()
        self._round, self._round_task_ids, self._round_at = records, task_ids, time.monotonic()
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

    def decision(self, step_key: str, tags: Any) -> Decision:
        """Where ``step_key`` goes: its queue tag, else the first route (execution.config.routes) it
        fits, else the default queue; or refused when it is larger than every pool it matches."""
        found = self._decisions.get(step_key)
        if found is None:
            found = self.settings.routes.decide(step_key, tags, self.settings.sqs.default_queue)
            # With lanes, a queue tag naming a bulk lane fails the step (which lane it meant is unknown).
            refusal = self.settings.lane_name_refusal(
                found.queue, f"step {step_key}'s queue tag", f"tag the step {{base}} and the run {LANE_TAG}: {BULK}"
            )
            if refusal is not None and found.refused is None:
                found = dataclasses.replace(found, queue=self.settings.sqs.default_queue, refused=refusal)
            self._decisions[step_key] = found
        lane = self.lanes.get(found.queue)
        return dataclasses.replace(found, queue=lane) if lane and found.refused is None else found

    def queue_of(self, step_key: str, tags: Any) -> str:
        return self.decision(step_key, tags).queue

    def _identity(self, ctx: StepHandlerContext) -> tuple[str, int, str, str]:
        """(step key, attempt, step task id, Celery queue name) of the step in ``ctx``."""
        args = ctx.execute_step_args
        keys = args.step_keys_to_execute
        check.invariant(keys is not None and len(keys) == 1, "TaskiqStepHandler launches one step at a time")
        step_key = keys[0]  # type: ignore[index]  # checked just above
        attempt = args.known_state.get_retry_state().get_attempt_count(step_key) + 1 if args.known_state else 1
        message = StepMessage(args.run_id, step_key, attempt, "")
        return (
            step_key,
            attempt,
            message.task_id,
            self.queue_of(step_key, ctx.step_tags[step_key]),
        )

    def launch_step(self, step_handler_context: StepHandlerContext) -> Iterator[DagsterEvent]:
        sender = check.not_none(self.sender, "taskiq_executor used outside its connected() block")
        launched = time.monotonic()
        args = step_handler_context.execute_step_args
        step_key, attempt, task_id, queue = self._identity(step_handler_context)
        routed = yield from self._say_route(step_handler_context, step_key)
        if not routed:
            return
        self._in_flight[step_key] = task_id
        sqs_queue = self.settings.sqs.queue_name(queue)
        tags = step_handler_context.step_tags[step_key]
        # Every step's tags were checked when the run started (TaskiqExecutor._check_time_limits).
        limits = limits_for_step(step_key, tags, self.settings.task_time_limit, self.settings.task_soft_time_limit)
        message = StepMessage(args.run_id, step_key, attempt, serialize_value(args.known_state), limits)
        span = None
        if (tracing := active()) is not None:
            message, span = send_span(tracing, message, queue, sqs_queue, step_handler_context.dagster_run.job_name)
        body = encode(message, sqs_queue)
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
                span=span,
                group=self.group,
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

    def _say_route(self, ctx: StepHandlerContext, step_key: str) -> Generator[DagsterEvent, None, bool]:
        """Fail a step no pool takes (it would wait forever); say once where a route sent a step.
        Returns (as the generator's value) whether the step may be sent."""
        decision = self.decision(step_key, ctx.step_tags[step_key])
        if decision.refused is not None:
            if self.sender is not None:
                self.sender.withdraw()
            error = SerializableErrorInfo(message=decision.refused, stack=[], cls_name=None)
            yield DagsterEvent.step_failure_event(ctx.get_step_context(step_key), StepFailureData(error, None))
            return False
        if decision.reason is not None and step_key not in self._routes_said:
            self._routes_said.add(step_key)
            yield DagsterEvent.engine_event(
                ctx.get_step_context(step_key),
                f"step {step_key} -> queue {decision.queue}: {decision.reason}",
                EngineEventData(metadata={"queue": decision.queue, "route": decision.route or ""}),
            )
        return True

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
        step_key, _attempt, task_id, queue = self._identity(step_handler_context)
        self._probe_writes(step_handler_context.instance)
        self._in_flight.setdefault(step_key, task_id)  # a resumed run's step from before
        record = self._round_records(step_handler_context.instance, task_id).get(task_id)
        now = time.time()
        if record is None or record.state in (QUEUED, FINAL_DELIVERY):
            return self._queued_health(step_handler_context, step_key, task_id, queue, record, now)
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
        self, ctx: StepHandlerContext, step_key: str, task_id: str, queue: str, record: StepRecord | None, now: float
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
        if waited > settings.queued_step_warning and task_id not in self._warned_queued:
            self._warned_queued.add(task_id)
            DagsterEvent.engine_event(
                ctx.get_step_context(step_key),
                f"Step {step_key} is still queued on SQS queue {sqs_queue!r} after {waited:.0f} s: "
                f"no live worker has taken it. Start one with `dagster-taskiq-sync worker start "
                f"-q {queue}`.",
                EngineEventData(metadata={"queue": queue, "waited_seconds": f"{waited:.0f}"}),
            )
        return CheckStepHealthResult.healthy()

    def terminate_step(self, step_handler_context: StepHandlerContext) -> Iterator[DagsterEvent]:
        step_key, attempt, task_id, _ = self._identity(step_handler_context)
        LivenessStore(step_handler_context.instance).request_cancel(task_id, "the run was terminated")
        yield DagsterEvent.engine_event(
            step_handler_context.get_step_context(step_key),
            f"Asked the worker running step {step_key} (attempt {attempt}) to stop it.",
            EngineEventData(metadata={"task_id": task_id}),
        )
