"""Database faults: transient errors are told apart from real ones, retried with backoff, and an
event written through an outage is stored exactly once.

Against a real PostgreSQL cluster on loopback (``postgres`` fixture, tests/postgres.py) that the
tests stop and start, and a real sqlite DAGSTER_HOME locked by another connection. The backoff
schedule is checked with an injected clock and sleep, without waiting.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
import uuid

import pytest
import sqlalchemy
import sqlalchemy.exc
import yaml
from dagster import AssetKey, AssetMaterialization, DagsterEventType, DagsterInstance
from dagster._core.events import DagsterEvent, StepMaterializationData
from dagster._core.test_utils import create_run_for_test

from dagster_taskiq_sync._dagster.event_writes import finish_stored_event
from dagster_taskiq_sync.storage.db_errors import describe_db_error, is_transient_db_error
from dagster_taskiq_sync.storage.db_retry import install_event_write_retry, retry_transient
from dagster_taskiq_sync.storage.event_watch import run_bell
from dagster_taskiq_sync.storage.instance import InstanceOptions, pooled

from ..helpers import wait_for

RETRY_LOG = "dagster_taskiq_sync.db_retry"


class FakeTime:
    """An injected clock and sleep: sleeping advances the clock, nothing waits."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def locked() -> sqlite3.OperationalError:
    return sqlite3.OperationalError("database is locked")


def failing(errors):
    """A function raising each of ``errors`` in turn, then returning "done"."""
    pending = list(errors)
    calls = []

    def fn():
        calls.append(1)
        if pending:
            raise pending.pop(0)
        return "done"

    fn.calls = calls
    return fn


# -- the backoff schedule, with injected time -------------------------------------------------


def test_backoff_doubles_from_a_quarter_second_to_five_seconds_and_stops_at_the_deadline():
    t = FakeTime()
    fn = failing([locked() for _ in range(100)])

    with pytest.raises(sqlite3.OperationalError, match="locked"):
        retry_transient(fn, what="reading run R from the instance", deadline_seconds=30, sleep=t.sleep, clock=t.clock)

    # 0.25+0.5+1+2+4 = 7.75, then 5 s steps to 27.75, then what is left of 30 s, then one last try.
    assert t.sleeps == [0.25, 0.5, 1, 2, 4, 5, 5, 5, 5, 2.25]
    assert len(fn.calls) == len(t.sleeps) + 1
    assert t.now - 1000.0 == pytest.approx(30)


def test_a_transient_error_that_clears_returns_the_result_and_reports_each_retry():
    t = FakeTime()
    fn = failing([locked(), locked(), locked()])
    retries = []

    result = retry_transient(
        fn,
        what="reading run R",
        deadline_seconds=60,
        sleep=t.sleep,
        clock=t.clock,
        on_retry=lambda exc, attempt, wait: retries.append((type(exc).__name__, attempt, wait)),
    )

    assert result == "done"
    assert retries == [("OperationalError", 1, 0.25), ("OperationalError", 2, 0.5), ("OperationalError", 3, 1)]


def test_a_non_transient_error_is_raised_at_once_without_waiting():
    t = FakeTime()
    fn = failing([sqlite3.IntegrityError("UNIQUE constraint failed: runs.run_id")])

    with pytest.raises(sqlite3.IntegrityError):
        retry_transient(fn, what="storing run R", deadline_seconds=60, sleep=t.sleep, clock=t.clock)

    assert t.sleeps == [] and len(fn.calls) == 1


def test_a_zero_deadline_means_one_attempt():
    t = FakeTime()
    with pytest.raises(sqlite3.OperationalError):
        retry_transient(failing([locked()]), what="x", deadline_seconds=0, sleep=t.sleep, clock=t.clock)
    assert t.sleeps == []


