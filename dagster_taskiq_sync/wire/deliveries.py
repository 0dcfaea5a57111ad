"""What the broker hands its callers and takes from them, and how SQS's answers become it: a
received message (``Delivery``), one to send (``Outgoing``) and how its sending went
(``SendResult``), what a queue is (``QueueFacts``, from its attributes and redrive policy), and a
dead-letter copy's attributes. Plain data and pure functions: ``broker.StepBroker`` makes the calls.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from dagster_taskiq_sync.errors import TaskiqSyncError
from dagster_taskiq_sync.wire.messages import S3_POINTER_ATTRIBUTE, SIGNATURE_ATTRIBUTE

SQS_MIN_DEFAULT_SIZE = 262_144  # what a queue accepts when it does not say (the old SQS default)
DEAD_LETTER_REASON_ATTRIBUTE = "dts-dead-letter-reason"


@dataclasses.dataclass(frozen=True)
class Delivery:
    """One received SQS message, held by a worker until it is deleted, released or dead-lettered."""

    queue: str  # Celery queue name, as the user wrote it
    queue_url: str
    receipt_handle: str
    message_id: str
    receive_count: int
    body: bytes  # the SQS body: a TaskIQ message, or a pointer to one in S3
    attributes: Mapping[str, str]  # string message attributes (signature, S3 pointer flag)
    received_at: float = 0.0  # wall clock: when this worker received it
    sent_at: float | None = None  # wall clock: when the sender sent it (SQS SentTimestamp)

    @property
    def offloaded(self) -> bool:
        return S3_POINTER_ATTRIBUTE in self.attributes


@dataclasses.dataclass(frozen=True)
class Outgoing:
    """One message to send: its Celery queue, task id (FIFO group and dedup id) and TaskIQ body;
    on a standard queue, ``group`` is its fair-queue MessageGroupId (``lanes.message_group``)."""

    queue: str
    task_id: str
    body: bytes
    group: str | None = None


@dataclasses.dataclass(frozen=True)
class SendResult:
    task_id: str
    offloaded_to: str | None = None  # the S3 URL of a payload too large for the queue
    error: TaskiqSyncError | None = None


@dataclasses.dataclass(frozen=True)
class QueueFacts:
    """What a worker or sender learns about a queue once, at start."""

    url: str
    max_message_size: int = SQS_MIN_DEFAULT_SIZE
    dead_letter_url: str | None = None
    dead_letter_name: str | None = None
    max_receive_count: int | None = None


SQS_MAX_ATTRIBUTES = 10
_KEPT_FIRST = (SIGNATURE_ATTRIBUTE, S3_POINTER_ATTRIBUTE)  # what a redriven message needs to run again


def dead_letter_attributes(
    original: Mapping[str, str], reason: str, body_bytes: int, limit: int = SQS_MIN_DEFAULT_SIZE
) -> dict[str, dict[str, str]]:
    """The attributes of a message's dead-letter copy, within what SQS accepts: at most 10, none
    empty, none reserved (``AWS.``/``Amazon.``), body and attributes within ``limit`` bytes (the
    queue's MaximumMessageSize, at least 256 KiB). The reason
    comes first; the signature and S3 pointer next (a redriven message needs them); then the rest,
    as room allows."""
    reason_value = reason[:1000] or "no reason given"
    chosen = {DEAD_LETTER_REASON_ATTRIBUTE: reason_value}
    room = max(limit, SQS_MIN_DEFAULT_SIZE) - body_bytes - len(DEAD_LETTER_REASON_ATTRIBUTE) - len(reason_value) - 6
    names = [n for n in _KEPT_FIRST if n in original] + sorted(n for n in original if n not in _KEPT_FIRST)
    for name in names:
        value = original[name]
        size = len(name.encode()) + len(value.encode()) + 6  # + "String"
        if (
            len(chosen) >= SQS_MAX_ATTRIBUTES
            or not value
            or name == DEAD_LETTER_REASON_ATTRIBUTE
            or name.lower().startswith(("aws.", "amazon."))
            or size > room
        ):
            continue
        chosen[name] = value
        room -= size
    return {name: {"DataType": "String", "StringValue": value} for name, value in chosen.items()}


def delivery_from_sqs(queue: str, url: str, raw: Mapping[str, Any], now: float) -> Delivery:
    """A ReceiveMessage answer's message as the worker holds it."""
    attributes = {
        name: str(value.get("StringValue", ""))
        for name, value in raw.get("MessageAttributes", {}).items()
        if isinstance(value, Mapping)
    }
    sent = raw.get("Attributes", {}).get("SentTimestamp")
    return Delivery(
        queue=queue,
        queue_url=url,
        receipt_handle=raw["ReceiptHandle"],
        message_id=raw.get("MessageId", ""),
        receive_count=int(raw.get("Attributes", {}).get("ApproximateReceiveCount", "1")),
        body=raw.get("Body", "").encode("utf-8"),
        attributes=attributes,
        received_at=now,
        sent_at=int(sent) / 1000 if sent and str(sent).isdigit() else None,
    )


def redrive_policy(text: str | None) -> tuple[str, str | None, int | None] | None:
    """(dead-letter queue name, its account, maxReceiveCount) from a RedrivePolicy attribute."""
    if not text:
        return None
    try:
        policy = json.loads(text)
        arn = str(policy["deadLetterTargetArn"]).split(":")
        receives = policy.get("maxReceiveCount")
        return arn[5], arn[4] or None, int(receives) if receives is not None else None
    except (ValueError, KeyError, IndexError, TypeError):
        return None
