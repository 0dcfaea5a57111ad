"""Who sends steps: a background sender, so the orchestrator's loop never waits on SQS.

``TaskiqStepHandler.launch_step`` only queues a :class:`PendingSend`. The sender takes what is
pending at once (steps that became ready together, a fan-out), highest priority first, and
sends it in batches of ten (``SendMessageBatch``), several batches concurrently, through the
process's one event-loop thread. Dagster launches the steps of one loop iteration one by one
(each writes an event first), so the executor says how many are coming (:meth:`StepSender.expect`)
and the sender waits for them, or for a full batch of ten, before sending: one call for the
iteration's steps instead of one per step. Their ``queued`` liveness records are written in one batch
before the sends: a worker runs only an attempt a sender recorded (``admission.never_sent``), so a
queue writer cannot start an attempt the orchestrator never sent. A send that still fails after ``broker_outage_timeout`` is raised by
:meth:`StepSender.raise_errors`, which the executor calls on every loop iteration: the run fails
as it would have had the send been inline.

At DEBUG, the ``dagster_taskiq_sync.sender`` logger records each step once it is on its queue, with
``run_id``, ``step_key``, ``queue`` and ``sent_at`` (wall time) on the record (``bin/bench`` reads
them to measure the orchestrator's share of a step's latency); off, that costs one level check.

With OpenTelemetry tracing on (``wire/tracing``), each step's ``send`` span starts when Dagster
launches it (its context goes into the message) and ends when the step is on its queue, or with
an error status when it could not be sent.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from dagster_taskiq_sync.errors import TaskiqSyncError
from dagster_taskiq_sync.storage.liveness import QUEUED, LivenessStore, StepRecord
from dagster_taskiq_sync.wire.broker import BATCH_ENTRIES
from dagster_taskiq_sync.wire.broker_client import BrokerClient
from dagster_taskiq_sync.wire.deliveries import Outgoing, SendResult
from dagster_taskiq_sync.wire.messages import StepMessage
from dagster_taskiq_sync.wire.tracing import ATTEMPT, JOB_NAME, QUEUE, RETRY, RUN_ID, SQS_QUEUE, STEP_KEY, Tracing

log = logging.getLogger("dagster_taskiq_sync.sender")
SEND_CONCURRENCY = 4  # batches in flight at once when many steps become ready together
# Announced steps that have not arrived after this long are not waited for any more (a launch
# that raised): what is pending goes out.
EXPECT_TIMEOUT = 0.25


@dataclass(frozen=True)
class PendingSend:
    run_id: str
    step_key: str
    attempt: int
    task_id: str
    queue: str  # Celery queue name
    priority: int
    body: bytes
    span: Any = None  # the step's OpenTelemetry send span, when tracing is on
    group: str | None = None  # its MessageGroupId on a standard queue (lanes.message_group)


def send_span(
    tracing: Tracing, message: StepMessage, queue: str, sqs_queue: str, job_name: str
) -> tuple[StepMessage, Any]:
    """Start the step's send span; the message, carrying its context, and the span."""
    span = tracing.start(
        f"send {message.step_key}",
        attributes={
            RUN_ID: message.run_id,
            JOB_NAME: job_name,
            STEP_KEY: message.step_key,
            ATTEMPT: message.attempt,
            RETRY: message.attempt > 1,
            QUEUE: queue,
            SQS_QUEUE: sqs_queue,
            "messaging.system": "aws_sqs",
        },
        kind="PRODUCER",
    )
    if message.attempt > 1:
        span.add_event("retry", {ATTEMPT: message.attempt})
    return replace(message, trace=tracing.context_of(span)), span