def test_one_log_line_per_kind_of_error_and_one_when_the_database_is_back(caplog):
    t = FakeTime()
    refused = sqlalchemy.exc.OperationalError("SELECT 1", {}, ConnectionRefusedError("Connection refused"))
    fn = failing([locked(), locked(), locked(), refused, refused, locked()])

    with caplog.at_level(logging.INFO, logger=RETRY_LOG):
        retry_transient(fn, what="reading run R from the instance", deadline_seconds=60, sleep=t.sleep, clock=t.clock)

    lines = [r.getMessage() for r in caplog.records if r.name == RETRY_LOG]
    assert len(lines) == 3, lines
    assert "database unavailable reading run R from the instance (OperationalError: database is locked)" in lines[0]
    assert "Connection refused" in lines[1]
    assert lines[2].startswith("database back reading run R from the instance after ") and "7 attempts" in lines[2]


# -- classification without a server ----------------------------------------------------------


def test_dagster_postgres_connection_give_up_is_transient_through_its_cause():
    from dagster_postgres.utils import DagsterPostgresException

    refused = sqlalchemy.exc.OperationalError("connect", {}, ConnectionRefusedError("Connection refused"))
    try:
        try:
            raise refused
        except sqlalchemy.exc.OperationalError as exc:
            raise DagsterPostgresException("too many retries for DB connection") from exc
    except DagsterPostgresException as wrapped:
        assert is_transient_db_error(wrapped)
        assert "Connection refused" in describe_db_error(wrapped)


@pytest.mark.parametrize(
    "error, transient",
    [
        (sqlite3.OperationalError("database is locked"), True),
        (sqlite3.OperationalError("database table is locked"), True),
        # A filesystem failing: surfaced at once, not waited on (see db_retry's comment).
        (sqlite3.OperationalError("disk I/O error"), False),
        (sqlite3.OperationalError("no such table: runs"), False),
        (sqlite3.IntegrityError("UNIQUE constraint failed"), False),
        (sqlalchemy.exc.PendingRollbackError("Can't reconnect until invalid transaction is rolled back"), True),
        (sqlalchemy.exc.TimeoutError("QueuePool limit of size 1 overflow 10 reached"), True),
        (sqlalchemy.exc.IntegrityError("INSERT", {}, sqlite3.IntegrityError("UNIQUE constraint failed")), False),
        (sqlalchemy.exc.ProgrammingError("SELECT", {}, sqlite3.ProgrammingError("bad")), False),
        (ConnectionResetError("Connection reset by peer"), True),
        (KeyError("run_id"), False),
        (ValueError("database is locked"), False),  # not a database error, whatever it says
    ],
)
def test_classification(error, transient):
    assert is_transient_db_error(error) is transient


def test_an_unrelated_error_raised_while_handling_a_transient_one_is_not_transient():
    try:
        try:
            raise locked()
        except sqlite3.OperationalError:
            raise KeyError("step_key")  # the implicit __context__ is the point
    except KeyError as exc:
        assert exc.__context__ is not None
        assert not is_transient_db_error(exc)


# -- real PostgreSQL ----------------------------------------------------------------------------


@pytest.fixture
def pg_instance(pg_home):
    """A pooled Dagster instance on a fresh PostgreSQL database, as workers, step children and
    the orchestrator hold it (instance.pooled)."""
    with DagsterInstance.from_config(str(pg_home)) as instance:
        yield pooled(instance, InstanceOptions())


