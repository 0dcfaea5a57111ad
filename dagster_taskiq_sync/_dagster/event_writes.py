"""Resuming an event write that committed part of its rows (used by storage.db_retry)."""

from __future__ import annotations

from typing import Any

from dagster import _check as check
from dagster._serdes import serialize_value

from dagster_taskiq_sync._dagster.names import _DAGSTER_MINOR

# --- Resuming an event write that committed part of its rows (db_retry) ----------------------
# ``store_event`` writes the event row, then (for some event types) a mirror row in sqlite's
# index shard, the asset row and its tags, and the asset-check row. A transient database error
# after the first commit leaves a prefix written; these finish the rest without duplicating it.
# How the rest is written differs by Dagster minor, which is why it lives here:
# - 1.13 writes the asset row and its tags in one ``index_transaction`` through
#   ``_store_asset_event`` / ``_store_asset_event_tags``; 1.11 / 1.12 make two separate public
#   calls (``store_asset_event``, then ``store_asset_event_tags``), so either may be missing.
# - sqlite 1.12 / 1.13 mirror asset-check events into the index shard and key the check row by
#   the mirror's id; 1.11 does not mirror them and stores the check row with no event id.


# 1.13+: ``store_event`` writes an asset event's tags and asset row in one index transaction.
_ONE_ASSET_TRANSACTION = _DAGSTER_MINOR >= (1, 13)


def is_sql_event_storage(storage: Any) -> bool:
    from dagster._core.storage.event_log.sql_event_log import SqlEventLogStorage

    return isinstance(storage, SqlEventLogStorage)


def stored_event_id(storage: Any, event: Any, *, index: bool) -> int | None:
    """The id of the row holding exactly ``event`` in its run's event log (or, ``index=True``,
    sqlite's cross-run index shard), or None."""
    import sqlalchemy as db
    from dagster._core.storage.event_log.schema import SqlEventLogStorageTable as table

    body = _event_row(storage, event)["event"]
    connection = storage.index_connection() if index else storage.run_connection(event.run_id)
    with connection as conn:
        query = (
            db.select(table.c.id)
            .where(table.c.run_id == event.run_id, table.c.event == body)
            .order_by(table.c.id)
            .limit(1)
        )
        found = conn.execute(query).scalar()
    return None if found is None else int(found)


def _event_row(storage: Any, event: Any) -> dict:
    to_row = getattr(storage, "_event_to_row", None)  # what prepare_insert_event writes
    if to_row is not None:
        return to_row(event)
    return {"event": serialize_value(event)}


def finish_stored_event(storage: Any, event: Any, event_id: int) -> None:
    """The writes ``store_event`` makes after the event row, for an event whose row was
    committed by an attempt that then failed. Mirrors ``store_event`` of
    ``SqlEventLogStorage`` / ``PostgresEventLogStorage`` and ``SqliteEventLogStorage`` on the
    installed Dagster minor."""
    from dagster._core.events import ASSET_CHECK_EVENTS, ASSET_EVENTS
    from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage

    if not event.is_dagster_event:
        return
    if isinstance(storage, SqliteEventLogStorage):
        _finish_sqlite_mirror(storage, event)
        return
    # One event table (PostgreSQL, MySQL, consolidated sqlite).
    event_type = event.dagster_event_type
    if event_type in ASSET_EVENTS and event.dagster_event.asset_key:
        _store_asset_rows(storage, event, event_id)
    if event_type in ASSET_CHECK_EVENTS:
        storage.store_asset_check_event(event, event_id)


def _finish_sqlite_mirror(storage: Any, event: Any) -> None:
    """Per-run shards: asset, asset-check (1.12+) and run-status events are mirrored into the
    index shard, and the asset / check rows key on the mirror's id."""
    from dagster._core.events import (
        ASSET_CHECK_EVENTS,
        ASSET_EVENTS,
        EVENT_TYPE_TO_PIPELINE_RUN_STATUS,
    )

    event_type = event.dagster_event_type
    check_mirrored = _DAGSTER_MINOR >= (1, 12)
    mirrored = (
        event_type in ASSET_EVENTS
        or (check_mirrored and event_type in ASSET_CHECK_EVENTS)
        or event_type in EVENT_TYPE_TO_PIPELINE_RUN_STATUS
    )
    mirror_id = stored_event_id(storage, event, index=True) if mirrored else None
    if event_type in ASSET_EVENTS and _ONE_ASSET_TRANSACTION:
        # 1.13 commits the mirror, the tags and the asset row in one transaction: a mirror
        # row means all three are there; no mirror row means none is.
        if mirror_id is None:
            with storage.index_transaction() as conn:
                mirror_id = _inserted_id(conn.execute(storage.prepare_insert_event(event)))
                storage._store_asset_event_tags(conn, [event], [mirror_id])
                storage._store_asset_event(conn, event, mirror_id)
        return
    if mirrored and mirror_id is None:
        with storage.index_connection() as conn:
            mirror_id = _inserted_id(conn.execute(storage.prepare_insert_event(event)))
    if event_type in ASSET_EVENTS:
        _store_asset_rows(storage, event, check.not_none(mirror_id))
    elif event_type in ASSET_CHECK_EVENTS:
        # sqlite reports "locked" before writing, so a failed check write wrote nothing.
        storage.store_asset_check_event(event, mirror_id)


def _store_asset_rows(storage: Any, event: Any, event_id: int) -> None:
    """The asset row and the asset-event tags of stored event ``event_id``."""
    if _ONE_ASSET_TRANSACTION:
        # 1.13: tags and asset row commit together, so tags present means both are written
        # (an event with no tags is rewritten harmlessly: the asset row is an upsert).
        if not _has_asset_event_tags(storage, event_id):
            with storage.index_transaction() as conn:
                storage._store_asset_event_tags(conn, [event], [event_id])
                storage._store_asset_event(conn, event, event_id)
        return
    # 1.11 / 1.12: the asset row is an upsert (safe to repeat); the tags are plain inserts, so
    # they are written only when the failed attempt wrote none.
    storage.store_asset_event(event, event_id)
    if not _has_asset_event_tags(storage, event_id):
        storage.store_asset_event_tags([event], [event_id])


def _has_asset_event_tags(storage: Any, event_id: int) -> bool:
    import sqlalchemy as db
    from dagster._core.storage.event_log.schema import AssetEventTagsTable as tags

    with storage.index_connection() as conn:
        query = db.select(tags.c.id).where(tags.c.event_id == event_id).limit(1)
        return conn.execute(query).scalar() is not None


def _inserted_id(result: Any) -> int:
    key = result.inserted_primary_key
    if not key or key[0] is None:
        raise RuntimeError("the event log did not return the id of the event it stored")
    return int(key[0])
