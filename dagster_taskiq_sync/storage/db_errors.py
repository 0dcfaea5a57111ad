"""Is this database error the database being briefly unavailable, or a real error?

:func:`is_transient_db_error` answers for PostgreSQL (SQLSTATE classes and codes, then libpq's
messages), sqlite (primary result codes) and MySQL (error numbers), looking through SQLAlchemy's
and Dagster's wrappers; :func:`describe_db_error` names the error for a log line. Retrying on the
answer is ``db_retry``'s job.
"""

from __future__ import annotations

from collections.abc import Iterator

# PostgreSQL SQLSTATEs that mean "the server or the session went away or is overloaded; the same
# statement can succeed later". Classes: 08 connection exception, 53 insufficient resources (too
# many connections, out of memory, disk full). Codes: admin_shutdown (fast shutdown, failover,
# pg_terminate_backend), crash_shutdown, cannot_connect_now (starting up / shutting down / in
# recovery), idle_session_timeout, serialization_failure, deadlock_detected, lock_not_available.
# Not here on purpose: 57014 query_canceled (a statement_timeout would fire again, adding load),
# 57P04 database_dropped, and every class-23 (integrity) / 42 (syntax, permissions) error.
_PG_TRANSIENT_CLASSES = ("08", "53")
_PG_TRANSIENT_CODES = frozenset({"57P01", "57P02", "57P03", "57P05", "40001", "40P01", "55P03"})

# libpq failures carry no SQLSTATE; their message is all there is. Permanent ones win.
_PERMANENT_MESSAGES = (
    "does not exist",  # database / role
    "authentication failed",
    "no pg_hba.conf entry",
    "no password supplied",
    "permission denied",
    "invalid dsn",
)
_TRANSIENT_MESSAGES = (
    "connection refused",
    "server closed the connection unexpectedly",
    "terminating connection due to administrator command",
    "the database system is shutting down",
    "the database system is starting up",
    "the database system is in recovery mode",
    "the database system is not yet accepting connections",
    "connection already closed",
    "could not receive data from server",
    "could not send data to server",
    "no connection to the server",
    "connection reset by peer",
    "broken pipe",
    "ssl syscall error",
    "ssl connection has been closed unexpectedly",
    "eof detected",
    "connection timed out",
    "timeout expired",
    "temporary failure in name resolution",
    "no route to host",
    "network is unreachable",
    "too many clients already",
    "remaining connection slots are reserved",
    "lost connection to mysql server",
    "mysql server has gone away",
    # sqlite
    "database is locked",
    "database table is locked",
    "database schema is locked",
    "locking protocol",
)

# sqlite primary result codes: BUSY (another connection holds the write lock past the busy
# timeout), LOCKED (a table lock within one shared cache), PROTOCOL (WAL lock race). Not IOERR:
# "disk I/O error" is a filesystem failing (full, gone, NFS), which waiting a minute rarely
# fixes and which must reach the user as the step's error, not as a stall.
_SQLITE_TRANSIENT_CODES = frozenset({5, 6, 15})

# MySQL (dagster-mysql): can't connect, server gone away, lost connection, too many
# connections, lock wait timeout, deadlock.
_MYSQL_TRANSIENT_CODES = frozenset({2002, 2003, 2006, 2013, 1040, 1205, 1213})

_PERMANENT_DBAPI_CLASSES = ("IntegrityError", "ProgrammingError", "DataError", "NotSupportedError")


def is_transient_db_error(exc: BaseException) -> bool:
    """True when ``exc`` (or the database error it wraps) means the database was briefly
    unavailable: connection refused / reset / terminated, server shutting down or starting up,
    a stale pooled connection, sqlite's "database is locked", a deadlock or serialization
    failure. False for integrity, programming and data errors, and for anything not from a
    database.

    Wrappers are unwrapped: the first link of the ``__cause__`` chain (and of ``__context__``
    for Dagster's and SQLAlchemy's own exceptions, which sometimes re-raise without ``from``)
    that is a database error decides. dagster-postgres' ``DagsterPostgresException("too many
    retries for DB connection")`` is therefore transient through its cause.
    """
    for link in _chain(exc):
        verdict = _classify(link)
        if verdict is not None:
            return verdict
    return False