def test_errors_from_a_stopped_server_are_transient_and_a_unique_violation_is_not(pg, pg_home):
    import psycopg2

    db_name = yaml.safe_load(pg_home.joinpath("dagster.yaml").read_text())["storage"]["postgres"]["postgres_db"][
        "db_name"
    ]
    conn = psycopg2.connect(pg.dsn(db_name))
    conn.autocommit = True
    engine = sqlalchemy.create_engine(pg.url(db_name), pool_size=1)
    with engine.connect() as pooled_conn:  # leaves one connection in the pool
        pooled_conn.execute(sqlalchemy.text("SELECT 1"))

    pg.stop()
    errors = []
    with pytest.raises(psycopg2.Error) as on_open_session:
        conn.cursor().execute("SELECT 1")
    errors.append(on_open_session.value)
    with pytest.raises(psycopg2.Error) as on_connect:
        psycopg2.connect(pg.dsn(db_name), connect_timeout=5)
    errors.append(on_connect.value)
    with pytest.raises(sqlalchemy.exc.DBAPIError) as on_stale_pooled, engine.connect() as stale:
        stale.execute(sqlalchemy.text("SELECT 1"))
    errors.append(on_stale_pooled.value)
    assert on_stale_pooled.value.connection_invalidated
    pg.start()

    assert [is_transient_db_error(e) for e in errors] == [True, True, True], [describe_db_error(e) for e in errors]

    conn = psycopg2.connect(pg.dsn(db_name))
    conn.autocommit = True
    conn.cursor().execute("CREATE TABLE t (k text PRIMARY KEY)")
    conn.cursor().execute("INSERT INTO t VALUES ('a')")
    with pytest.raises(psycopg2.IntegrityError) as unique:
        conn.cursor().execute("INSERT INTO t VALUES ('a')")
    with engine.connect() as fresh, pytest.raises(sqlalchemy.exc.IntegrityError) as wrapped_unique:
        fresh.execute(sqlalchemy.text("INSERT INTO t VALUES ('a')"))
    with pytest.raises(psycopg2.ProgrammingError) as syntax:
        conn.cursor().execute("SELEC 1")
    assert unique.value.pgcode == "23505"
    assert not is_transient_db_error(unique.value)
    assert not is_transient_db_error(wrapped_unique.value)
    assert not is_transient_db_error(syntax.value)
    conn.close()
    engine.dispose()


def test_a_pooled_instance_raises_once_after_a_restart_then_reconnects(pg, pg_instance):
    """Dagster's behaviour this module covers: no pool_pre_ping, so the stale pooled connection
    fails the first statement after a restart; the next one connects afresh."""
    run = create_run_for_test(pg_instance)
    assert pg_instance.get_run_by_id(run.run_id) is not None  # a connection is now pooled

    pg.restart()

    with pytest.raises(Exception) as first:
        pg_instance.get_run_by_id(run.run_id)
    assert is_transient_db_error(first.value), describe_db_error(first.value)
    assert pg_instance.get_run_by_id(run.run_id).run_id == run.run_id


def test_retry_transient_rides_out_a_five_second_stop_of_the_server(pg, pg_instance):
    run = create_run_for_test(pg_instance)
    assert pg_instance.get_run_by_id(run.run_id) is not None
    retries = []

    pause = pg.pause(5)
    assert pause.stopped.wait(120)
    found = retry_transient(
        lambda: pg_instance.get_run_by_id(run.run_id),
        what=f"reading run {run.run_id} from the instance",
        deadline_seconds=120,
        on_retry=lambda exc, attempt, wait: retries.append(describe_db_error(exc)),
    )
    pause.wait()

    assert found is not None and found.run_id == run.run_id
    assert retries, "the read never met the outage"


def test_a_runs_step_records_are_deleted_at_its_end_right_after_a_restart(pg, pg_instance):
    """Found by bin/soak: a run whose execution ended just after a PostgreSQL restart left its
    step, queued and probe records behind ("could not delete the step records of run ...: server
    closed the connection unexpectedly"): the delete is a statement of its own, on a pooled
    connection the restart had closed, and was not retried."""
    from dagster_taskiq_sync._dagster.kv import kv_scan
    from dagster_taskiq_sync.storage.liveness import KEY_PREFIX, QUEUED, RUNNING, LivenessStore, StepRecord

    store = LivenessStore(pg_instance)
    task_ids = [f"run1-step{i}" for i in range(3)]
    for task_id in task_ids:
        store.write(task_id, StepRecord(RUNNING))
    store.write_queued({task_id: StepRecord(QUEUED) for task_id in task_ids})
    store.probe("run-1")
    assert len(kv_scan(pg_instance.run_storage, f"{KEY_PREFIX}/", 100)) == 7  # a connection is now pooled

    pg.restart()

    assert store.forget(task_ids, run_id="run-1", outage_timeout=60) == 7
    assert kv_scan(pg_instance.run_storage, f"{KEY_PREFIX}/", 100) == []


