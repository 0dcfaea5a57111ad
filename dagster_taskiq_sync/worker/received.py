"""A received message until it may run: the first half of a ``request.Request``'s life.

``Received`` holds what a request knows of its message and does the checks before anything runs:

1. **open**: check the signature (before anything is parsed), fetch an offloaded payload (only
   from the configured bucket and prefix, under a size cap, checked against its SHA-256), decode
   the wire contract (``messages.decode``). Anything wrong: the message can never run.
2. **admit**: read the message's run and its attempt's liveness record from the worker's own
   instance, riding out database outages while the message stays held (infrastructure errors
   never count a genuine step toward the dead-letter policy), then apply the drop rules
   (``DROP_RULES``: small named predicates over plain data), then claim it against a second
   delivery of the same message.

``request.Request`` (a ``Received``) runs what is admitted and settles every message.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from dagster_taskiq_sync.storage.liveness import StepRecord
from dagster_taskiq_sync.storage.run_report import StepOutcomes, step_outcomes
from dagster_taskiq_sync.wire.deliveries import Delivery
from dagster_taskiq_sync.wire.messages import (
    MalformedMessage,
    Message,
    SignatureError,
    StepMessage,
    decode,
    max_values,
    queue_label,
)
from dagster_taskiq_sync.wire.payloads import S3Pointer, check_payload, decode_pointer
from dagster_taskiq_sync.wire.time_limits import Limit, StepLimits
from dagster_taskiq_sync.worker.admission import DROP_RULES, Drop, Outcome, Verdict, ran_to_its_end
from dagster_taskiq_sync.worker.context import WorkerContext
from dagster_taskiq_sync.worker.step_runner import ChildHandle
from dagster_taskiq_sync.worker.transient import is_transient

log = logging.getLogger("dagster_taskiq_sync.worker")

RETRY_BACKOFF_MAX = 30.0


class Stopping(Exception):
    """The worker is stopping while this message waited on infrastructure: release it."""


class Received:
    """One received message's state, and the checks that admit it (see the module docstring)."""

    def __init__(self, delivery: Delivery, worker: WorkerContext) -> None:
        self.delivery = delivery
        self.worker = worker
        self.message: Message | None = None
        self.pointer: S3Pointer | None = None
        self.run: Any = None
        self.child: ChildHandle | None = None
        self.record: StepRecord | None = None
        self.kill_reason: str | None = None
        self.limits = (
            StepLimits()
        )  # a step's time limits: its message's, else the worker's config; a run's: its message's
        self._soft_sent = False
        self.limit_hit: Limit | None = None  # the time limit that stopped it (runs: what their failure names)
        self._interrupted_at: float | None = None
        self._started = 0.0
        self._started_wall = 0.0  # time.time() at start: what `worker list` and the dashboard show
        self._unreadable = "malformed"  # or "signature": why it could not be opened, for metrics

    @property
    def task_id(self) -> str:
        return self.message.task_id if self.message else self.delivery.message_id

    @property
    def label(self) -> str:
        return self.message.label if self.message else f"message {self.delivery.message_id}"

    @property
    def child_pid(self) -> int | None:
        return self.child.pid if self.child is not None else None

    @property
    def step_key(self) -> str:
        if isinstance(self.message, StepMessage):
            return self.message.step_key
        return f"run {self.message.run_id}" if self.message else "?"

    def registry_entry(self) -> dict[str, Any]:
        """This running step as the worker registry records it (step_key None: a whole run)."""
        message = self.message
        return {
            "run_id": message.run_id if message else None,
            "step_key": message.step_key if isinstance(message, StepMessage) else None,
            "attempt": message.attempt if isinstance(message, StepMessage) else None,
            "queue": self.delivery.queue,
            "since": self._started_wall,
        }

    # --- opening and admitting it -----------------------------------------------------------

    def admit(self) -> Verdict | None:
        """None when the message should run now, else how to settle it."""
        try:
            self.message = self._open()
        except MalformedMessage as exc:
            self._unreadable = "signature" if isinstance(exc, SignatureError) else "malformed"
            return self._unopened(exc)
        if self.worker.stopping.is_set():
            return Verdict(Outcome.RELEASE, "the worker is stopping")
        verdict = self._apply_rules()
        if verdict is not None:
            return verdict
        if self.worker.stopping.is_set():
            return Verdict(Outcome.RELEASE, "the worker is stopping")
        return self._claim()

    def _apply_rules(self) -> Verdict | None:
        """Read the message's run and attempt record, then the first drop rule that applies."""
        assert self.message is not None
        self.run, previous = self._retrying(f"reading run {self.message.run_id} from the instance", self._read_state)
        for rule in DROP_RULES:
            verdict = rule(self.message, self.run, previous, self.worker.settings.worker_lost_timeout)
            if verdict is not None:
                if (verdict.lost and previous is not None) or verdict.unrecorded:
                    ended = self._retrying(f"reading the outcome of {self.message.label}", self._attempts_ended)
                    verdict = ran_to_its_end(self.message, previous, ended) or verdict
                return verdict
        return None

    def _unopened(self, exc: MalformedMessage) -> Verdict:
        """A message that cannot be opened can never run. When its S3 pointer was read and names
        its step (the payload is gone, altered, or not a message), that step is failed promptly:
        the dead-letter record is written for it, but only where a whole message for that attempt
        would be admitted (the drop rules, then the claim), so an unsigned pointer can do no more
        to a run than an unsigned message can."""
        dead = Verdict(Outcome.DEAD_LETTER, exc.reason)
        named = self.pointer.names if self.pointer is not None else None
        if named is None:
            return dead
        self.message = named
        verdict = self._apply_rules() or self._claim()
        if verdict is None:
            return dead
        if verdict.outcome is Outcome.DEAD_LETTER:  # say both: what is wrong with it, and with its step
            return replace(verdict, why=f"{exc.reason}; and {verdict.why}")
        return verdict

    def _claim(self) -> Verdict | None:
        """Only one of two deliveries of one message received at once may start it (see
        ``LivenessStore.claim``): the other is dropped like any duplicate."""
        settings = self.worker.settings
        stale_after = max(settings.worker_lost_timeout, 3 * settings.heartbeat_interval)
        holder = self._retrying(
            f"claiming {self.label}", lambda: self.worker.store.claim(self.task_id, self.worker.name, stale_after)
        )
        if holder is None:
            return None
        return Verdict(
            Outcome.DONE,
            f"{self.label} already started on worker {holder} from another delivery of the same message "
            "(SQS delivered it twice at once)",
            Drop.DUPLICATE,
        )

    def _open(self) -> Message:
        delivery, worker = self.delivery, self.worker
        keyring = worker.settings.keyring
        signed = keyring.verifies
        if signed:
            keyring.verify(delivery.body, delivery.attributes)
            label = queue_label(delivery.body) if not delivery.offloaded else None
            if label is not None and label != worker.settings.sqs.queue_name(delivery.queue):
                raise MalformedMessage(f"the message was signed for queue {label!r}, not this one")
        body = delivery.body
        if delivery.offloaded:
            sqs = worker.settings.sqs
            self.pointer = decode_pointer(body, sqs.s3_bucket, sqs.s3_prefix, sqs.max_payload_bytes)
            pointer = self.pointer
            body = self._retrying(
                f"reading {pointer.url}", lambda: worker.client.fetch_payload(pointer, sqs.max_payload_bytes)
            )
            check_payload(pointer, body, signed)
            worker.metrics.s3_offload_read(len(body))
        message = decode(body, max_values(worker.settings.sqs.max_payload_bytes))
        if (
            self.pointer is not None
            and self.pointer.names is not None
            and self.pointer.names.task_id != message.task_id
        ):
            raise MalformedMessage(f"the payload at {self.pointer.url} is not the message its pointer names")
        if signed and delivery.offloaded and queue_label(body) != worker.settings.sqs.queue_name(delivery.queue):
            raise MalformedMessage("the offloaded message was signed for another queue")
        return message

    def _read_state(self) -> tuple[Any, StepRecord | None]:
        assert self.message is not None
        run = self.worker.instance.get_run_by_id(self.message.run_id)
        previous = self.worker.store.read([self.message.task_id]).get(self.message.task_id) if run else None
        return run, previous

    def _attempts_ended(self) -> int:
        """How many attempts of the message's step have an outcome in the run's event log."""
        message = self.message
        if not isinstance(message, StepMessage):
            return 0
        return step_outcomes(self.worker.instance, message.run_id).get(message.step_key, StepOutcomes()).count

    def _retrying(self, what: str, fn: Callable[[], Any]) -> Any:
        """Call ``fn``; ride out infrastructure errors with capped backoff while the message stays
        held (its visibility keeps being extended), until the worker stops."""
        delay = 0.5
        while True:
            try:
                return fn()
            except MalformedMessage:
                raise
            except Exception as exc:
                if not is_transient(exc):
                    raise
                if self.worker.stopping.is_set():
                    raise Stopping() from None
                log.warning(
                    "worker %s: %s for %s failed (%s: %s); retrying in %.1f s while holding the message",
                    self.worker.name,
                    what,
                    self.label,
                    type(exc).__name__,
                    exc,
                    delay,
                )
                self.worker.stopping.wait(delay)
                delay = min(delay * 2, RETRY_BACKOFF_MAX)
