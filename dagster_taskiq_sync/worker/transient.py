"""Which errors are the infrastructure's (retry them) and which are the message's (never).

A worker handling a message talks to the Dagster instance's database, S3 and SQS. When one of
them is briefly unavailable the message is still good: it must be retried with backoff, and must
never count toward the queue's dead-letter policy. Only a message that can never run goes to the
dead-letter queue. Database errors are classified by ``db_errors.is_transient_db_error``.
"""

from __future__ import annotations

from dagster_taskiq_sync.errors import BrokerError, EndpointUnreachableError
from dagster_taskiq_sync.storage.db_errors import is_transient_db_error

# AWS error codes of SQS and S3 that mean "busy or briefly down, ask again" (exact codes, never
# parts of the message: its text can hold an S3 key or a name an attacker chose)
TRANSIENT_AWS_CODES = frozenset(
    {
        "InternalError",
        "InternalFailure",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "RequestTimeout",
        "RequestTimeoutException",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "KMS.ThrottlingException",
    }
)


def is_transient(exc: BaseException) -> bool:
    """True for an outage of the database, S3 or SQS (retry it), False for everything else."""
    current: BaseException | None = exc
    seen: set[int] = set()
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (EndpointUnreachableError, ConnectionError, TimeoutError)):
            return True
        if isinstance(current, BrokerError) and (
            current.code in TRANSIENT_AWS_CODES or (current.http_status or 0) >= 500
        ):
            return True
        current = current.__cause__
    return is_transient_db_error(exc)