def engine_events(instance, run_id, message):
    return [
        r
        for r in instance.get_records_for_run(run_id, of_type=DagsterEventType.ENGINE_EVENT).records
        if r.event_log_entry.message == message
    ]


def test_an_event_written_while_the_server_is_stopped_is_stored_once_after_it_restarts(pg, pg_instance, caplog):
    install_event_write_retry(pg_instance, deadline_seconds=120)
    run = create_run_for_test(pg_instance)
    pg_instance.report_engine_event("before the outage", run)  # pools a connection
    errors: list[BaseException] = []

    def write() -> None:
        try:
            pg_instance.report_engine_event("written during the outage", run)
        except BaseException as exc:
            errors.append(exc)

    pg.stop()
    with caplog.at_level(logging.WARNING, logger=RETRY_LOG):
        writer = threading.Thread(target=write)
        writer.start()
        time.sleep(5)  # the outage; no assertion depends on its length
        pg.start()
        writer.join(180)

    assert not writer.is_alive() and errors == []
    assert len(engine_events(pg_instance, run.run_id, "written during the outage")) == 1
    assert any(
        f"database unavailable writing event ENGINE_EVENT of run {run.run_id} (" in r.getMessage()
        for r in caplog.records
    ), "the write never met the outage"


class KillSessionBefore:
    """Kills the session of the next statement starting with ``prefix`` just before it runs, from
    another connection (as a failover or pg_terminate_backend does): whatever that session
    committed before stays committed, the statement itself fails."""

    def __init__(self, pg, engine, prefix: str) -> None:
        self.pg, self.prefix, self.fired = pg, prefix, 0
        sqlalchemy.event.listen(engine, "before_cursor_execute", self)

    def __call__(self, conn, cursor, statement, parameters, context, executemany) -> None:
        if self.fired or not statement.lstrip().upper().startswith(self.prefix):
            return
        self.fired += 1
        pid = cursor.connection.get_backend_pid()
        self.pg.psql(f"SELECT pg_terminate_backend({pid})")


def test_with_reads_installed_the_orchestrators_event_polling_rides_out_a_restart(pg, pg_instance):
    # Without it, the first poll after a restart fails on the stale pooled connection and
    # StepDelegatingExecutor ends the run ("Unexpected exception while steps were still in-progress").
    install_event_write_retry(pg_instance, deadline_seconds=120, reads=True)
    install_event_write_retry(pg_instance, deadline_seconds=120, reads=True)  # idempotent
    run = create_run_for_test(pg_instance)
    pg_instance.report_engine_event("before the restart", run)
    assert len(pg_instance.get_records_for_run(run.run_id).records) == 1  # a connection is now pooled

    pg.restart()

    assert len(pg_instance.get_records_for_run(run.run_id).records) == 1
    wrapped = pg_instance.event_log_storage.get_records_for_run
    assert not hasattr(wrapped.__wrapped__, "__wrapped__"), "installed twice"


def test_an_event_whose_insert_committed_before_the_connection_died_is_not_stored_again(pg, pg_instance):
    # PostgresEventLogStorage.store_event runs INSERT ... RETURNING (autocommit) and then NOTIFY
    # on the same connection: killing the session between the two leaves the event stored and
    # store_event raising. A blind retry would store it twice.
    install_event_write_retry(pg_instance, deadline_seconds=120)
    run = create_run_for_test(pg_instance)
    kill = KillSessionBefore(pg, pg_instance.event_log_storage._engine, "NOTIFY")

    pg_instance.report_engine_event("committed, then the session died", run)

    assert kill.fired == 1
    assert len(engine_events(pg_instance, run.run_id, "committed, then the session died")) == 1


