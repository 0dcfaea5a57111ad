"""A worker's OpenTelemetry spans (``wire/tracing``): what a request and a step child record.

A step's trace, when its sender traced it (a message without trace context gets no spans here,
as parent-based sampling would have it)::

    send <step>                  orchestrator: launched -> on its queue
    ├── queue wait <step>        worker: SQS SentTimestamp -> received
    ├── admit <step>             worker: signature, decode, the run and liveness reads, drop rules
    ├── run <step>               step child: Dagster's execute_step (user code's spans nest here)
    └── settle <step>            worker: delete, release or dead-letter the message

The worker's spans are recorded after the fact with their real times, so nothing here wraps or
can break the request's own code. A step child flushes its spans before it answers its worker,
waiting at most ``FLUSH_SECONDS`` (less after a flush that timed out: a collector outage must
not add seconds to every step).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from dagster_taskiq_sync.wire.messages import StepMessage
from dagster_taskiq_sync.wire.tracing import (
    ATTEMPT,
    FLUSH_SECONDS,
    JOB_NAME,
    MESSAGE_ID,
    OUTCOME,
    QUEUE,
    REASON,
    RECEIVE_COUNT,
    RETRY,
    RUN_ID,
    STEP_KEY,
    WORKER,
    TraceContext,
    Tracing,
    active,
)
from dagster_taskiq_sync.worker.admission import Outcome, Verdict

if TYPE_CHECKING:
    from dagster_taskiq_sync.worker.child_pipe import Pickup

log = logging.getLogger("dagster_taskiq_sync.tracing")
STEP_OUTCOME = "dagster.step_outcome"  # run span: success, failure, up_for_retry
SHORT_FLUSH_SECONDS = 0.1  # after a flush timed out, until one succeeds again


def step_attributes(pickup: Pickup) -> dict[str, Any]:
    """A step's (or a run's) attributes as a worker or child knows them."""
    attributes: dict[str, Any] = {RUN_ID: pickup.run_id, QUEUE: pickup.queue, WORKER: pickup.worker}
    if pickup.step_key is not None:
        attributes[STEP_KEY] = pickup.step_key
    if pickup.attempt is not None:
        attributes |= {ATTEMPT: pickup.attempt, RETRY: pickup.attempt > 1}
    attributes[RECEIVE_COUNT] = pickup.receive_count
    attributes[MESSAGE_ID] = pickup.message_id
    return attributes


class RequestSpans:
    """One request's worker-side spans (queue wait, admit, settle); see the module docstring."""

    def __init__(self, tracing: Tracing) -> None:
        self.tracing = tracing
        self.began_ns = time.time_ns()
        self.admitted_ns = 0

    @classmethod
    def begin(cls) -> RequestSpans | None:
        tracing = active()
        return None if tracing is None else cls(tracing)

    def _parent_and_attributes(self, request: Any) -> tuple[TraceContext | None, dict[str, Any], str]:
        message = request.message
        if message is None or message.trace is None:
            return None, {}, ""
        delivery = request.delivery
        attributes: dict[str, Any] = {
            RUN_ID: message.run_id,
            QUEUE: delivery.queue,
            WORKER: request.worker.name,
            RECEIVE_COUNT: delivery.receive_count,
            MESSAGE_ID: delivery.message_id,
        }
        if isinstance(message, StepMessage):
            attributes |= {STEP_KEY: message.step_key, ATTEMPT: message.attempt, RETRY: message.attempt > 1}
        if request.run is not None:
            attributes[JOB_NAME] = request.run.job_name
        what = message.step_key if isinstance(message, StepMessage) else f"run {message.run_id}"
        return message.trace, attributes, what

    def admitted(self, request: Any, verdict: Verdict | None) -> None:
        """Record queue wait and admission once admission decided (``verdict`` None: it runs)."""
        self.admitted_ns = time.time_ns()
        try:
            self._admitted(request, verdict)
        except Exception as exc:  # noqa: BLE001 - a tracing problem must never change what happens to a step
            log.debug("could not record the admission of %s: %s: %s", request.label, type(exc).__name__, exc)

    def _admitted(self, request: Any, verdict: Verdict | None) -> None:
        parent, attributes, what = self._parent_and_attributes(request)
        if parent is None:
            return
        delivery = request.delivery
        received_ns = int(delivery.received_at * 1e9)
        if delivery.sent_at:
            self.tracing.span_between(
                f"queue wait {what}", parent, attributes, int(delivery.sent_at * 1e9), received_ns
            )
        span = self.tracing.start(f"admit {what}", parent, attributes, self.began_ns)
        if verdict is not None:
            span.set_attribute(OUTCOME, verdict.outcome.value)
            if verdict.why:
                span.set_attribute(REASON, verdict.why[:500])
        span.end(self.admitted_ns)

    def settle(self, request: Any, verdict: Verdict) -> Verdict:
        """``request.settle(verdict)``, recorded as the settle span."""
        start = time.time_ns()
        verdict = request.settle(verdict)
        try:
            self._settled(request, verdict, start)
        except Exception as exc:  # noqa: BLE001 - the message is settled; only its span is lost
            log.debug("could not record the settling of %s: %s: %s", request.label, type(exc).__name__, exc)
        return verdict

    def _settled(self, request: Any, verdict: Verdict, start: int) -> None:
        parent, attributes, what = self._parent_and_attributes(request)
        if parent is None:
            return
        span = self.tracing.start(f"settle {what}", parent, attributes, start)
        span.set_attribute(OUTCOME, verdict.outcome.value)
        if verdict.why:
            span.set_attribute(REASON, verdict.why[:500])
        if verdict.outcome is Outcome.DEAD_LETTER:
            span.add_event("dead_lettered", {REASON: verdict.why[:500]})
            self.tracing.fail(span, f"dead-lettered: {verdict.why[:200]}")
        span.end()


class ChildSpans:
    """A step or run child's spans: one ``run`` span per message, flushed before answering."""

    def __init__(self, tracing: Tracing) -> None:
        self.tracing = tracing
        self._flush_for = FLUSH_SECONDS

    def start(self, trace: TraceContext | None, pickup: Pickup) -> Any:
        """The run span of a step (or a whole run), or None when its message was not traced."""
        if trace is None:
            return None
        what = pickup.step_key if pickup.step_key is not None else pickup.run_id
        span = self.tracing.start(f"run {what}", trace, step_attributes(pickup), kind="CONSUMER")
        if pickup.attempt is not None and pickup.attempt > 1:
            span.add_event("retry", {ATTEMPT: pickup.attempt})
        return span

    def note(self, span: Any, event: Any) -> None:
        """Say on the run span how the step ended, from its Dagster events."""
        if getattr(event, "is_step_success", False):
            span.set_attribute(STEP_OUTCOME, "success")
        elif getattr(event, "is_step_up_for_retry", False):
            span.set_attribute(STEP_OUTCOME, "up_for_retry")
            span.add_event("up_for_retry")
            self.tracing.fail(span, "the step failed and is up for retry")
        elif getattr(event, "is_step_failure", False):
            span.set_attribute(STEP_OUTCOME, "failure")
            self.tracing.fail(span, "the step failed")

    def end(self, span: Any, error: str | None = None) -> None:
        """End the run span and export it (bounded), before the child answers its worker."""
        if error is not None:
            self.tracing.fail(span, error)
        span.end()
        if self.tracing.flush(self._flush_for):
            self._flush_for = FLUSH_SECONDS
        else:
            self._flush_for = SHORT_FLUSH_SECONDS
