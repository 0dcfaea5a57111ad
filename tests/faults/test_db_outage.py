"""The instance's database goes away in the middle of a fan-out, workers and orchestrator on it.

A database blip must never dead-letter a genuine step or fail a run: the worker keeps the message
(extending its visibility) and retries; step children and the orchestrator ride out the outage in
their instance reads and writes (``db_retry.py``). Each step's user code runs exactly once.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time

import pytest
import yaml
from dagster import DagsterInstance

from .. import jobs
from ..helpers import BackgroundRun, WorkerProcess, marker_lines, queue_counts, run_cli, wait_for

LEAVES = [f"counted_{i}" for i in range(10)]


def outage_config(endpoint, tmp_path, queue: str) -> tuple[dict, object]:
    config = {
        "broker": endpoint.broker_url,
        "health_check_interval": 1,
        "worker_lost_timeout": 10,
        "config_source": {
            "task_default_queue": queue,
            "broker_transport_options": {"wait_time_seconds": 1, "visibility_timeout": 5},
        },
    }
    path = tmp_path / f"{queue}.yaml"
    path.write_text(yaml.safe_dump({"execution": {"config": config}}))
    out = run_cli("queues", "create", "-y", str(path), "--max-receive-count", "3")
    assert out.returncode == 0, out.stderr
    return config, path


def fanout_run(instance, config, markers, sleep: float) -> BackgroundRun:
    ops = {name: {"config": {"marker_dir": str(markers), "sleep": sleep}} for name in LEAVES}
    return BackgroundRun(jobs.counted_fanout, instance, {"execution": {"config": config}, "ops": ops})


def assert_each_step_ran_once(markers) -> None:
    for name in LEAVES:
        assert [line.split()[0] for line in marker_lines(markers, name)] == ["start", "end"], name


@pytest.mark.slow
def test_a_postgres_restart_mid_fanout_fails_nothing_and_runs_each_step_once(endpoint, pg, tmp_path):
    # Given a PostgreSQL instance shared by the orchestrator (this process) and two workers
    home = tmp_path / "pg_home"
    pg.write_dagster_yaml(home)
    config, path = outage_config(endpoint, tmp_path, "pg_outage")
    markers = tmp_path / "markers"
    markers.mkdir()
    env = os.environ | {"DAGSTER_HOME": str(home)}
    workers = [
        WorkerProcess(
            path, f"pg-{i}", tmp_path, ["-q", "pg_outage", "-c", "2", "--heartbeat-interval", "1"], env=env
        ).wait_ready()
        for i in (1, 2)
    ]
    try:
        with DagsterInstance.from_config(str(home)) as instance:
            run = fanout_run(instance, config, markers, sleep=2)
            wait_for(
                lambda: sum(bool(marker_lines(markers, n)) for n in LEAVES) >= 2,
                timeout=120,
                what="the fan-out to be under way",
            )
            # When the database stops for 15 s in the middle of it, and comes back
            pg.pause(15).wait()
            # Then the run succeeds, each step's user code ran once, and nothing was dead-lettered
            result = run.wait(300)
            assert result.success, [w.log()[-2000:] for w in workers]
            assert_each_step_ran_once(markers)
            wait_for(lambda: queue_counts(endpoint.url, "pg_outage") == (0, 0), timeout=30, what="the queue to drain")
            assert queue_counts(endpoint.url, "pg_outage-dlq") == (0, 0)
        logs = "".join(w.log() for w in workers)
        assert "can never run" not in logs
    finally:
        for worker in workers:
            assert worker.stop() == 0


@pytest.mark.slow
def test_a_locked_sqlite_instance_mid_fanout_fails_nothing(endpoint, tmp_path):
    home = tmp_path / "sqlite_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    config, path = outage_config(endpoint, tmp_path, "sqlite_lock")
    markers = tmp_path / "markers"
    markers.mkdir()
    env = os.environ | {"DAGSTER_HOME": str(home)}
    workers = [
        WorkerProcess(path, f"lock-{i}", tmp_path, ["-q", "sqlite_lock", "-c", "2"], env=env).wait_ready()
        for i in (1, 2)
    ]
    try:
        with DagsterInstance.from_config(str(home)) as instance:
            run = fanout_run(instance, config, markers, sleep=1)
            run_id = run.run_id()
            wait_for(
                lambda: sum(bool(marker_lines(markers, n)) for n in LEAVES) >= 2,
                timeout=120,
                what="the fan-out to be under way",
            )
            # When another process holds write locks on the run's event log and the run index for 15 s
            locks = []
            for db in (home / "history" / "runs" / f"{run_id}.db", home / "history" / "runs.db"):
                conn = sqlite3.connect(str(db), timeout=30, isolation_level=None, check_same_thread=False)
                conn.execute("BEGIN IMMEDIATE")
                locks.append(conn)
            released = threading.Event()

            def release():
                time.sleep(15)
                for conn in locks:
                    conn.execute("ROLLBACK")
                    conn.close()
                released.set()

            threading.Thread(target=release, daemon=True).start()
            result = run.wait(300)
            assert released.is_set()
            assert result.success
            assert_each_step_ran_once(markers)
            wait_for(lambda: queue_counts(endpoint.url, "sqlite_lock") == (0, 0), timeout=30, what="the queue to drain")
            assert queue_counts(endpoint.url, "sqlite_lock-dlq") == (0, 0)
    finally:
        for worker in workers:
            assert worker.stop() == 0