def test_an_asset_event_whose_insert_committed_gets_its_asset_index_written_once(pg, pg_instance):
    install_event_write_retry(pg_instance, deadline_seconds=120)
    run = create_run_for_test(pg_instance)
    asset_key = AssetKey(["db_faults", uuid.uuid4().hex[:8]])
    event = DagsterEvent(
        event_type_value=DagsterEventType.ASSET_MATERIALIZATION.value,
        job_name=run.job_name,
        event_specific_data=StepMaterializationData(AssetMaterialization(asset_key=asset_key)),
    )
    kill = KillSessionBefore(pg, pg_instance.event_log_storage._engine, "NOTIFY")

    pg_instance.report_dagster_event(event, run.run_id)

    assert kill.fired == 1
    records = pg_instance.get_records_for_run(run.run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION).records
    assert len(records) == 1
    latest = pg_instance.get_latest_materialization_event(asset_key)
    assert latest is not None and latest.run_id == run.run_id


# -- a locked sqlite ----------------------------------------------------------------------------


@pytest.fixture
def sqlite_instance(tmp_path):
    home = tmp_path / "sqlite_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    with DagsterInstance.from_config(str(home)) as instance:
        yield instance


@pytest.fixture
def short_busy_timeout(monkeypatch):
    """sqlite's busy timeout cut from Dagster's 30 s to 0.5 s, so a lock held for a few seconds
    outlasts it (as a long one outlasts 30 s) and reaches the retry."""
    from dagster._core.storage.event_log.sqlite import sqlite_event_log

    # Every Dagster minor builds its shard engines through this module's create_engine (1.13
    # passes a timeout of 30 s, 1.11 / 1.12 leave pysqlite's 5 s): override it there.
    real_create_engine = sqlite_event_log.create_engine

    def create_engine(*args, **kwargs):
        kwargs["connect_args"] = {**kwargs.get("connect_args", {}), "timeout": 0.5}
        return real_create_engine(*args, **kwargs)

    monkeypatch.setattr(sqlite_event_log, "create_engine", create_engine)


class HeldWriteLock:
    """Another connection holding sqlite's write lock (``BEGIN IMMEDIATE``) on a database file
    until ``release()``."""

    def __init__(self, path: str) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute("BEGIN IMMEDIATE")

    def release(self) -> None:
        self.conn.execute("ROLLBACK")
        self.conn.close()


def index_mirrors(storage, run_id, event_type) -> int:
    """How many copies of ``run_id``'s ``event_type`` events sqlite's index shard holds."""
    with sqlite3.connect(storage.path_for_shard("index")) as index:
        return index.execute(
            "SELECT count(*) FROM event_logs WHERE run_id = ? AND dagster_event_type = ?",
            (run_id, event_type.value),
        ).fetchone()[0]


def index_asset_tags(storage, asset_key) -> int:
    """How many asset-event tag rows sqlite's index shard holds for ``asset_key``."""
    with sqlite3.connect(storage.path_for_shard("index")) as index:
        return index.execute(
            "SELECT count(*) FROM asset_event_tags WHERE asset_key = ?", (asset_key.to_string(),)
        ).fetchone()[0]


def write_in_thread(fn):
    errors: list[BaseException] = []

    def target():
        try:
            fn()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    return thread, errors


@pytest.mark.compat
def test_an_event_written_while_sqlite_is_locked_past_its_busy_timeout_is_stored_once(
    sqlite_instance, short_busy_timeout, caplog
):
    install_event_write_retry(sqlite_instance, deadline_seconds=120)
    run = create_run_for_test(sqlite_instance)
    sqlite_instance.report_engine_event("before the lock", run)  # creates the run's shard
    lock = HeldWriteLock(sqlite_instance.event_log_storage.path_for_shard(run.run_id))

    with caplog.at_level(logging.WARNING, logger=RETRY_LOG):
        writer, errors = write_in_thread(lambda: sqlite_instance.report_engine_event("written while locked", run))
        time.sleep(4)  # the lock; no assertion depends on its length
        lock.release()
        writer.join(180)

    assert not writer.is_alive() and errors == []
    assert len(engine_events(sqlite_instance, run.run_id, "written while locked")) == 1
    assert any("database is locked" in r.getMessage() for r in caplog.records), "the write never met the lock"


