"""Who talks to SQS: the TaskIQ broker and its synchronous facade.

:class:`StepBroker` is taskiq-aio-sqs's ``SQSBroker`` (message format, S3 offload of large
payloads, FIFO group/deduplication ids) plus the explicit receive / extend / release / delete
operations a thread-based worker with bounded prefetch needs. ``SQSBroker.listen()`` is not
used: it keeps polling into a 100-message buffer whatever the worker's capacity, which would
pile ready steps up in the first worker that polls.

:class:`BrokerClient` is the only way synchronous code reaches it: every call goes through the
process's :class:`~dagster_taskiq_sync.bridge.Bridge` with a deadline, and botocore errors are
translated here into this project's exceptions with a sentence the user can act on.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import threading
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

from aiobotocore.config import AioConfig
from botocore import exceptions as boto_exc
from taskiq.exceptions import SendTaskError
from taskiq.message import BrokerMessage
from taskiq_aio_sqs import SQSBroker, SQSQueue
from taskiq_aio_sqs import exceptions as sqs_exc

from .bridge import Bridge
from .errors import (
    BrokerError,
    ConfigError,
    EndpointUnreachableError,
    PayloadTooLargeError,
    QueueMissingError,
    TaskiqSyncError,
)
from .settings import SQSSettings

log = logging.getLogger(__name__)

STEP_TASK_NAME = "dagster_taskiq_sync.execute_step"
RUN_TASK_NAME = "dagster_taskiq_sync.execute_run"  # TaskiqRunLauncher.launch_run
RESUME_TASK_NAME = "dagster_taskiq_sync.resume_run"  # TaskiqRunLauncher.resume_run
TASK_NAMES = (STEP_TASK_NAME, RUN_TASK_NAME, RESUME_TASK_NAME)
SQS_MIN_DEFAULT_SIZE = 262_144  # what a queue accepts when it does not say (the old SQS default)
ATTRIBUTE_ALLOWANCE = 1024  # SQS counts message attributes against the size limit too
QUEUE_CREATE_HINT = "create it with `dagster-taskiq-sync queues create -y RUN_CONFIG.yaml` (or name its URL in broker_transport_options.predefined_queues)"


@dataclasses.dataclass(frozen=True)
class Delivery:
    """One received SQS message, held by a worker until it is deleted or released."""

    queue: str  # Celery queue name, as the user wrote it
    queue_url: str
    receipt_handle: str
    message_id: str
    receive_count: int
    body: bytes
    s3_object: tuple[str, str] | None = None  # (bucket, key) of an offloaded payload
    received_at: float = 0.0  # wall clock when the worker received it (the step's "picked up" event)


class StepBroker(SQSBroker):
    """taskiq-aio-sqs broker with worker-side primitives and explicit client settings."""

    def __init__(self, settings: SQSSettings, queues: Sequence[str]) -> None:
        self.settings = settings
        # Only the queues this process uses must exist: a worker started with `-q other` or a
        # run whose steps are all routed elsewhere does not need the default queue.
        self.queue_names: dict[str, str] = {
            queue: settings.queue_name(queue) for queue in dict.fromkeys(queues or [settings.default_queue])
        }
        default_sqs_name = next(iter(self.queue_names.values()))
        super().__init__(
            default_sqs_name,
            endpoint_url=settings.endpoint_url,
            region_name=settings.region,  # type: ignore[arg-type]  # None: boto's resolution
            aws_access_key_id=settings.access_key_id,
            aws_secret_access_key=settings.secret_access_key,
            use_task_id_for_deduplication=True,  # FIFO: one message per step attempt
            wait_time_seconds=settings.wait_time_seconds,
            visibility_timeout=settings.visibility_timeout,
            s3_extended_bucket_name=settings.s3_bucket,
        )
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
        self._tasks = {name: self.register_task(_task_body, task_name=name) for name in TASK_NAMES}
        self._max_message_size: dict[str, int] = {}  # SQS name -> MaximumMessageSize
        self.offloaded: dict[str, str] = {}  # task id -> S3 URL, read once by send

    async def startup(self) -> None:
        await super().startup()
        for sqs_name, url in self._queue_urls.items():
            answer = await self._sqs_client.get_queue_attributes(QueueUrl=url, AttributeNames=["MaximumMessageSize"])
            self._max_message_size[sqs_name] = int(answer["Attributes"].get("MaximumMessageSize", SQS_MIN_DEFAULT_SIZE))

    async def kick(self, message: BrokerMessage) -> None:
        """Send a message, offloading its body to S3 when the queue would refuse its size.

        taskiq-aio-sqs offloads only above 1 MiB whatever the queue accepts; queues created with
        a smaller MaximumMessageSize (256 KiB was the SQS default) would reject the send. The
        pointer has the same shape and attribute taskiq-aio-sqs uses, so its receivers read it too.
        """
        sqs_name = str(message.labels.get("queue", self._default_queue.name))
        limit = self._max_message_size.get(sqs_name, SQS_MIN_DEFAULT_SIZE)
        if len(message.message) + ATTRIBUTE_ALLOWANCE <= limit:
            await super().kick(message)
            return
        bucket = self.settings.s3_bucket
        if not bucket:
            raise PayloadTooLargeError(
                f"the message for task {message.task_id} is {len(message.message)} bytes, more than SQS "
                f"queue {sqs_name!r} accepts ({limit} bytes), and no S3 bucket is configured; set "
                "execution.config.backend to 's3://BUCKET/PREFIX' so large payloads go through S3."
            )
        key = "/".join(part for part in (self.settings.s3_prefix, f"{message.task_id}.json") if part)
        # Encrypted at rest whatever the bucket's default: SSE-KMS with the queues' key when the
        # config names one (sqs-creation-attributes.KmsMasterKeyId), else SSE-S3.
        kms_key = self.settings.queue_attributes.get("KmsMasterKeyId")
        sse = {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": kms_key} if kms_key else {"ServerSideEncryption": "AES256"}
        await self._s3_client.put_object(Bucket=bucket, Key=key, Body=message.message, **sse)
        self.offloaded[message.task_id] = f"s3://{bucket}/{key}"
        _, queue, queue_url = self._resolve_queue(message)
        pointer = BrokerMessage(
            task_id=message.task_id,
            task_name=message.task_name,
            message=json.dumps({"s3_bucket": bucket, "s3_key": key}).encode(),
            labels=message.labels,
        )
        kwargs = await self.build_kick_kwargs(pointer, queue=queue, queue_url=queue_url)
        kwargs["MessageAttributes"] = {"s3_extended_message": {"StringValue": "True", "DataType": "String"}}
        await self._sqs_client.send_message(**kwargs)

    async def _get_sqs_client(self):  # type: ignore[override]
        self._client_context_creator = self._session.create_client("sqs", **client_kwargs(self.settings, self._session))
        return await self._client_context_creator.__aenter__()

    async def _get_s3_client(self):  # type: ignore[override]
        self._s3_client_context_creator = self._session.create_client("s3", **client_kwargs(self.settings, self._session))
        return await self._s3_client_context_creator.__aenter__()

    async def _close_client(self) -> None:
        # SQSBroker closes the S3 client only when a bucket is configured, but it always opens
        # it; after a failed startup either may not exist yet.
        for name in ("_client_context_creator", "_s3_client_context_creator"):
            creator = getattr(self, name, None)
            if creator is not None:
                await creator.__aexit__(None, None, None)
                setattr(self, name, None)

    # --- orchestrator side --------------------------------------------------------------

    async def send(
        self, *, task_name: str, queue: str, task_id: str, group_id: str, kwargs: Mapping[str, Any]
    ) -> str | None:
        """Send one message; returns the S3 URL its payload went to, if it was offloaded."""
        await (
            self._tasks[task_name].kicker()
            .with_task_id(task_id)
            .with_labels(queue=self.queue_names[queue], group_id=group_id)
            .kiq(**kwargs)
        )
        return self.offloaded.pop(task_id, None)

    # --- worker side ----------------------------------------------------------------------

    async def receive(self, queue: str, max_messages: int, wait_seconds: int) -> list[Delivery]:
        sqs_name = self.queue_names[queue]
        queue_url = self._queue_urls[sqs_name]
        result = await self._sqs_client.receive_message(
            QueueUrl=queue_url,
            MaxNumberOfMessages=max(1, min(10, max_messages)),
            WaitTimeSeconds=wait_seconds,
            VisibilityTimeout=self.settings.visibility_timeout,
            MessageAttributeNames=["All"],
            AttributeNames=["ApproximateReceiveCount"],
        )
        deliveries = []
        for raw in result.get("Messages", []):
            deliveries.append(
                Delivery(
                    queue=queue,
                    queue_url=queue_url,
                    receipt_handle=raw["ReceiptHandle"],
                    message_id=raw.get("MessageId", ""),
                    receive_count=int(raw.get("Attributes", {}).get("ApproximateReceiveCount", "1")),
                    body=await self._payload(raw),
                    s3_object=_s3_pointer(raw),
                    received_at=time.time(),
                )
            )
        return deliveries

    async def _payload(self, raw: Mapping[str, Any]) -> bytes:
        """The message's bytes, fetched from S3 when the sender offloaded it there.

        taskiq-aio-sqs offloads a body over the queue's size limit to S3 and sends
        ``{"s3_bucket", "s3_key"}`` with the ``s3_extended_message`` attribute instead. A
        pointer that cannot be read is returned as is; the worker then rejects it as malformed.
        """
        body = raw.get("Body", "").encode("utf-8")
        pointer = _s3_pointer(raw)
        if pointer is None:
            return body
        try:
            s3_object = await self._s3_client.get_object(Bucket=pointer[0], Key=pointer[1])
            async with s3_object["Body"] as stream:
                return await stream.read()
        except boto_exc.ClientError as exc:
            log.error("message %s: its S3 payload cannot be read (%s)", raw.get("MessageId"), exc)
            return body

    async def change_visibility(self, deliveries: Sequence[Delivery], seconds: int) -> list[str]:
        """Set the visibility of held messages; returns receipt handles SQS no longer knows."""
        failed: list[str] = []
        by_queue: dict[str, list[Delivery]] = {}
        for delivery in deliveries:
            by_queue.setdefault(delivery.queue_url, []).append(delivery)
        for queue_url, items in by_queue.items():
            for start in range(0, len(items), 10):
                chunk = items[start : start + 10]
                answer = await self._sqs_client.change_message_visibility_batch(
                    QueueUrl=queue_url,
                    Entries=[
                        {"Id": str(i), "ReceiptHandle": d.receipt_handle, "VisibilityTimeout": seconds}
                        for i, d in enumerate(chunk)
                    ],
                )
                failed.extend(chunk[int(f["Id"])].receipt_handle for f in answer.get("Failed", []))
        return failed

    async def delete(self, delivery: Delivery) -> None:
        await self._sqs_client.delete_message(
            QueueUrl=delivery.queue_url, ReceiptHandle=delivery.receipt_handle
        )
        if delivery.s3_object is not None:  # the payload is no use once its message is gone
            bucket, key = delivery.s3_object
            try:
                await self._s3_client.delete_object(Bucket=bucket, Key=key)
            except boto_exc.ClientError as exc:
                log.warning("could not delete offloaded payload s3://%s/%s: %s", bucket, key, exc)



def _s3_pointer(raw: Mapping[str, Any]) -> tuple[str, str] | None:
    if "s3_extended_message" not in raw.get("MessageAttributes", {}):
        return None
    try:
        pointer = json.loads(raw.get("Body", ""))
        return str(pointer["s3_bucket"]), str(pointer["s3_key"])
    except (ValueError, KeyError, TypeError):
        return None


def client_kwargs(settings: SQSSettings, session: Any, with_role: bool = True) -> dict[str, Any]:
    """create_client arguments for the SQS and S3 clients (explicit settings, else boto's).

    With ``sts_role_arn`` the session's clients sign as that role (refreshing credentials.py
    credentials, assumed with the explicit key/secret or boto's chain); ``with_role=False`` gives
    the arguments for the STS client that assumes it.
    """
    options: dict[str, Any] = {
        "connect_timeout": settings.connect_timeout,
        # Long polls hold the connection up to wait_time_seconds; leave room beyond it.
        "read_timeout": settings.wait_time_seconds + 20,
        "retries": {"max_attempts": settings.max_attempts, "mode": "standard"},
    }
    options.update(settings.client_config)
    kwargs = {
        "region_name": settings.region or session.get_config_variable("region") or "us-east-1",
        "endpoint_url": settings.endpoint_url,
        "aws_access_key_id": settings.access_key_id,
        "aws_secret_access_key": settings.secret_access_key,
        "config": AioConfig(**options),
    }
    if with_role and settings.sts_role_arn:
        from .credentials import use_role

        use_role(session, settings)
        kwargs.update(aws_access_key_id=None, aws_secret_access_key=None)
    return kwargs


async def _task_body(**kwargs: Any) -> None:  # pragma: no cover - never run by taskiq
    """Registered so kicks are named tasks; the worker runs them in child processes instead."""
    raise RuntimeError("dagster_taskiq_sync messages are run by `dagster-taskiq-sync worker start`")


class BrokerClient:
    """Synchronous facade over :class:`StepBroker`, reached only through the bridge."""

    def __init__(
        self,
        settings: SQSSettings,
        bridge: Bridge,
        queues: Iterable[str] = (),
        call_timeout: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.settings = settings
        self.bridge = bridge
        self.broker = StepBroker(settings, list(queues))
        self.call_timeout = call_timeout
        self._started = False
        self.clock = clock
        self.sleep = sleep

    def _call(self, what: str, fn: Any, *args: Any, queue: str | None = None, timeout: float | None = None) -> Any:
        try:
            return self.bridge.call(fn, *args, timeout=timeout or self.call_timeout)
        except TaskiqSyncError:
            raise
        except TimeoutError:
            raise EndpointUnreachableError(
                f"{what} on {self.settings.describe_endpoint()} did not answer within "
                f"{timeout or self.call_timeout:g} s; check that the SQS endpoint in "
                "execution.config.broker (or AWS_ENDPOINT_URL) is up and reachable."
            ) from None
        except Exception as exc:  # translate vendor errors at the edge
            raise translate_error(exc, self.settings, what, queue) from None

    def start(self) -> "BrokerClient":
        """Open clients and resolve every queue URL (a missing queue fails here, by name)."""
        if not self._started:
            try:
                self._call("connecting to SQS", self.broker.startup)
            except TaskiqSyncError:
                self._close_quietly()
                raise
            self._started = True
        return self

    def _close_quietly(self) -> None:
        try:
            self.bridge.call(self.broker.shutdown, timeout=10)
        except Exception as exc:  # closing must not mask what made us stop
            log.debug("closing the SQS clients failed: %s", exc)

    def stop(self) -> None:
        if self._started:
            self._started = False
            self._close_quietly()

    def __enter__(self) -> "BrokerClient":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def send(
        self,
        *,
        queue: str,
        task_id: str,
        group_id: str,
        kwargs: Mapping[str, Any],
        retry_for: float = 0.0,
        task_name: str = STEP_TASK_NAME,
    ) -> str | None:
        """Send one message; through an endpoint outage keep retrying for ``retry_for`` s.

        Returns the S3 URL of the payload when it was too large for the queue.

        Only "cannot reach / did not answer" is retried: a missing queue or refused
        credentials will not fix themselves.
        """
        what = f"sending a message to queue {queue!r}"
        send = functools.partial(
            self.broker.send, task_name=task_name, queue=queue, task_id=task_id, group_id=group_id, kwargs=kwargs
        )
        deadline = self.clock() + retry_for
        delay = 0.5
        while True:
            try:
                return self._call(what, send, queue=queue)
            except EndpointUnreachableError as exc:
                if self.clock() + delay > deadline:
                    raise
                log.warning("%s failed (%s); retrying in %.1f s", what, exc, delay)
                self.sleep(delay)
                delay = min(delay * 2, 10.0)

    def receive(
        self, queue: str, max_messages: int, wait_seconds: int, cancel: threading.Event | None = None
    ) -> list[Delivery]:
        """Long-poll one queue; returns [] at once when ``cancel`` is set (shutdown).

        A long poll cancelled mid-flight may have taken messages SQS never got to hand us; they
        become visible again after the visibility timeout, so nothing is lost.
        """
        what = f"receiving from queue {queue!r}"
        budget = wait_seconds + self.settings.connect_timeout * self.settings.max_attempts + 10
        deadline = time.monotonic() + budget
        future = self.bridge.submit(self.broker.receive, queue, max_messages, wait_seconds)
        while True:
            try:
                return self.bridge.result(future, timeout=0.25, cancel=False)
            except TimeoutError:
                if cancel is not None and cancel.is_set():
                    future.cancel()
                    return []
                if time.monotonic() > deadline:
                    future.cancel()
                    raise EndpointUnreachableError(
                        f"{what} on {self.settings.describe_endpoint()} did not answer within "
                        f"{budget:g} s; check that the SQS endpoint is up and reachable."
                    ) from None
            except TaskiqSyncError:
                raise
            except Exception as exc:
                raise translate_error(exc, self.settings, what, queue) from None

    def change_visibility(self, deliveries: Sequence[Delivery], seconds: int) -> list[str]:
        return self._call("extending message visibility", self.broker.change_visibility, list(deliveries), seconds)

    def delete(self, delivery: Delivery) -> None:
        self._call(f"deleting a message from queue {delivery.queue!r}", self.broker.delete, delivery, queue=delivery.queue)


def translate_error(exc: BaseException, settings: SQSSettings, what: str, queue: str | None) -> TaskiqSyncError:
    """One sentence for the user in place of a vendor traceback."""
    if isinstance(exc, SendTaskError) and exc.__cause__ is not None:
        exc = exc.__cause__
    if isinstance(exc, TaskiqSyncError):
        return exc
    endpoint = settings.describe_endpoint()
    queue_shown = settings.queue_name(queue) if queue else None
    if isinstance(exc, sqs_exc.QueueNotFoundError):
        missing = getattr(exc, "queue_name", None) or queue_shown
        return QueueMissingError(f"SQS queue {missing!r} does not exist at {endpoint}; {QUEUE_CREATE_HINT}.")
    if isinstance(exc, (boto_exc.EndpointConnectionError, boto_exc.ConnectTimeoutError, boto_exc.ConnectionClosedError)):
        return EndpointUnreachableError(
            f"cannot reach the SQS endpoint {endpoint} while {what}; start it, or fix "
            "execution.config.broker (sqs://HOST:PORT) / AWS_ENDPOINT_URL."
        )
    if isinstance(exc, boto_exc.NoCredentialsError):
        return ConfigError(
            "no AWS credentials were found; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or a "
            "profile or role), or put them in execution.config.broker as sqs://KEY:SECRET@HOST:PORT."
        )
    if isinstance(exc, boto_exc.NoRegionError):
        return ConfigError(
            "no AWS region is set; set config_source.broker_transport_options.region or AWS_DEFAULT_REGION."
        )
    if isinstance(exc, boto_exc.ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        message = exc.response.get("Error", {}).get("Message", "")
        if "NonExistentQueue" in code or code == "QueueDoesNotExist":
            return QueueMissingError(f"SQS queue {queue_shown!r} does not exist at {endpoint}; {QUEUE_CREATE_HINT}.")
        if code in ("AccessDenied", "AccessDeniedException", "InvalidClientTokenId", "SignatureDoesNotMatch"):
            return ConfigError(f"SQS refused {what} ({code}: {message}); check the credentials and IAM permissions.")
        return BrokerError(f"SQS failed {what} ({code}: {message}).")
    if isinstance(exc, sqs_exc.TaskIQSQSError):
        return BrokerError(f"{what} failed: {exc}")
    if isinstance(exc, OSError) or type(exc).__module__.startswith("aiohttp"):
        return EndpointUnreachableError(
            f"cannot reach the SQS endpoint {endpoint} while {what} ({type(exc).__name__}: {exc}); "
            "start it, or fix execution.config.broker / AWS_ENDPOINT_URL."
        )
    return BrokerError(f"{what} failed unexpectedly: {type(exc).__name__}: {exc}")
