"""Kept sqlite connections (``_dagster/sqlite.py``): a run's event-log file that Dagster already
created is used without loading alembic's migrations; a new or empty one is made in one
transaction, exactly as Dagster's own ``_initdb`` makes it; one another process is making goes
through ``_initdb``, which rides that race out."""

from __future__ import annotations

import logging
import time

import pytest
from alembic.script import ScriptDirectory
from dagster import DagsterInstance, EventLogEntry

from dagster_taskiq_sync._dagster.sqlite import keep_sqlite_connections

pytestmark = pytest.mark.compat  # private Dagster names and Dagster's own schema: bin/matrix runs it on every env


def _entry(run_id: str, text: str) -> EventLogEntry:
    return EventLogEntry(
        error_info=None,
        level=logging.INFO,
        user_message=text,
        run_id=run_id,
        timestamp=time.time(),
        step_key=None,
        job_name=None,
        dagster_event=None,
    )


def _messages(instance: DagsterInstance, run_id: str) -> list[str]:
    return [record.event_log_entry.user_message for record in instance.get_records_for_run(run_id).records]


def _schema(path) -> list[tuple]:
    import sqlite3

    assert path.exists()
    conn = sqlite3.connect(path)
    try:
        return sorted(conn.execute("SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'"))
    finally:
        conn.close()


@pytest.fixture
def kept(tmp_path):
    with DagsterInstance.local_temp(str(tmp_path)) as instance:
        assert keep_sqlite_connections(instance)
        yield instance


def _no_alembic(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("alembic's migration directory was loaded")

    monkeypatch.setattr(ScriptDirectory, "from_config", refuse)


def test_a_run_file_dagster_created_is_read_and_written_without_loading_alembic(tmp_path, kept, monkeypatch):
    with DagsterInstance.local_temp(str(tmp_path)) as plain:  # Dagster's own storage creates the file
        plain.event_log_storage.store_event(_entry("run-a", "by dagster"))
    _no_alembic(monkeypatch)

    kept.event_log_storage.store_event(_entry("run-a", "by a kept connection"))

    assert _messages(kept, "run-a") == ["by dagster", "by a kept connection"]


def test_a_new_run_file_is_made_in_one_transaction_exactly_as_dagsters_initdb_makes_it(tmp_path, kept, monkeypatch):
    def not_initdb(*args, **kwargs):
        raise AssertionError("Dagster's _initdb made the file")

    monkeypatch.setattr(kept.event_log_storage, "_initdb", not_initdb)
    kept.event_log_storage.store_event(_entry("run-new", "first"))
    monkeypatch.undo()
    with DagsterInstance.local_temp(str(tmp_path)) as plain:
        plain.event_log_storage.store_event(_entry("run-plain", "first"))

    events = tmp_path / "history" / "runs"
    made, dagsters = _schema(events / "run-new.db"), _schema(events / "run-plain.db")
    assert any(name == "event_logs" for _, name, _ in dagsters)
    assert made == dagsters
    assert _messages(kept, "run-new") == ["first"]


@pytest.mark.parametrize("made", ["empty", "an empty version table", "event tables without a revision"])
def test_a_run_file_without_dagsters_revision_is_made_whole(tmp_path, kept, made):
    # Made here in one transaction, or, where another process already made part of it, by _initdb
    import sqlite3

    events = tmp_path / "history" / "runs"
    events.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(events / "run-half.db")  # a connection that got there first creates an empty file
    if made == "an empty version table":  # crashed before the stamp
        conn.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)")
    conn.commit()
    conn.close()
    if made == "event tables without a revision":  # another process making it right now
        import sqlalchemy as db
        from dagster._core.storage.event_log.schema import SqlEventLogStorageTable

        engine = db.create_engine(f"sqlite:///{events / 'run-half.db'}")
        SqlEventLogStorageTable.create(engine)
        engine.dispose()

    kept.event_log_storage.store_event(_entry("run-half", "after"))

    assert _messages(kept, "run-half") == ["after"]
    with sqlite3.connect(events / "run-half.db") as check:
        assert check.execute("SELECT count(*) FROM alembic_version").fetchone()[0] == 1
