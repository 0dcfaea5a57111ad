"""Who opens the Dagster instance: the worker's own, from ``DAGSTER_HOME``, never a message's.

A worker, its step children and the CLI's ``worker list`` / ``terminate`` use the instance of
the ``DAGSTER_HOME`` they were started with, as dagster-celery's run tasks do. A message names a
run; the run must exist in that instance. This module is also where a long-lived process turns
on connection pooling (a setting read once, at the edge) and where workers starting together
on a fresh sqlite home take turns creating its tables.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from dagster_taskiq_sync.errors import ConfigError

log = logging.getLogger("dagster_taskiq_sync.instance")

DB_POOL_ENV = "DAGSTER_TASKIQ_SYNC_DB_POOL"
NO_HOME = (
    "DAGSTER_HOME is not set; dagster-taskiq-sync workers run steps only against their own Dagster "
    "instance: set DAGSTER_HOME to a directory whose dagster.yaml has the same storage as the "
    "orchestrator's (PostgreSQL across machines, or the same sqlite directory on one machine)."
)


@dataclass(frozen=True)
class InstanceOptions:
    """How a long-lived process uses its instance; read once from the environment at the edge."""

    pool_connections: bool = True
    # Event writes, run/KV writes and reads ride out a database outage this long (db_retry.py).
    outage_timeout: float = 120.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, outage_timeout: float = 120.0) -> InstanceOptions:
        value = (env if env is not None else os.environ).get(DB_POOL_ENV, "1").strip().lower()
        if value not in ("0", "1", "true", "false", "yes", "no", "on", "off", ""):
            raise ConfigError(f"{DB_POOL_ENV}={value!r} must be 1 or 0; unset it to pool database connections.")
        return cls(pool_connections=value not in ("0", "false", "no", "off"), outage_timeout=outage_timeout)


def dagster_home(env: Mapping[str, str] | None = None) -> str:
    """The worker's DAGSTER_HOME, or a ConfigError saying how to set it."""
    home = (env if env is not None else os.environ).get("DAGSTER_HOME", "").strip()
    if not home:
        raise ConfigError(NO_HOME)
    if not os.path.isdir(home):
        raise ConfigError(f"DAGSTER_HOME={home!r} is not a directory; create it with a dagster.yaml, or fix the path.")
    return home


@contextlib.contextmanager
def first_use_lock(home: str) -> Iterator[None]:
    """Serialize the first use of a fresh sqlite DAGSTER_HOME between processes.

    Workers started together on a new sqlite home would each create its tables and stamp its
    schema version at once (Dagster does not lock that), leaving "table already exists" errors
    or two alembic heads behind. One at a time per home.
    """
    try:
        lock = open(os.path.join(home, ".dagster-taskiq-sync-init.lock"), "a")
    except OSError:
        yield
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def open_home_instance(options: InstanceOptions | None = None, env: Mapping[str, str] | None = None) -> Any:
    """The instance of DAGSTER_HOME, pooled if asked; ConfigError if it cannot be opened."""
    from dagster import DagsterInstance

    home = dagster_home(env)
    try:
        with first_use_lock(home):
            instance = DagsterInstance.from_config(home)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - a broken dagster.yaml or an unreachable database
        raise ConfigError(
            f"the Dagster instance in DAGSTER_HOME={home!r} cannot be opened ({type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r}); fix its dagster.yaml or start its database."
        ) from None
    return prepared(instance, options or InstanceOptions())


def instance_from_ref(ref: Any, options: InstanceOptions | None = None) -> Any:
    """An instance from a reference the worker itself made (step and run children)."""
    from dagster import DagsterInstance

    return prepared(DagsterInstance.from_ref(ref), options or InstanceOptions())


def prepared(instance: Any, options: InstanceOptions) -> Any:
    """A long-lived process's instance: pooled connections, and reads and writes that ride out a
    database outage of up to ``options.outage_timeout`` (a PostgreSQL restart, a locked sqlite)."""
    from dagster_taskiq_sync.storage.db_retry import install_event_write_retry

    return install_event_write_retry(pooled(instance, options), options.outage_timeout, reads=True)


def pooled(instance: Any, options: InstanceOptions) -> Any:
    """Keep database connections open in a long-lived process (worker, step child, orchestrator).

    Dagster's PostgreSQL storages open a new connection for every query unless told otherwise
    (``optimize_for_webserver``, what dagster-webserver does): a worker polling for cancels and
    writing liveness records, a step child writing ~12 events per step and an orchestrator
    reading the event log every 20 ms would each pay a connection set-up, and the server a
    backend start, per query. With pooling each process holds one connection per storage (plus
    short-lived overflow under concurrency); ``DAGSTER_TASKIQ_SYNC_DB_POOL=0`` turns it off where
    connections are scarce (no PgBouncer). On sqlite, where Dagster builds a new engine and
    connection for every query (~1 ms of CPU each), each database file keeps one open connection
    (``_dagster.sqlite.keep_sqlite_connections``).
    """
    if not options.pool_connections or getattr(instance, "_dagster_taskiq_sync_pooled", False):
        return instance
    try:
        from dagster_taskiq_sync._dagster.sqlite import keep_sqlite_connections

        if keep_sqlite_connections(instance):
            instance._dagster_taskiq_sync_pooled = True
            return instance
        # statement_timeout 0: no timeout, as without pooling
        instance.optimize_for_webserver(statement_timeout=0, pool_recycle=1800, max_overflow=10)
        instance._dagster_taskiq_sync_pooled = True
    except Exception as exc:  # noqa: BLE001 - an optimisation; never fail a step for it
        log.warning("could not pool database connections: %s", exc)
    return instance