def describe_db_error(exc: BaseException) -> str:
    """One line naming the database error that decides ``exc``'s class, e.g.
    ``OperationalError: connection to server at "db", port 5432 failed: Connection refused``."""
    deciding = exc
    for link in _chain(exc):
        if _classify(link) is not None:
            deciding = link
            break
    orig = getattr(deciding, "orig", None)
    shown = orig if isinstance(orig, BaseException) else deciding
    text = " ".join(str(shown).split())
    if len(text) > 160:
        text = text[:157] + "..."
    return f"{type(shown).__name__}: {text}" if text else type(shown).__name__


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen and len(seen) < 32:
        seen.add(id(link))
        yield link
        if link.__cause__ is not None:
            link = link.__cause__
        elif not link.__suppress_context__ and _is_wrapper(link):
            link = link.__context__
        else:
            link = None


def _is_wrapper(exc: BaseException) -> bool:
    # Only Dagster's and SQLAlchemy's exceptions are followed through __context__: an unrelated
    # error raised while handling a database error (a KeyError in an except block) is not one.
    module = type(exc).__module__ or ""
    return module.split(".")[0] in ("dagster", "dagster_postgres", "dagster_mysql", "sqlalchemy")


def _classify(exc: BaseException) -> bool | None:
    """True/False for a database error we can judge, None to look further down the chain."""
    try:
        import sqlalchemy.exc as sa_exc
    except ImportError:  # pragma: no cover - Dagster depends on SQLAlchemy
        sa_exc = None  # type: ignore[assignment]  # the classification below then skips SQLAlchemy
    if sa_exc is not None:
        if isinstance(exc, sa_exc.DBAPIError):
            if exc.connection_invalidated:
                return True
            if isinstance(exc.orig, BaseException):
                verdict = _classify_dbapi(exc.orig)
                if verdict is not None:
                    return verdict
            if type(exc).__name__ in _PERMANENT_DBAPI_CLASSES:
                return False
            return _by_message(str(exc), default=False)
        if isinstance(exc, (sa_exc.PendingRollbackError, sa_exc.DisconnectionError, sa_exc.TimeoutError)):
            # PendingRollbackError: a Connection invalidated inside a transaction was used again;
            # Dagster opens a Connection per call, so the retry gets a fresh one.
            # TimeoutError: no pooled connection free within pool_timeout.
            return True
        if isinstance(exc, sa_exc.SQLAlchemyError):
            return None
    verdict = _classify_dbapi(exc)
    if verdict is not None:
        return verdict
    if isinstance(exc, ConnectionError):  # refused / reset / aborted / broken pipe
        return True
    return None


def _classify_dbapi(exc: BaseException) -> bool | None:
    """A driver's own exception (psycopg2, psycopg 3, sqlite3, pymysql / MySQLdb)."""
    module = (type(exc).__module__ or "").split(".")[0]
    name = type(exc).__name__
    if module in ("psycopg2", "psycopg"):
        code = getattr(exc, "pgcode", None) or getattr(exc, "sqlstate", None)
        if code:
            return code[:2] in _PG_TRANSIENT_CLASSES or code in _PG_TRANSIENT_CODES
        if _is_dbapi(exc, "IntegrityError", "ProgrammingError", "DataError", "NotSupportedError"):
            return False
        return _by_message(str(exc), default=False)
    if module in ("sqlite3", "_sqlite3"):
        code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
        if isinstance(code, int):
            return (code & 0xFF) in _SQLITE_TRANSIENT_CODES
        if name == "OperationalError":
            return _by_message(str(exc), default=False)
        return False
    if module in ("pymysql", "MySQLdb"):
        code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
        if code is not None:
            return code in _MYSQL_TRANSIENT_CODES
        return _by_message(str(exc), default=False)
    return None


def _is_dbapi(exc: BaseException, *names: str) -> bool:
    return any(cls.__name__ in names for cls in type(exc).__mro__)


def _by_message(message: str, default: bool) -> bool:
    text = message.lower()
    if any(marker in text for marker in _PERMANENT_MESSAGES):
        return False
    if any(marker in text for marker in _TRANSIENT_MESSAGES):
        return True
    return default
