"""Who moves dead letters back: `queues redrive` and the operator page's redrive button.

Run by an operator, never by the executor or the workers, whose IAM policies (``iam.py``)
therefore need none of these calls.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiobotocore.session import get_session
from botocore import exceptions as boto_exc

from dagster_taskiq_sync.errors import BrokerError, ConfigError, QueueMissingError
from dagster_taskiq_sync.ops.admin import error_code
from dagster_taskiq_sync.ops.queue_depths import dead_letter_arn, url_for_arn
from dagster_taskiq_sync.wire.aws import client_kwargs
from dagster_taskiq_sync.wire.settings import SQSSettings


@dataclass(frozen=True)
class RedriveResult:
    queue: str
    dead_letter_queue: str
    moved: int
    failed: int
    left: int  # messages still in the dead-letter queue (approximate)


def _sendable_attributes(attributes: Mapping[str, Any]) -> dict[str, Any]:
    """Message attributes as SendMessage takes them (receive adds empty list fields)."""
    out = {}
    for name, value in attributes.items():
        kept = {k: value[k] for k in ("DataType", "StringValue", "BinaryValue") if k in value}
        if "DataType" in kept:
            out[name] = kept
    return out


async def redrive(
    settings: SQSSettings, queue: str, max_messages: int | None = None, *, visibility: int = 60
) -> RedriveResult:
    """Move messages from ``queue``'s dead-letter queue back to ``queue``.

    SQS's StartMessageMoveTask would do this server-side, but the local endpoint (moto) does not
    implement it, so this receives from the dead-letter queue, sends each message to the source
    queue with its body and message attributes (FIFO: its group id, and a deduplication id derived
    from the dead-letter message's id), and deletes it from the dead-letter queue only once the
    send succeeded: a crash in between leaves a duplicate, which workers drop as already run,
    never a loss. Without ``max_messages`` it moves what the dead-letter queue held when it started.
    """
    sqs_name = settings.queue_name(queue)
    session = get_session()
    async with session.create_client("sqs", **client_kwargs(settings, session)) as sqs:
        try:
            url = settings.predefined_queues.get(queue) or (await sqs.get_queue_url(QueueName=sqs_name))["QueueUrl"]
            attrs = (await sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["RedrivePolicy"])).get(
                "Attributes", {}
            )
        except boto_exc.ClientError as exc:
            if "NonExistentQueue" in error_code(exc) or error_code(exc) == "QueueDoesNotExist":
                raise QueueMissingError(
                    f"SQS queue {sqs_name!r} does not exist at {settings.describe_endpoint()}; check the queue name "
                    "(`dagster-taskiq-sync queues stats` lists the config's queues) and the run config's queue_name_prefix."
                ) from None
            raise
        target_arn = dead_letter_arn(attrs)
        if target_arn is None:
            raise ConfigError(
                f"SQS queue {sqs_name!r} has no dead-letter queue (no RedrivePolicy), so there is nothing to redrive; "
                f"give it one with `dagster-taskiq-sync queues create -y RUN_CONFIG.yaml -q {queue}` (without --no-dead-letter)."
            )
        dlq_name = target_arn.rsplit(":", 1)[-1]
        try:
            dlq_url = await url_for_arn(sqs, target_arn)
        except boto_exc.ClientError:
            raise QueueMissingError(
                f"the dead-letter queue {dlq_name!r} of SQS queue {sqs_name!r} does not exist; "
                f"recreate it with `dagster-taskiq-sync queues create -y RUN_CONFIG.yaml -q {queue}`."
            ) from None
        depth = await _depth(sqs, dlq_url)
        limit = depth if max_messages is None else max_messages
        fifo = sqs_name.endswith(".fifo")
        moved = failed = 0
        while moved + failed < limit:
            received = (
                await sqs.receive_message(
                    QueueUrl=dlq_url,
                    MaxNumberOfMessages=max(1, min(10, limit - moved - failed)),
                    WaitTimeSeconds=1,
                    VisibilityTimeout=visibility,
                    MessageAttributeNames=["All"],
                    MessageSystemAttributeNames=["MessageGroupId"],
                )
            ).get("Messages", [])
            if not received:
                break
            entries = []
            for i, message in enumerate(received):
                entry: dict[str, Any] = {"Id": str(i), "MessageBody": message["Body"]}
                attributes = _sendable_attributes(message.get("MessageAttributes", {}))
                if attributes:
                    entry["MessageAttributes"] = attributes
                if fifo:
                    entry["MessageGroupId"] = message.get("Attributes", {}).get("MessageGroupId", "redrive")
                    # The original id would be deduplicated (and dropped) within SQS's 5-minute window.
                    entry["MessageDeduplicationId"] = f"redrive-{message['MessageId']}"[:128]
                entries.append(entry)
            answer = await sqs.send_message_batch(QueueUrl=url, Entries=entries)
            sent = [received[int(ok["Id"])] for ok in answer.get("Successful", [])]
            failed += len(answer.get("Failed", []))
            if sent:
                await sqs.delete_message_batch(
                    QueueUrl=dlq_url,
                    Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(sent)],
                )
            moved += len(sent)
        left = await _depth(sqs, dlq_url)
    if failed:
        raise BrokerError(
            f"moved {moved} message(s) from {dlq_name!r} back to {sqs_name!r}, but SQS refused {failed}; they stay "
            f"in {dlq_name!r} (visible again after {visibility} s): run `dagster-taskiq-sync queues redrive {queue}` again."
        )
    return RedriveResult(queue=sqs_name, dead_letter_queue=dlq_name, moved=moved, failed=failed, left=left)


async def _depth(sqs: Any, url: str) -> int:
    attrs = (await sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"]))["Attributes"]
    return int(attrs.get("ApproximateNumberOfMessages", 0))
