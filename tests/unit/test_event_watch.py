"""The orchestrator's loop reads at once when its run's events change: the sqlite watch, the loop's
wait, and the re-read of events PostgreSQL committed out of order (storage/event_watch.py,
_dagster/execution.py). The PostgreSQL listener itself is in tests/faults/test_db_faults.py."""

from __future__ import annotations

import sqlite3
import time
from types import SimpleNamespace

from dagster_taskiq_sync._dagster import execution
from dagster_taskiq_sync.storage.event_watch import RunBell, _SqliteFiles


def _wal_file(path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")  # what Dagster's sqlite event log uses
    conn.execute("CREATE TABLE event_logs (id INTEGER PRIMARY KEY, event TEXT)")
    return conn


def test_the_sqlite_watch_names_the_runs_whose_file_another_connection_committed_to(tmp_path):
    writers = {run: _wal_file(tmp_path / f"{run}.db") for run in ("run-a", "run-b")}
    files = _SqliteFiles()
    files.paths = {run: str(tmp_path / f"{run}.db") for run in writers}
    try:
        assert files.changed({"run-a", "run-b"}) == set()  # first look: opens each file

        writers["run-a"].execute("INSERT INTO event_logs (event) VALUES ('STEP_SUCCESS')")
        assert files.changed({"run-a", "run-b"}) == {"run-a"}
        assert files.changed({"run-a", "run-b"}) == set()  # nothing new since

        writers["run-b"].execute("INSERT INTO event_logs (event) VALUES ('STEP_START')")
        writers["run-a"].execute("INSERT INTO event_logs (event) VALUES ('STEP_START')")
        assert files.changed({"run-b"}) == {"run-b"}  # run-a no longer watched: its file is closed
    finally:
        files.close()
        for conn in writers.values():
            conn.close()


def test_a_bell_rung_before_the_wait_cuts_it_short_and_a_cleared_one_waits_it_out():
    bell = RunBell()
    bell.ring()
    started = time.monotonic()
    bell.wait(30)
    assert time.monotonic() - started < 5

    bell.clear()
    started = time.monotonic()
    bell.wait(0.05)
    assert time.monotonic() - started >= 0.05


def test_dagsters_loop_waits_on_the_bell_only_where_taskiq_executor_set_it():
    from dagster._core.executor.step_delegating import step_delegating_executor as sde

    execution.install_step_sort_key()
    waits: list[float] = []
    token = execution.loop_wait.set(waits.append)
    try:
        sde.time.sleep(30)  # would hang the test were it time.sleep
    finally:
        execution.loop_wait.reset(token)
    assert waits == [30]

    sde.time.sleep(0)  # no executor of ours here: time.sleep, nothing recorded
    assert waits == [30]
    assert sde.time.monotonic is time.monotonic  # the rest of the module is time's


class _Log:
    """A run's event log as get_records_for_run answers it: records by storage id, in id order."""

    def __init__(self) -> None:
        self.committed: dict[int, str] = {}
        self.reads: list[int] = []

    def get_records_for_run(self, run_id, cursor, of_type, limit):
        after = execution.EventLogCursor.parse(cursor).storage_id()
        self.reads.append(after)
        ids = sorted(i for i in self.committed if i > after)[:limit]
        records = [
            SimpleNamespace(storage_id=i, event_log_entry=SimpleNamespace(dagster_event=self.committed[i])) for i in ids
        ]
        return SimpleNamespace(records=records, has_more=False, cursor=None)


def test_an_event_committed_after_later_ones_were_read_reaches_the_loop_at_the_next_check():
    clock = SimpleNamespace(now=0.0)
    late = execution.LateCommits(every=1.0, clock=lambda: clock.now)
    log = _Log()
    # Ids 1-3 were read by the loop; 2 was still being committed then (PostgreSQL hands ids out first).
    log.committed = {1: "STEP_START a", 3: "STEP_START b"}
    seen = {1, 3}
    assert late.check(log, "run", 3, seen) == []  # not time yet: no read
    assert log.reads == []

    log.committed[2] = "STEP_SUCCESS a"
    log.committed[4] = "STEP_SUCCESS b"  # after the cursor: the loop's own next read takes it
    clock.now = 1.0
    assert late.check(log, "run", 3, seen) == ["STEP_SUCCESS a"]
    assert 2 in seen and 4 not in seen
    assert late.found == 1

    clock.now = 2.0
    seen.add(4)
    assert late.check(log, "run", 4, seen) == []  # found once, never again
    clock.now = 3.0
    late.check(log, "run", 6, seen)
    assert log.reads == [0, 0, 3]  # each check reads from where the cursor was two checks before


class _Clock:
    """The executor module's ``time``: sleeping advances the clock, nothing waits."""

    def __init__(self) -> None:
        self.now, self.sleeps = 100.0, []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(round(seconds, 6))
        self.now += seconds


class _Bell:
    def __init__(self) -> None:
        self.waits: list[float] = []

    def wait(self, seconds: float) -> None:
        self.waits.append(round(seconds, 6))


def test_the_loop_reads_a_lone_steps_end_at_once_and_several_steps_events_at_most_twice_per_interval(monkeypatch):
    from dagster_taskiq_sync._dagster.names import RetryMode
    from dagster_taskiq_sync.orchestrator import executor as module
    from dagster_taskiq_sync.wire.settings import Settings

    clock = _Clock()
    monkeypatch.setattr(module, "time", clock)
    loop = module.TaskiqExecutor(Settings(), retries=RetryMode.DISABLED)
    loop._bell, loop._read_at = _Bell(), clock.now - 0.002  # its last read began 2 ms ago

    loop._taskiq_handler._in_flight = {"step_1": "id-1"}  # a chain: the bell alone decides
    loop._wait(0.02)
    assert clock.sleeps == [] and loop._bell.waits == [0.02]

    loop._taskiq_handler._in_flight = {f"branch_{i}": f"id-{i}" for i in range(4)}  # a fan-out
    loop._wait(0.02)
    assert clock.sleeps == [0.008]  # not before half the interval after the last read...
    assert loop._bell.waits == [0.02, 0.012]  # ...then the bell, within the same 20 ms in all

    loop._bell = None  # an instance that cannot tell: Dagster's own sleep
    loop._wait(0.02)
    assert clock.sleeps == [0.008, 0.02]