def test_with_dagsters_own_busy_timeout_a_short_lock_is_simply_waited_out(sqlite_instance):
    install_event_write_retry(sqlite_instance, deadline_seconds=120)
    run = create_run_for_test(sqlite_instance)
    sqlite_instance.report_engine_event("before the lock", run)
    lock = HeldWriteLock(sqlite_instance.event_log_storage.path_for_shard(run.run_id))

    writer, errors = write_in_thread(lambda: sqlite_instance.report_engine_event("written while locked", run))
    time.sleep(3)
    lock.release()
    writer.join(180)

    assert not writer.is_alive() and errors == []
    assert len(engine_events(sqlite_instance, run.run_id, "written while locked")) == 1


@pytest.mark.compat
def test_a_run_event_whose_index_mirror_is_locked_is_stored_once_in_each_shard(sqlite_instance, short_busy_timeout):
    # SqliteEventLogStorage writes a run-status event to the run's shard, then mirrors it into
    # index.db: with index.db locked the first write commits and the second fails. A blind
    # retry would store the event twice in the run's shard.
    install_event_write_retry(sqlite_instance, deadline_seconds=120)
    run = create_run_for_test(sqlite_instance)
    sqlite_instance.report_engine_event("before the lock", run)
    storage = sqlite_instance.event_log_storage
    lock = HeldWriteLock(storage.path_for_shard("index"))
    start = DagsterEvent(event_type_value=DagsterEventType.RUN_START.value, job_name=run.job_name)

    writer, errors = write_in_thread(lambda: sqlite_instance.report_dagster_event(start, run.run_id))
    time.sleep(3)
    lock.release()
    writer.join(180)

    assert not writer.is_alive() and errors == []
    assert len(sqlite_instance.get_records_for_run(run.run_id, of_type=DagsterEventType.RUN_START).records) == 1
    assert index_mirrors(storage, run.run_id, DagsterEventType.RUN_START) == 1


@pytest.mark.compat
def test_an_asset_event_whose_index_mirror_is_locked_gets_its_mirror_and_asset_row_once(
    sqlite_instance, short_busy_timeout
):
    # The asset path of SqliteEventLogStorage.store_event: run shard, then the index mirror, the
    # asset row and its tags (one transaction on dagster 1.13, two calls on 1.11 / 1.12).
    install_event_write_retry(sqlite_instance, deadline_seconds=120)
    run = create_run_for_test(sqlite_instance)
    sqlite_instance.report_engine_event("before the lock", run)
    storage = sqlite_instance.event_log_storage
    asset_key = AssetKey(["db_faults", uuid.uuid4().hex[:8]])
    event = DagsterEvent(
        event_type_value=DagsterEventType.ASSET_MATERIALIZATION.value,
        job_name=run.job_name,
        event_specific_data=StepMaterializationData(
            AssetMaterialization(asset_key=asset_key, tags={"dagster/data_version": "v1"})
        ),
    )
    lock = HeldWriteLock(storage.path_for_shard("index"))

    writer, errors = write_in_thread(lambda: sqlite_instance.report_dagster_event(event, run.run_id))
    time.sleep(2)
    lock.release()
    writer.join(180)

    assert not writer.is_alive() and errors == []
    records = sqlite_instance.get_records_for_run(run.run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION).records
    assert len(records) == 1
    assert index_mirrors(storage, run.run_id, DagsterEventType.ASSET_MATERIALIZATION) == 1
    latest = sqlite_instance.get_latest_materialization_event(asset_key)
    assert latest is not None and latest.run_id == run.run_id
    assert index_asset_tags(storage, asset_key) == 1

    # A second resume of the same write (its first attempt finished everything) adds nothing.
    finish_stored_event(storage, records[0].event_log_entry, records[0].storage_id)
    assert index_mirrors(storage, run.run_id, DagsterEventType.ASSET_MATERIALIZATION) == 1
    assert index_asset_tags(storage, asset_key) == 1


# -- a whole run through an outage ----------------------------------------------------------------


