"""Who talks to SQS and S3: the TaskIQ broker, on the process's event-loop thread.

:class:`StepBroker` is taskiq-aio-sqs's ``SQSBroker`` (clients, queue URLs, TaskIQ's message
format, taskiq-aio-sqs's S3-pointer convention) plus the explicit operations a thread-based
worker with bounded prefetch needs: batched send, receive, extend, delete, dead-letter, and a
bounded fetch of offloaded payloads. ``SQSBroker.listen()`` is not used: it keeps polling into a
100-message buffer whatever the worker's capacity, which would pile ready steps up in the first
worker that polls. Receiving never touches S3: an offloaded payload is fetched (and checked) by
the worker thread handling that one message, so a bad pointer only ever affects its own message.

Synchronous code never calls it directly: ``broker_client.BrokerClient`` runs each call on the
process's event-loop thread (``bridge.Bridge``) with a deadline and translates its errors.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from botocore import exceptions as boto_exc
from taskiq_aio_sqs import SQSBroker, SQSQueue

from dagster_taskiq_sync.errors import BrokerError, ConfigError, PayloadTooLargeError, TaskiqSyncError
from dagster_taskiq_sync.wire.aws import LazyClient, client_kwargs, share_service_models
from dagster_taskiq_sync.wire.deliveries import (
    SQS_MIN_DEFAULT_SIZE,
    Delivery,
    Outgoing,
    QueueFacts,
    SendResult,
    dead_letter_attributes,
    delivery_from_sqs,
    redrive_policy,
)
from dagster_taskiq_sync.wire.messages import S3_POINTER_ATTRIBUTE, Keyring, MalformedMessage
from dagster_taskiq_sync.wire.payloads import S3Pointer, pointer_for
from dagster_taskiq_sync.wire.settings import SQSSettings

log = logging.getLogger("dagster_taskiq_sync.broker")

SQS_LARGEST_MESSAGE = 1_048_576  # the most SQS lets a queue accept (since August 2025); `queues create` sets it
ATTRIBUTE_ALLOWANCE = 1024  # SQS counts message attributes against the size limit too
BATCH_ENTRIES = 10  # SendMessageBatch / DeleteMessageBatch / ChangeMessageVisibilityBatch maximum
QUEUE_CREATE_HINT = "create it with `dagster-taskiq-sync queues create -y RUN_CONFIG.yaml` (or name its URL in broker_transport_options.predefined_queues)"
CallObserver = Callable[[str, float, "str | None"], None]  # (SQS/S3 action, seconds, error class or None)


class StepBroker(SQSBroker):
    """taskiq-aio-sqs broker with worker-side primitives and explicit client settings."""

    def __init__(
        self, settings: SQSSettings, queues: Sequence[str], keyring: Keyring | None = None, dead_letters: bool = True
    ) -> None:
        self.settings = settings
        self.keyring = keyring or Keyring()
        # Only a worker moves messages to dead-letter queues; senders do not look them up (their
        # policy has no permission on them, and a refusal would be logged on every start).
        self.dead_letters = dead_letters
        # Only the queues this process uses must exist: a worker started with `-q other` or a
        # run whose steps are all routed elsewhere does not need the default queue.
        self.queue_names: dict[str, str] = {
            queue: settings.queue_name(queue) for queue in dict.fromkeys(queues or [settings.default_queue])
        }
        super().__init__(
            next(iter(self.queue_names.values())),
            endpoint_url=settings.endpoint_url,
            region_name=settings.region,  # type: ignore[arg-type]  # None means boto's own resolution
            aws_access_key_id=settings.access_key_id,
            aws_secret_access_key=settings.secret_access_key,
            use_task_id_for_deduplication=False,  # send_many sets a keyed or random id (Keyring.dedup_id)
            wait_time_seconds=settings.wait_time_seconds,
            visibility_timeout=settings.visibility_timeout,
            s3_extended_bucket_name=settings.s3_bucket,
        )
        share_service_models(self._session)
        self.with_queues(
            *(
                SQSQueue(
                    name=sqs_name,
                    is_fifo=sqs_name.endswith(".fifo"),
                    wait_time_seconds=settings.wait_time_seconds,
                    visibility_timeout=settings.visibility_timeout,
                )
                for sqs_name in self.queue_names.values()
            )
        )
        for celery_name, url in settings.predefined_queues.items():
            if celery_name in self.queue_names:
                self._queue_urls[self.queue_names[celery_name]] = url
        self.facts: dict[str, QueueFacts] = {}  # Celery queue name -> facts

    async def startup(self) -> None:
        await super().startup()
        for queue, sqs_name in self.queue_names.items():
            url = self._queue_urls[sqs_name]
            answer = await self._sqs_client.get_queue_attributes(
                QueueUrl=url, AttributeNames=["MaximumMessageSize", "RedrivePolicy"]
            )
            attributes = answer.get("Attributes", {})
            facts = QueueFacts(url, int(attributes.get("MaximumMessageSize", SQS_MIN_DEFAULT_SIZE)))
            policy = redrive_policy(attributes.get("RedrivePolicy"))
            if policy is not None and not self.dead_letters:
                facts = dataclasses.replace(facts, max_receive_count=policy[2])
            elif policy is not None:
                dlq_name, account, receives = policy
                try:
                    dlq = await self._sqs_client.get_queue_url(QueueName=dlq_name, QueueOwnerAWSAccountId=account)
                    facts = dataclasses.replace(
                        facts, dead_letter_url=dlq["QueueUrl"], dead_letter_name=dlq_name, max_receive_count=receives
                    )
                except boto_exc.ClientError as exc:
                    code = exc.response.get("Error", {}).get("Code", "")
                    if "NonExistentQueue" not in code and code != "QueueDoesNotExist":
                        # Not allowed to see it: never quietly delete what should be dead-lettered.
                        raise ConfigError(
                            f"queue {sqs_name!r} names dead-letter queue {dlq_name!r}, which cannot be looked up "
                            f"({code}); allow sqs:GetQueueUrl and sqs:SendMessage on it (dagster-taskiq-sync "
                            "iam-policy --role worker prints the policy)."
                        ) from None
                    # The DLQ is gone: a message that can never run is deleted instead.
                    log.warning(
                        "queue %s names dead-letter queue %s, which does not exist; messages that can never "
                        "run will be deleted",
                        sqs_name,
                        dlq_name,
                    )
                    facts = dataclasses.replace(facts, max_receive_count=receives)
            self.facts[queue] = facts

    async def _get_sqs_client(self):  # explicit settings instead of taskiq-aio-sqs's
        self._client_context_creator = self._session.create_client("sqs", **client_kwargs(self.settings, self._session))
        return await self._client_context_creator.__aenter__()

    async def _get_s3_client(self):  # opened when a payload first needs it (aws.LazyClient)
        self._s3_lazy = LazyClient(
            lambda: self._session.create_client("s3", **client_kwargs(self.settings, self._session))
        )
        return self._s3_lazy

    async def _close_client(self) -> None:
        # SQSBroker closes the S3 client only when a bucket is configured; either may not be open
        # (after a failed startup, or S3 never used).
        lazy = getattr(self, "_s3_lazy", None)
        self._s3_client_context_creator = lazy.opened if lazy is not None else None
        for name in ("_client_context_creator", "_s3_client_context_creator"):
            creator = getattr(self, name, None)
            if creator is not None:
                await creator.__aexit__(None, None, None)
                setattr(self, name, None)

    # --- sending ----------------------------------------------------------------------------

    async def send_many(self, items: Sequence[Outgoing]) -> list[SendResult]:
        """Send messages, ten per SendMessageBatch call per queue, offloading bodies larger
        than their queue accepts to S3; failed entries are retried once on their own."""
        results: dict[str, SendResult] = {}
        by_queue: dict[str, list[tuple[Outgoing, dict[str, Any]]]] = {}
        for item in items:
            try:
                entry, offloaded = await self._entry(item)
            except Exception as exc:  # noqa: BLE001 - an upload that failed fails its own message, not the batch
                results[item.task_id] = SendResult(item.task_id, error=_as_error(exc, "its S3 upload failed"))
                continue
            results[item.task_id] = SendResult(item.task_id, offloaded)
            by_queue.setdefault(item.queue, []).append((item, entry))
        for queue, entries in by_queue.items():
            facts = self.facts[queue]
            for chunk in _chunks(entries, facts.max_message_size):
                failed = await self._send_chunk(facts.url, [entry for _, entry in chunk])
                for index, error in failed.items():
                    item, entry = chunk[index]
                    try:  # a throttled or internally failed entry: once more, on its own
                        await self._sqs_client.send_message(QueueUrl=facts.url, **_single(entry))
                    except Exception as exc:  # noqa: BLE001 - translated by the client; the rest of the batch is sent
                        results[item.task_id] = SendResult(item.task_id, error=_as_error(exc, error))
        return [results[item.task_id] for item in items]

    async def _entry(self, item: Outgoing) -> tuple[dict[str, Any], str | None]:
        sqs_name = self.queue_names[item.queue]
        body, attributes, offloaded = item.body, {}, None
        limit = self.facts[item.queue].max_message_size
        if len(body) + ATTRIBUTE_ALLOWANCE > limit:
            bucket = self.settings.s3_bucket
            if not bucket:
                raise PayloadTooLargeError(
                    f"the message for task {item.task_id} is {len(body)} bytes, more than SQS queue {sqs_name!r} "
                    f"accepts ({limit} bytes), and no S3 bucket is configured; set execution.config.backend to "
                    "'s3://BUCKET/PREFIX' so large payloads go through S3."
                )
            pointer = pointer_for(bucket, self.settings.s3_prefix, item.task_id, body)
            # Encrypted at rest whatever the bucket's default: SSE-KMS with the queues' key when the
            # config names one (sqs-creation-attributes.KmsMasterKeyId), else SSE-S3.
            kms_key = self.settings.queue_attributes.get("KmsMasterKeyId")
            sse = (
                {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": kms_key}
                if kms_key
                else {"ServerSideEncryption": "AES256"}
            )
            await self._s3_client.put_object(Bucket=pointer.bucket, Key=pointer.key, Body=body, **sse)
            body, offloaded = pointer.encode(), pointer.url
            attributes[S3_POINTER_ATTRIBUTE] = "True"
        attributes.update(self.keyring.sign(body))
        entry: dict[str, Any] = {"Id": item.task_id[-80:].replace(".", "_"), "MessageBody": body.decode("utf-8")}
        if attributes:
            entry["MessageAttributes"] = {k: {"DataType": "String", "StringValue": v} for k, v in attributes.items()}
        if sqs_name.endswith(".fifo"):  # one group per step attempt: FIFO order never serializes a run
            entry["MessageGroupId"] = item.task_id
            # Not the task id: anyone could send junk under it first and SQS would drop this
            # message for five minutes. A retry of this entry below reuses it.
            entry["MessageDeduplicationId"] = self.keyring.dedup_id(item.task_id)
        elif item.group:  # SQS fair queues: this group's backlog does not delay other groups' messages
            entry["MessageGroupId"] = item.group
        return entry, offloaded

    async def _send_chunk(self, url: str, entries: list[dict[str, Any]]) -> dict[int, str]:
        """Indexes of entries SQS did not take, with its error code."""
        if len(entries) == 1:
            await self._sqs_client.send_message(QueueUrl=url, **_single(entries[0]))
            return {}
        ids = {entry["Id"]: i for i, entry in enumerate(entries)}
        if len(ids) < len(entries):  # ids must be unique within a batch
            for i, entry in enumerate(entries):
                entry["Id"] = str(i)
            ids = {str(i): i for i in range(len(entries))}
        answer = await self._sqs_client.send_message_batch(QueueUrl=url, Entries=entries)
        return {ids[f["Id"]]: f"{f.get('Code')}: {f.get('Message', '')}" for f in answer.get("Failed", [])}

    # --- receiving and settling -------------------------------------------------------------------

    async def receive(self, queue: str, max_messages: int, wait_seconds: int) -> list[Delivery]:
        url = self.facts[queue].url
        result = await self._sqs_client.receive_message(
            QueueUrl=url,
            MaxNumberOfMessages=max(1, min(BATCH_ENTRIES, max_messages)),
            WaitTimeSeconds=wait_seconds,
            VisibilityTimeout=self.settings.visibility_timeout,
            MessageAttributeNames=["All"],
            AttributeNames=["ApproximateReceiveCount", "SentTimestamp"],
        )
        now = time.time()
        return [delivery_from_sqs(queue, url, raw, now) for raw in result.get("Messages", [])]

    async def fetch_payload(self, pointer: S3Pointer, max_bytes: int) -> bytes:
        """An offloaded body, read only up to ``max_bytes``; MalformedMessage if it is not there
        or is larger (infrastructure errors propagate, to be retried)."""
        try:
            answer = await self._s3_client.get_object(Bucket=pointer.bucket, Key=pointer.key)
        except boto_exc.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NoSuchBucket", "InvalidBucketName"):
                raise MalformedMessage(f"the offloaded payload {pointer.url} cannot be read ({code})") from None
            if code in ("AccessDenied", "403", "KMS.AccessDeniedException"):
                # The worker's permissions, not the message: it goes back to the queue, and the
                # redrive policy decides if this is never fixed.
                raise ConfigError(
                    f"this worker may not read the offloaded payload {pointer.url} ({code}); allow "
                    "s3:GetObject on the offload prefix (and kms:Decrypt for SSE-KMS)."
                ) from None
            raise
        async with answer["Body"] as stream:
            if int(answer.get("ContentLength") or 0) > max_bytes:
                raise MalformedMessage(
                    f"the offloaded payload {pointer.url} is {answer.get('ContentLength')} bytes, "
                    f"over the {max_bytes}-byte limit (execution.config.max_payload_mib)"
                )
            chunks, size = [], 0
            while size <= max_bytes:  # a read may return less than asked: read to the end, or past the cap
                chunk = await stream.read(min(1 << 20, max_bytes + 1 - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
            data = b"".join(chunks)
        if len(data) > max_bytes:
            raise MalformedMessage(f"the offloaded payload {pointer.url} is over the {max_bytes}-byte limit")
        return data

    async def change_visibility(self, deliveries: Sequence[Delivery], seconds: int) -> list[str]:
        """Set the visibility of held messages; returns receipt handles SQS no longer knows."""
        failed: list[str] = []
        by_queue: dict[str, list[Delivery]] = {}
        for delivery in deliveries:
            by_queue.setdefault(delivery.queue_url, []).append(delivery)
        for queue_url, items in by_queue.items():
            for start in range(0, len(items), BATCH_ENTRIES):
                chunk = items[start : start + BATCH_ENTRIES]
                answer = await self._sqs_client.change_message_visibility_batch(
                    QueueUrl=queue_url,
                    Entries=[
                        {"Id": str(i), "ReceiptHandle": d.receipt_handle, "VisibilityTimeout": seconds}
                        for i, d in enumerate(chunk)
                    ],
                )
                failed.extend(chunk[int(f["Id"])].receipt_handle for f in answer.get("Failed", []))
        return failed

    async def delete_many(self, deliveries: Sequence[Delivery], payloads: Sequence[S3Pointer] = ()) -> list[str]:
        """Delete messages (ten per DeleteMessageBatch call) and the offloaded payloads whose
        messages are gone; returns the message ids SQS refused to delete."""
        refused: list[str] = []
        by_queue: dict[str, list[Delivery]] = {}
        for delivery in deliveries:
            by_queue.setdefault(delivery.queue_url, []).append(delivery)
        for queue_url, items in by_queue.items():
            for start in range(0, len(items), BATCH_ENTRIES):
                chunk = items[start : start + BATCH_ENTRIES]
                if len(chunk) == 1:
                    await self._sqs_client.delete_message(QueueUrl=queue_url, ReceiptHandle=chunk[0].receipt_handle)
                    continue
                answer = await self._sqs_client.delete_message_batch(
                    QueueUrl=queue_url,
                    Entries=[{"Id": str(i), "ReceiptHandle": d.receipt_handle} for i, d in enumerate(chunk)],
                )
                refused.extend(chunk[int(f["Id"])].message_id for f in answer.get("Failed", []))
        for pointer in payloads:  # the payload is no use once its message is gone
            try:
                await self._s3_client.delete_object(Bucket=pointer.bucket, Key=pointer.key)
            except boto_exc.ClientError as exc:
                log.warning("could not delete offloaded payload %s: %s", pointer.url, exc)
        return refused

    async def dead_letter(self, delivery: Delivery, reason: str) -> str | None:
        """Move a message that can never run to its queue's dead-letter queue now (deleting it when
        the queue has none); returns the dead-letter queue's name, or None when it was deleted."""
        facts = self.facts[delivery.queue]
        if facts.dead_letter_url:
            # The copy fits where the original did: `queues create` gives a queue and its dead-letter
            # queue the same limit. Measured against 256 KiB instead, a 900 KB inline message's copy
            # would lose its signature and could never be redriven.
            attributes = dead_letter_attributes(
                delivery.attributes, reason, len(delivery.body), limit=facts.max_message_size
            )
            kwargs: dict[str, Any] = {
                "QueueUrl": facts.dead_letter_url,
                "MessageBody": delivery.body.decode("utf-8", "replace"),
                "MessageAttributes": attributes,
            }
            if facts.dead_letter_url.endswith(".fifo"):
                kwargs["MessageGroupId"] = kwargs["MessageDeduplicationId"] = delivery.message_id or "dead-letter"
            await self._sqs_client.send_message(**kwargs)
        await self._sqs_client.delete_message(QueueUrl=delivery.queue_url, ReceiptHandle=delivery.receipt_handle)
        return facts.dead_letter_name


def _single(entry: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if k != "Id"}


def _entry_size(entry: Mapping[str, Any]) -> int:
    return len(entry["MessageBody"].encode()) + ATTRIBUTE_ALLOWANCE


def _chunks(
    entries: list[tuple[Outgoing, dict[str, Any]]], max_bytes: int
) -> list[list[tuple[Outgoing, dict[str, Any]]]]:
    """Batches of at most ten entries whose bodies together fit what the queue accepts."""
    chunks: list[list[tuple[Outgoing, dict[str, Any]]]] = []
    current: list[tuple[Outgoing, dict[str, Any]]] = []
    size = 0
    for item in entries:
        item_size = _entry_size(item[1])
        if current and (len(current) == BATCH_ENTRIES or size + item_size > max_bytes):
            chunks.append(current)
            current, size = [], 0
        current.append(item)
        size += item_size
    if current:
        chunks.append(current)
    return chunks


def _as_error(exc: BaseException, batch_error: str) -> TaskiqSyncError:
    if isinstance(exc, TaskiqSyncError):
        return exc
    return BrokerError(
        f"SQS did not take the message ({batch_error}), nor on a second try ({type(exc).__name__}: {exc})."
    )
