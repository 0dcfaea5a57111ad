"""The synchronous door to SQS: every broker call from a thread, with a deadline and one sentence
for the user when it fails.

:class:`BrokerClient` wraps :class:`~dagster_taskiq_sync.wire.broker.StepBroker` (which lives on the
process's event-loop thread) through the :class:`~dagster_taskiq_sync.wire.bridge.Bridge`; botocore and
taskiq-aio-sqs errors are translated here, at the edge, into this project's exceptions.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from botocore import exceptions as boto_exc
from taskiq_aio_sqs import exceptions as sqs_exc

from dagster_taskiq_sync.errors import (
    BrokerError,
    ConfigError,
    EndpointUnreachableError,
    QueueMissingError,
    TaskiqSyncError,
)
from dagster_taskiq_sync.wire.bridge import Bridge
from dagster_taskiq_sync.wire.broker import QUEUE_CREATE_HINT, CallObserver, StepBroker
from dagster_taskiq_sync.wire.deliveries import Delivery, Outgoing, QueueFacts, SendResult
from dagster_taskiq_sync.wire.messages import Keyring, MalformedMessage
from dagster_taskiq_sync.wire.payloads import S3Pointer
from dagster_taskiq_sync.wire.settings import SQSSettings

log = logging.getLogger("dagster_taskiq_sync.broker")


class BrokerClient:
    """Synchronous facade over :class:`StepBroker`, reached only through the bridge.

    ``observe`` (optional) is told about every call: action, seconds, and the error class name
    when it failed (worker metrics). ``dead_letters=False`` (senders): the queues' dead-letter
    queues are not looked up at start, and :meth:`dead_letter` deletes.
    """

    def __init__(
        self,
        settings: SQSSettings,
        bridge: Bridge,
        queues: Iterable[str] = (),
        keyring: Keyring | None = None,
        call_timeout: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        observe: CallObserver | None = None,
        dead_letters: bool = True,
    ) -> None:
        self.settings = settings
        self.bridge = bridge
        self.broker = StepBroker(settings, list(queues), keyring, dead_letters=dead_letters)
        self.call_timeout = call_timeout
        self._started = False
        self.clock = clock
        self.sleep = sleep
        self._observe = observe

    @property
    def facts(self) -> Mapping[str, QueueFacts]:
        return self.broker.facts

    def _call(
        self, what: str, action: str, fn: Any, *args: Any, queue: str | None = None, timeout: float | None = None
    ) -> Any:
        started = time.monotonic()
        error: str | None = None
        try:
            return self.bridge.call(fn, *args, timeout=timeout or self.call_timeout)
        except TaskiqSyncError as exc:
            error = type(exc).__name__
            raise
        except MalformedMessage as exc:
            error = type(exc).__name__
            raise
        except TimeoutError:
            error = "Timeout"
            raise EndpointUnreachableError(
                f"{what} on {self.settings.describe_endpoint()} did not answer within "
                f"{timeout or self.call_timeout:g} s; check that the SQS endpoint in "
                "execution.config.broker (or AWS_ENDPOINT_URL) is up and reachable."
            ) from None
        except Exception as exc:  # noqa: BLE001 - translate vendor errors at the edge
            translated = translate_error(exc, self.settings, what, queue)
            error = type(translated).__name__
            raise translated from None
        finally:
            if self._observe is not None:
                self._observe(action, time.monotonic() - started, error)

    def start(self) -> BrokerClient:
        """Open clients and resolve every queue URL (a missing queue fails here, by name)."""
        if not self._started:
            try:
                self._call("connecting to SQS", "GetQueueAttributes", self.broker.startup)
            except TaskiqSyncError:
                self._close_quietly()
                raise
            self._started = True
        return self

    def _close_quietly(self) -> None:
        try:
            self.bridge.call(self.broker.shutdown, timeout=10)
        except Exception as exc:  # noqa: BLE001 - closing must not mask what made us stop
            log.debug("closing the SQS clients failed: %s", exc)

    def stop(self) -> None:
        if self._started:
            self._started = False
            self._close_quietly()

    def __enter__(self) -> BrokerClient:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def send_many(self, items: Sequence[Outgoing], retry_for: float = 0.0) -> list[SendResult]:
        """Send messages in batches; through an endpoint outage keep retrying for ``retry_for`` s.

        Only "cannot reach / did not answer" is retried: a missing queue or refused credentials
        will not fix themselves. Per-message failures come back in their SendResult.
        """
        queues = sorted({item.queue for item in items})
        what = f"sending {len(items)} message(s) to queue {', '.join(map(repr, queues))}"
        deadline = self.clock() + retry_for
        delay = 0.5
        while True:
            try:
                return self._call(
                    what,
                    "SendMessageBatch",
                    self.broker.send_many,
                    list(items),
                    queue=queues[0] if len(queues) == 1 else None,
                )
            except EndpointUnreachableError as exc:
                if self.clock() + delay > deadline:
                    raise
                log.warning("%s failed (%s); retrying in %.1f s", what, exc, delay)
                self.sleep(delay)
                delay = min(delay * 2, 10.0)

    def send(
        self, *, queue: str, task_id: str, body: bytes, retry_for: float = 0.0, group: str | None = None
    ) -> str | None:
        """Send one message (raising its error); returns the S3 URL its payload went to, if any."""
        [result] = self.send_many([Outgoing(queue, task_id, body, group)], retry_for=retry_for)
        if result.error is not None:
            raise result.error
        return result.offloaded_to

    def receive(self, queue: str, max_messages: int, wait_seconds: int) -> list[Delivery]:
        """Long-poll one queue.

        There is no way to abandon a poll in flight, on purpose: SQS may hand that poll a message
        after we stopped listening, hiding it for a whole visibility timeout. A stopping worker lets
        the poll return (at most ``wait_seconds``) and releases what it got.
        """
        what = f"receiving from queue {queue!r}"
        budget = wait_seconds + self.settings.connect_timeout * self.settings.max_attempts + 10
        return self._call(
            what, "ReceiveMessage", self.broker.receive, queue, max_messages, wait_seconds, queue=queue, timeout=budget
        )

    def fetch_payload(self, pointer: S3Pointer, max_bytes: int) -> bytes:
        return self._call(
            f"reading the offloaded payload {pointer.url}", "GetObject", self.broker.fetch_payload, pointer, max_bytes
        )

    def change_visibility(self, deliveries: Sequence[Delivery], seconds: int) -> list[str]:
        return self._call(
            "extending message visibility",
            "ChangeMessageVisibilityBatch",
            self.broker.change_visibility,
            list(deliveries),
            seconds,
        )

    def delete_many(self, deliveries: Sequence[Delivery], payloads: Sequence[S3Pointer] = ()) -> list[str]:
        queues = sorted({d.queue for d in deliveries})
        return self._call(
            f"deleting {len(deliveries)} message(s) from queue {', '.join(map(repr, queues))}",
            "DeleteMessageBatch",
            self.broker.delete_many,
            list(deliveries),
            list(payloads),
            queue=queues[0] if len(queues) == 1 else None,
        )

    def dead_letter(self, delivery: Delivery, reason: str) -> str | None:
        return self._call(
            f"moving message {delivery.message_id} of queue {delivery.queue!r} to its dead-letter queue",
            "SendMessage",
            self.broker.dead_letter,
            delivery,
            reason,
            queue=delivery.queue,
        )


def translate_error(exc: BaseException, settings: SQSSettings, what: str, queue: str | None) -> TaskiqSyncError:
    """One sentence for the user in place of a vendor traceback."""
    if isinstance(exc, TaskiqSyncError):
        return exc
    endpoint = settings.describe_endpoint()
    queue_shown = settings.queue_name(queue) if queue else None
    if isinstance(exc, sqs_exc.QueueNotFoundError):
        missing = getattr(exc, "queue_name", None) or queue_shown
        return QueueMissingError(f"SQS queue {missing!r} does not exist at {endpoint}; {QUEUE_CREATE_HINT}.")
    if isinstance(
        exc, (boto_exc.EndpointConnectionError, boto_exc.ConnectTimeoutError, boto_exc.ConnectionClosedError)
    ):
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
        return _client_error(exc, endpoint, what, queue_shown)
    if isinstance(exc, sqs_exc.TaskIQSQSError):
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, boto_exc.ClientError):
            code, status = _error_code(cause)
            return BrokerError(f"{what} failed: {exc}", code=code, http_status=status)
        return BrokerError(f"{what} failed: {exc}")
    if isinstance(exc, OSError) or type(exc).__module__.startswith("aiohttp"):
        return EndpointUnreachableError(
            f"cannot reach the SQS endpoint {endpoint} while {what} ({type(exc).__name__}: {exc}); "
            "start it, or fix execution.config.broker / AWS_ENDPOINT_URL."
        )
    return BrokerError(f"{what} failed unexpectedly: {type(exc).__name__}: {exc}")


def _client_error(exc: boto_exc.ClientError, endpoint: str, what: str, queue_shown: str | None) -> TaskiqSyncError:
    """An error SQS answered with, by its code: each one the user can act on gets its own sentence."""
    code, status = _error_code(exc)
    message = exc.response.get("Error", {}).get("Message", "")
    if "NonExistentQueue" in code or code == "QueueDoesNotExist":
        return QueueMissingError(f"SQS queue {queue_shown!r} does not exist at {endpoint}; {QUEUE_CREATE_HINT}.")
    if code in ("AccessDenied", "AccessDeniedException", "InvalidClientTokenId", "SignatureDoesNotMatch"):
        return ConfigError(f"SQS refused {what} ({code}: {message}); check the credentials and IAM permissions.")
    return BrokerError(f"SQS failed {what} ({code}: {message}).", code=code, http_status=status)


def _error_code(exc: boto_exc.ClientError) -> tuple[str, int | None]:
    """AWS's error code and the answer's HTTP status, as botocore parsed them."""
    code = exc.response.get("Error", {}).get("Code", "")
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return (code if isinstance(code, str) else ""), (status if isinstance(status, int) else None)
