"""Who reads the dead-letter queues without taking anything out of them: the dashboard's peek.

A peek is a ReceiveMessage with ``VisibilityTimeout=0`` and nothing else: no DeleteMessage, no
ChangeMessageVisibility, ever. Each message peeked is visible again the moment it is returned, so
a peek neither removes a message nor hides it from ``queues redrive`` or another reader. Two
things a receive does change, and how they are kept harmless:

* the message's receive count goes up by one. A dead-letter queue with a redrive policy of its
  own would move a message on after ``maxReceiveCount`` receives, so such a queue is not peeked
  (the dashboard says why); the dead-letter queues ``queues create`` makes have none.
* on a FIFO queue a receive locks the message group until the visibility timeout ends, which at
  0 is at once.

What a dead letter says (its reason attribute, its body) was written by whoever could send to the
queue: it is returned as text for the page to escape, never interpreted.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiobotocore.session import get_session
from botocore import exceptions as boto_exc

from dagster_taskiq_sync.ops.queue_depths import QueueStats
from dagster_taskiq_sync.wire.aws import client_kwargs
from dagster_taskiq_sync.wire.deliveries import DEAD_LETTER_REASON_ATTRIBUTE
from dagster_taskiq_sync.wire.messages import S3_POINTER_ATTRIBUTE, MalformedMessage, StepMessage, decode
from dagster_taskiq_sync.wire.settings import SQSSettings

PEEK_PER_QUEUE = 10  # the newest page of dead letters an operator reads; the depth says how many in all
_RECEIVES_PER_QUEUE = 2  # SQS returns a sample per receive; a second one finds most of the rest
EXCERPT_CHARS = 200
NO_REASON = (
    "no reason attribute: SQS moved it after the source queue's maxReceiveCount receives "
    "(a worker crashed or could not settle it each time)"
)


@dataclass(frozen=True)
class DeadLetter:
    """One message in a dead-letter queue, as the page shows it (all text untrusted)."""

    queue: str  # the source queue (Celery name)
    dead_letter_queue: str
    message_id: str
    sent_at: float | None  # when it was sent to the dead-letter queue (wall clock)
    receive_count: int  # receives in the dead-letter queue, peeks included
    reason: str
    what: str  # "step X (attempt N)", "run", or why the body cannot be read
    run_id: str | None
    excerpt: str  # the start of the body, when it could not be read as a message

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def describe(raw: dict[str, Any], queue: str, dead_letter_queue: str) -> DeadLetter:
    """A received dead-letter message as a :class:`DeadLetter` (its body is parsed, never run)."""
    attributes = raw.get("MessageAttributes") or {}
    reason_value = attributes.get(DEAD_LETTER_REASON_ATTRIBUTE, {})
    reason = str(reason_value.get("StringValue", "")) if isinstance(reason_value, dict) else ""
    system = raw.get("Attributes") or {}
    sent = str(system.get("SentTimestamp", ""))
    count = str(system.get("ApproximateReceiveCount", ""))
    body = str(raw.get("Body", ""))
    run_id = None
    excerpt = ""
    if S3_POINTER_ATTRIBUTE in attributes:
        what = "a message offloaded to S3 (its body is a pointer)"
    else:
        try:
            message = decode(body.encode("utf-8", "replace"))
        except MalformedMessage as exc:
            what, excerpt = f"unreadable: {exc.reason}", body[:EXCERPT_CHARS]
        else:
            run_id = message.run_id
            if isinstance(message, StepMessage):
                what = f"step {message.step_key} (attempt {message.attempt})"
            else:
                what = f"{message.kind.value} of the whole run"
    return DeadLetter(
        queue=queue,
        dead_letter_queue=dead_letter_queue,
        message_id=str(raw.get("MessageId", "?")),
        sent_at=int(sent) / 1000 if sent.isdigit() else None,
        receive_count=int(count) if count.isdigit() else 0,
        reason=reason or NO_REASON,
        what=what,
        run_id=run_id,
        excerpt=excerpt,
    )


@dataclass
class PeekResult:
    letters: list[DeadLetter]
    notes: list[str]


async def peek(settings: SQSSettings, stats: Sequence[QueueStats], per_queue: int = PEEK_PER_QUEUE) -> PeekResult:
    """Up to ``per_queue`` messages of each non-empty dead-letter queue in ``stats``, left in place."""
    result = PeekResult([], [])
    session = get_session()
    async with session.create_client("sqs", **client_kwargs(settings, session)) as sqs:
        for item in stats:
            if not item.dead_letter_queue or not item.dead_letter_depth or item.dead_letter_error:
                continue
            try:
                await _peek_one(sqs, item, per_queue, result)
            except boto_exc.ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "")
                result.notes.append(f"the dead-letter queue {item.dead_letter_queue!r} could not be read ({code}).")
    result.letters.sort(key=lambda d: d.sent_at or 0, reverse=True)
    return result


async def _peek_one(sqs: Any, item: QueueStats, per_queue: int, result: PeekResult) -> None:
    assert item.dead_letter_queue is not None
    url = (await sqs.get_queue_url(QueueName=item.dead_letter_queue))["QueueUrl"]
    own = (await sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["RedrivePolicy"])).get("Attributes", {})
    if own.get("RedrivePolicy"):
        policy = own["RedrivePolicy"]
        try:
            count = json.loads(policy).get("maxReceiveCount", "?")
        except (ValueError, AttributeError):
            count = "?"
        result.notes.append(
            f"the dead-letter queue {item.dead_letter_queue!r} has a redrive policy of its own (maxReceiveCount "
            f"{count}), so it is not peeked: each peek is a receive and would count toward moving its messages on."
        )
        return
    seen: dict[str, DeadLetter] = {}
    for _ in range(_RECEIVES_PER_QUEUE):
        received = (
            await sqs.receive_message(
                QueueUrl=url,
                MaxNumberOfMessages=min(10, per_queue),
                WaitTimeSeconds=0,
                VisibilityTimeout=0,  # visible again at once: a peek takes nothing away
                MessageAttributeNames=["All"],
                AttributeNames=["SentTimestamp", "ApproximateReceiveCount"],
            )
        ).get("Messages", [])
        for raw in received:
            seen.setdefault(str(raw.get("MessageId")), describe(raw, item.queue, item.dead_letter_queue))
        if len(seen) >= min(per_queue, item.dead_letter_depth or 0) or not received:
            break
    result.letters.extend(list(seen.values())[:per_queue])
