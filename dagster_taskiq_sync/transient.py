"""Which errors are the infrastructure's (retry them) and which are the message's (never).

A worker handling a message talks to the Dagster instance's database, S3 and SQS. When one of
them is briefly unavailable the message is still good: it must be retried with backoff, and must
never count toward the queue's dead-letter policy. Only a message that can never run goes to the
dead-letter queue.
"""

from __future__ import annotations

import sqlite3

from .errors import BrokerError, EndpointUnreachableError

# Phrases a database driver uses when the server, not the statement, is the problem.
_TRANSIENT_PHRASES = (
    "database is locked",
    "could not connect",
    "connection refused",
    "connection reset",
    "server closed the connection",
    "terminating connection",
    "the database system is starting up",
    "the database system is shutting down",
    "the database system is in recovery mode",
    "connection is closed",
    "connection already closed",
    "ssl syscall error",
    "timeout expired",
    "could not receive data",
    "could not send data",
    "no connection to the server",
)


def _causes(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(chain) < 10:
        chain.append(current)
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return chain


def is_transient(exc: BaseException) -> bool:
    """True for an outage of the database, S3 or SQS (retry it), False for everything else."""
    for error in _causes(exc):
        if isinstance(error, (EndpointUnreachableError, ConnectionError, TimeoutError)):
            return True
        if isinstance(error, BrokerError) and ("Throttl" in str(error) or "InternalError" in str(error)
                                               or "ServiceUnavailable" in str(error)):
            return True
        if isinstance(error, sqlite3.OperationalError) and "locked" in str(error).lower():
            return True
        module = type(error).__module__
        if module.startswith(("sqlalchemy", "psycopg2", "psycopg")):
            if getattr(error, "connection_invalidated", False):
                return True
            name = type(error).__name__
            if name in ("OperationalError", "InterfaceError", "PendingRollbackError", "DisconnectionError",
                        "TimeoutError") and _phrase(error):
                return True
            if name in ("PendingRollbackError", "DisconnectionError"):
                return True
        if isinstance(error, OSError) and not isinstance(error, (FileNotFoundError, PermissionError)):
            return True
    return False


def _phrase(error: BaseException) -> bool:
    text = str(error).lower()
    return any(phrase in text for phrase in _TRANSIENT_PHRASES)