def test_an_in_process_run_rides_out_an_eight_second_stop_with_every_event_stored_once(pg, pg_instance, caplog):
    # Dagster's own run path (step events, run status, run reads) on one installed instance: the
    # path a step child and the orchestrator take, without the queue.
    from dagster import execute_job, reconstructable

    from ..db_fault_jobs import SLOW_STEPS, slow_chain
    from ..helpers import wait_for

    install_event_write_retry(pg_instance, deadline_seconds=120, reads=True)
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = execute_job(reconstructable(slow_chain), instance=pg_instance, raise_on_error=False)
        except BaseException as exc:
            outcome["error"] = exc

    with caplog.at_level(logging.WARNING, logger=RETRY_LOG):
        runner = threading.Thread(target=run)
        runner.start()
        run_id = wait_for(lambda: (pg_instance.get_runs(limit=1) or [None])[0], timeout=120, what="the run").run_id
        wait_for(
            lambda: pg_instance.get_records_for_run(run_id, of_type=DagsterEventType.STEP_SUCCESS).records,
            timeout=120,
            what="a first step to succeed",
        )
        pg.pause(8).wait()
        runner.join(300)

    assert not runner.is_alive() and "error" not in outcome, outcome
    assert outcome["result"].success
    records = pg_instance.get_records_for_run(run_id).records
    steps = ["start_value", *(step.name for step in SLOW_STEPS)]
    for event_type in (DagsterEventType.STEP_START, DagsterEventType.STEP_SUCCESS):
        assert sorted(
            r.event_log_entry.step_key for r in records if r.event_log_entry.dagster_event_type == event_type
        ) == sorted(steps), event_type
    timestamps = [r.event_log_entry.timestamp for r in records]
    assert len(timestamps) == len(set(timestamps)), "an event was stored twice"
    assert any(r.name == RETRY_LOG and "database unavailable" in r.getMessage() for r in caplog.records), (
        "the run never met the outage"
    )


# -- the orchestrator's run bell (storage/event_watch.py) --------------------------------------------


def rings_on_events(instance, bell, run, what: str, timeout: float = 30.0) -> None:
    """Store events of ``run`` until ``bell`` rings (a listener still connecting misses the first)."""

    def rung() -> bool:
        bell.clear()
        instance.report_engine_event("an event of the watched run", run)
        return bell._event.wait(0.5)

    wait_for(rung, timeout=timeout, interval=0, what=what)


def test_the_run_bell_rings_for_its_runs_events_on_postgresql_and_listens_again_after_a_restart(
    pg, pg_instance, caplog
):
    install_event_write_retry(pg_instance, deadline_seconds=60)  # the test's own writes, as an orchestrator's
    watched, other = create_run_for_test(pg_instance), create_run_for_test(pg_instance)
    with run_bell(pg_instance, watched.run_id) as bell:
        assert bell is not None
        rings_on_events(pg_instance, bell, watched, "the LISTEN connection to deliver a NOTIFY of the run")

        bell.clear()
        pg_instance.report_engine_event("another run's event", other)
        assert not bell._event.wait(0.5), "rung for another run's event"

        pg.restart()
        with caplog.at_level(logging.WARNING, logger="dagster_taskiq_sync.executor"):
            rings_on_events(pg_instance, bell, watched, "the listener to connect again after a restart", timeout=60)
    said = [r.getMessage() for r in caplog.records if "could not LISTEN" in r.getMessage()]
    assert len(said) == 1, said  # one line per outage, naming what the orchestrator does meanwhile
    assert "step_poll_interval" in said[0]


def test_the_run_bell_rings_for_its_runs_events_on_sqlite(sqlite_instance):
    watched, other = create_run_for_test(sqlite_instance), create_run_for_test(sqlite_instance)
    for run in (watched, other):  # each run's event-log file exists once its first event is written
        sqlite_instance.report_engine_event("first", run)
    with run_bell(sqlite_instance, watched.run_id) as bell:
        assert bell is not None
        rings_on_events(sqlite_instance, bell, watched, "the sqlite watch to see a commit to the run's file")

        bell.clear()
        sqlite_instance.report_engine_event("another run's event", other)
        assert not bell._event.wait(0.3), "rung for another run's event"