class StepSender:
    """Sends launched steps from a background thread (see the module docstring)."""

    def __init__(self, client: BrokerClient, instance: Any, retry_for: float) -> None:
        self._client = client
        self._store = LivenessStore(instance)
        self._retry_for = retry_for
        self._cond = threading.Condition()
        self._pending: list[PendingSend] = []
        self._expected = 0  # steps announced by expect() and not put yet
        self._last_put = 0.0
        self._busy = False
        self._closing = False
        self._errors: list[TaskiqSyncError] = []
        self._offloaded: list[tuple[PendingSend, str]] = []
        self.sent_task_ids: list[str] = []  # every step attempt recorded as sent (its records are forgotten at the end)
        self._pool = concurrent.futures.ThreadPoolExecutor(SEND_CONCURRENCY, thread_name_prefix="taskiq-send")
        self._thread = threading.Thread(target=self._run, name="taskiq-step-sender", daemon=True)
        self._thread.start()

    def expect(self, count: int) -> None:
        """``count`` steps are about to be put (one loop iteration's launches): send them together."""
        with self._cond:
            self._expected += count
            self._last_put = time.monotonic()

    def withdraw(self) -> None:
        """An announced step will not be put (no pool takes it): send the others without waiting for it."""
        with self._cond:
            self._expected = max(0, self._expected - 1)
            self._cond.notify_all()

    def put(self, item: PendingSend) -> None:
        with self._cond:
            self._pending.append(item)
            self._expected = max(0, self._expected - 1)
            self._last_put = time.monotonic()
            self._cond.notify_all()

    def _ready(self) -> list[PendingSend]:
        """What to send now (under the lock): everything, or while more announced steps are on
        their way, only whole batches of ten."""
        if self._expected and time.monotonic() - self._last_put > EXPECT_TIMEOUT:
            self._expected = 0
        take = (
            len(self._pending)
            if not self._expected or self._closing
            else len(self._pending) // BATCH_ENTRIES * BATCH_ENTRIES
        )
        batch, self._pending = self._pending[:take], self._pending[take:]
        return batch

    def take_offloaded(self) -> list[tuple[PendingSend, str]]:
        """(step, S3 URL) of payloads that went to S3 since the last call."""
        with self._cond:
            offloaded, self._offloaded = self._offloaded, []
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
            self._expected = 0
            self._cond.notify_all()
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
                while True:
                    batch = self._ready() if self._pending else []
                    if batch or (self._closing and not self._pending):
                        break
                    self._cond.wait(EXPECT_TIMEOUT / 2 if self._pending else None)
                if not batch:
                    return
                self._busy = True
            try:
                self._send(batch)
            except Exception as exc:  # noqa: BLE001 - never let the sender thread die with steps pending
                self._fail(batch, TaskiqSyncError(f"{type(exc).__name__}: {exc}"))
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _send(self, batch: list[PendingSend]) -> None:
        try:  # before the sends: a worker that receives a step before its record would refuse it
            self._store.write_queued({item.task_id: StepRecord(QUEUED, queue=item.queue) for item in batch})
        except Exception as exc:  # noqa: BLE001 - the instance rode out what it could (db_retry); the steps fail
            self._fail(
                batch,
                TaskiqSyncError(
                    f"its queued record could not be written to the Dagster instance ({type(exc).__name__}: {exc}), "
                    "and workers run only steps whose sending is recorded there"
                ),
            )
            return
        with self._cond:
            self.sent_task_ids.extend(item.task_id for item in batch)
        for priority in sorted({item.priority for item in batch}, reverse=True):
            group = [item for item in batch if item.priority == priority]
            by_queue: dict[str, list[PendingSend]] = {}
            for item in group:
                by_queue.setdefault(item.queue, []).append(item)
            chunks = [
                items[i : i + BATCH_ENTRIES] for items in by_queue.values() for i in range(0, len(items), BATCH_ENTRIES)
            ]
            if len(chunks) == 1:  # a chain's step: sent from this thread, one thread hop fewer
                self._send_and_settle(chunks[0], functools.partial(self._send_chunk, chunks[0]))
                continue
            futures = {self._pool.submit(self._send_chunk, chunk): chunk for chunk in chunks}
            for future, chunk in futures.items():
                self._send_and_settle(chunk, future.result)

    def _send_and_settle(self, chunk: list[PendingSend], results: Callable[[], list[SendResult]]) -> None:
        try:
            sent = results()
        except TaskiqSyncError as exc:
            self._fail(chunk, exc)
            return
        self._settle(chunk, sent)

    def _send_chunk(self, chunk: list[PendingSend]) -> list[SendResult]:
        return self._client.send_many(
            [Outgoing(item.queue, item.task_id, item.body, item.group) for item in chunk], retry_for=self._retry_for
        )

    def _settle(self, chunk: list[PendingSend], results: list[SendResult]) -> None:
        now = time.time()
        for item, result in zip(chunk, results, strict=True):
            if result.error is not None:
                self._fail([item], result.error)
                continue
            if item.span is not None:
                item.span.end()
            if result.offloaded_to:
                with self._cond:
                    self._offloaded.append((item, result.offloaded_to))
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "step %s (attempt %d) of run %s is on queue %s",
                    item.step_key,
                    item.attempt,
                    item.run_id,
                    item.queue,
                    extra={"run_id": item.run_id, "step_key": item.step_key, "queue": item.queue, "sent_at": now},
                )

    def _fail(self, items: list[PendingSend], exc: TaskiqSyncError) -> None:
        errors = [
            type(exc)(f"step {item.step_key} (attempt {item.attempt}) of run {item.run_id} could not be sent: {exc}")
            for item in items
        ]
        for item, error in zip(items, errors, strict=True):
            if item.span is not None:
                item.span.record_exception(error)
                item.span.set_status(_error_status(str(error)))
                item.span.end()
        with self._cond:
            self._errors.extend(errors)


def _error_status(description: str) -> Any:
    from opentelemetry.trace import Status, StatusCode

    return Status(StatusCode.ERROR, description)
