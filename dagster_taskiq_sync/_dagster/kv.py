"""Key-value rows of Dagster's run storage: delete and scan, which its API lacks."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

# --- the key-value store's rows -------------------------------------------------------------------
# Dagster's run storage offers get/set of key-value rows but no delete or scan; liveness records
# are deleted when their run's execution ends, so the table holds O(running runs) of them.


def kv_delete(run_storage: Any, keys: Iterable[str]) -> int:
    """Delete key-value rows; 0 (nothing deleted) on a storage that is not SQL-backed."""
    keys = list(dict.fromkeys(keys))
    if not keys or not hasattr(run_storage, "connect"):
        return 0
    from dagster._core.storage.runs.schema import KeyValueStoreTable

    deleted = 0
    with run_storage.connect() as conn:
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            result = conn.execute(KeyValueStoreTable.delete().where(KeyValueStoreTable.c.key.in_(chunk)))
            deleted += result.rowcount or 0
    return deleted


def kv_insert_new(run_storage: Any, key: str, value: str) -> bool:
    """Insert a key-value row unless the key exists; True when this call inserted it.

    Atomic on SQL storages (the ``kvs`` table's unique index on ``key``): of two processes inserting
    the same key at once, exactly one gets True. Elsewhere a read then a write (not atomic)."""
    if not hasattr(run_storage, "connect"):
        if run_storage.get_cursor_values({key}).get(key) is not None:
            return False
        run_storage.set_cursor_values({key: value})
        return True
    from dagster._core.storage.runs.schema import KeyValueStoreTable
    from sqlalchemy.exc import IntegrityError

    try:
        with run_storage.connect() as conn:
            conn.execute(KeyValueStoreTable.insert().values(key=key, value=value))
    except IntegrityError:
        return False
    return True


def kv_scan(run_storage: Any, prefix: str, limit: int) -> list[tuple[str, str]]:
    """Up to ``limit`` key-value rows whose key starts with ``prefix`` (oldest rows first)."""
    if not hasattr(run_storage, "connect"):
        return []
    import sqlalchemy as db
    from dagster._core.storage.runs.schema import KeyValueStoreTable

    table = KeyValueStoreTable
    query = (
        db.select(table.c.key, table.c.value)
        .where(table.c.key.like(prefix.replace("%", r"\%") + "%"))
        .order_by(table.c.id)
        .limit(limit)
    )
    with run_storage.connect() as conn:
        return [(row[0], row[1]) for row in conn.execute(query).fetchall()]
