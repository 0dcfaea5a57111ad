"""Faults that overlap and workers on several queues, the way operators run them.

* a worker on two queues never starves one of them; backlogs on three queues drain interleaved;
* a message dead-lettered (by a worker, or by SQS's redrive policy) fails its step promptly in the
  orchestrator, naming the step, the queue, the dead-letter queue and the reason;
* a step sent while a worker shuts down is picked up by another worker at once, not after the
  stopping worker's abandoned poll hid it for a visibility timeout;
* the instance holds no per-step-attempt records once runs end.

Bounds are generous (a loaded 2-core machine), but each would fail under the defect it pins.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from dagster import DagsterEventType, execute_job, reconstructable

from dagster_taskiq_sync.storage.liveness import KEY_PREFIX

from .. import jobs
from ..helpers import CLI, BackgroundRun, WorkerProcess, make_config, marker_lines, queue_counts, wait_for

ROOT = Path(__file__).resolve().parents[2]
LONG_POLL = 20  # SQS's longest: a starved queue would wait forever, a fair one at most half of this


def queue_waits(instance, run_id) -> dict[str, float]:
    """Seconds each step waited between being sent and a worker receiving it."""
    sent, received = {}, {}
    for record in instance.all_logs(run_id):
        event = record.dagster_event
        if event is None:
            continue
        if event.event_type == DagsterEventType.STEP_WORKER_STARTING:
            sent[event.step_key] = record.timestamp
        elif event.event_type == DagsterEventType.STEP_WORKER_STARTED:
            meta = event.event_specific_data.metadata
            if "received_at" in meta:
                received[event.step_key] = float(meta["received_at"].value)
    return {key: received[key] - sent[key] for key in received}


def test_a_worker_on_two_queues_serves_the_idle_one_within_one_long_poll(endpoint, instance, tmp_path):
    # Given one worker with one slot on fair_a and fair_b, long-polling 20 s
    config, path = make_config(endpoint, tmp_path, "fair_a", "fair_b", transport={"wait_time_seconds": LONG_POLL})
    worker = WorkerProcess(path, "two-queues", tmp_path, ["-q", "fair_a", "-q", "fair_b", "-c", "1"]).wait_ready()
    try:
        # When a run's middle step is routed to fair_b while fair_a is idle
        result = BackgroundRun(jobs.across_two_queues, instance, {"execution": {"config": config}}).wait(180)
        # Then every step ran, each picked up within one long poll of being sent
        assert result.success
        waits = queue_waits(instance, result.run_id)
        assert set(waits) == {"first_on_a", "middle_on_b", "last_on_a"}
        assert max(waits.values()) < LONG_POLL, waits
    finally:
        assert worker.stop(timeout=60) == 0


def test_backlogs_on_three_queues_drain_interleaved(endpoint, instance, dagster_home, tmp_path):
    _config, path = make_config(endpoint, tmp_path, "fair_q1", "fair_q2", "fair_q3")
    # Three orchestrators at once, as three `dagster job execute` processes (Dagster's logging set-up
    # is not safe for concurrent runs in one process's threads).
    runs = [
        subprocess.Popen(
            [
                str(Path(CLI).parent / "dagster"),
                "job",
                "execute",
                "-f",
                str(ROOT / "tests" / "jobs.py"),
                "-j",
                job,
                "-c",
                str(path),
            ],
            cwd=ROOT,
            env=os.environ | {"DAGSTER_HOME": str(dagster_home)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for job in ("backlog_q1", "backlog_q2", "backlog_q3")
    ]
    try:
        for queue in ("fair_q1", "fair_q2", "fair_q3"):
            wait_for(
                lambda q=queue: queue_counts(endpoint.url, q)[0] == 4, timeout=90, what=f"a backlog of 4 on {queue}"
            )
        worker = WorkerProcess(
            path, "three-queues", tmp_path, ["-q", "fair_q1", "-q", "fair_q2", "-q", "fair_q3", "-c", "1"]
        ).wait_ready()
        try:
            assert [run.wait(180) for run in runs] == [0, 0, 0]
        finally:
            assert worker.stop() == 0
    finally:
        for run in runs:
            if run.poll() is None:
                run.kill()
    run_ids = [
        next(r.run_id for r in instance.get_runs() if r.job_name == job)
        for job in ("backlog_q1", "backlog_q2", "backlog_q3")
    ]
    starts = sorted(
        (record.timestamp, record.step_key.split("_step_")[0])
        for run_id in run_ids
        for record in instance.all_logs(run_id)
        if record.dagster_event and record.dagster_event.event_type == DagsterEventType.STEP_START
    )
    order = [queue for _, queue in starts]
    assert len(order) == 12
    # taken in turns: every queue twice among the first six, never one queue's whole backlog first
    assert sorted(order[:6]) == ["fair_q1", "fair_q1", "fair_q2", "fair_q2", "fair_q3", "fair_q3"], order


def test_a_step_a_worker_dead_letters_fails_promptly_naming_queue_dlq_and_reason(
    endpoint, instance, tmp_path, monkeypatch
):
    # Given a job whose code only the orchestrator has (the worker cannot load it)
    config, path = make_config(endpoint, tmp_path, "dl_fast", health_check_interval=1)
    worker_env = {k: v for k, v in os.environ.items() if k != "DTS_TEST_ORCHESTRATOR"}
    worker = WorkerProcess(path, "dl-fast", tmp_path, ["-q", "dl_fast", "-c", "1"], env=worker_env).wait_ready()
    monkeypatch.setenv("DTS_TEST_ORCHESTRATOR", "1")
    from .. import orchestrator_only_jobs

    try:
        # When it runs
        started = time.monotonic()
        result = execute_job(
            reconstructable(orchestrator_only_jobs.orchestrator_only),
            instance=instance,
            run_config={"execution": {"config": config}},
            raise_on_error=False,
        )
        # Then the step fails within seconds, not after a timeout, and says where its message went and why
        assert not result.success and time.monotonic() - started < 60
        [failure] = [
            r
            for r in instance.all_logs(result.run_id)
            if r.dagster_event and r.dagster_event.event_type == DagsterEventType.STEP_FAILURE
        ]
        message = failure.dagster_event.step_failure_data.error.message
        assert "step only_here can never run" in message
        assert "SQS queue 'dl_fast'" in message and "dead-letter queue 'dl_fast-dlq'" in message
        assert "its job could not be loaded on the worker" in message
        assert queue_counts(endpoint.url, "dl_fast-dlq")[0] == 1
        assert worker.proc.poll() is None
    finally:
        assert worker.stop() == 0


@pytest.mark.slow
def test_a_step_sqs_dead_letters_after_its_last_receive_fails_the_run(endpoint, instance, tmp_path):
    # Given a queue that dead-letters after one receive, and a worker with one slot holding a second step
    config, path = make_config(
        endpoint,
        tmp_path,
        "dl_redrive",
        max_receive_count=1,
        health_check_interval=1,
        transport={"visibility_timeout": 2},
    )
    config["config_source"]["worker_prefetch_multiplier"] = 2
    path.write_text(yaml.safe_dump({"execution": {"config": config}}))
    markers = tmp_path / "markers"
    markers.mkdir()
    first = WorkerProcess(path, "holder", tmp_path, ["-q", "dl_redrive", "-c", "1"]).wait_ready()
    ops = {name: {"config": {"marker_dir": str(markers), "sleep": 4}} for name in ("sleeper_a", "sleeper_b")}
    run = BackgroundRun(jobs.two_sleepers, instance, {"execution": {"config": config}, "ops": ops})
    wait_for(
        lambda: queue_counts(endpoint.url, "dl_redrive") == (0, 2), timeout=60, what="the worker to hold both steps"
    )
    # (one of them running: on a loaded machine its step child may still be starting, and a step
    # that has not started is released too, which is a different test)
    wait_for(
        lambda: any(marker_lines(markers, name) for name in ("sleeper_a", "sleeper_b")),
        timeout=60,
        what="one step to start",
    )
    # When that worker stops: it releases the step it held at its last allowed receive
    first.proc.send_signal(signal.SIGTERM)
    assert first.proc.wait(60) == 0
    assert "releasing message" in first.log()
    # and the next receive (another worker) makes SQS move it to the dead-letter queue
    second = WorkerProcess(path, "next", tmp_path, ["-q", "dl_redrive", "-c", "1"]).wait_ready()
    try:
        result = run.wait(120)
        # Then the run fails on that step, saying SQS dead-lettered it, instead of waiting forever
        assert not result.success
        failures = [
            r
            for r in instance.all_logs(result.run_id)
            if r.dagster_event and r.dagster_event.event_type == DagsterEventType.STEP_FAILURE
        ]
        assert len(failures) == 1
        message = failures[0].dagster_event.step_failure_data.error.message
        assert "was dead-lettered" in message and "maxReceiveCount 1" in message and "dl_redrive-dlq" in message
        assert queue_counts(endpoint.url, "dl_redrive-dlq")[0] == 1
        ran = [name for name in ("sleeper_a", "sleeper_b") if marker_lines(markers, name)]
        assert len(ran) == 1  # the other never ran anywhere
    finally:
        assert second.stop() == 0


def test_a_step_sent_while_a_worker_stops_is_not_hidden_by_its_last_poll(endpoint, instance, tmp_path):
    # Given a worker long-polling an empty queue whose visibility timeout is 60 s
    config, path = make_config(
        endpoint, tmp_path, "rolling", transport={"wait_time_seconds": 10, "visibility_timeout": 60}
    )
    leaving = WorkerProcess(path, "leaving", tmp_path, ["-q", "rolling", "-c", "1"]).wait_ready()
    time.sleep(1.5)  # its long poll is in flight
    # When it is told to stop and a step is sent at that moment (a rolling restart)
    leaving.proc.send_signal(signal.SIGTERM)
    result_run = BackgroundRun(jobs.diamond, instance, {"execution": {"config": config}})
    arriving = WorkerProcess(path, "arriving", tmp_path, ["-q", "rolling", "-c", "2"]).wait_ready()
    try:
        result = result_run.wait(120)
        assert leaving.proc.wait(60) == 0
        # Then the run did not wait out the visibility timeout for a message the leaving worker took
        assert result.success
        waits = queue_waits(instance, result.run_id)
        assert max(waits.values()) < 60, waits
    finally:
        assert arriving.stop() == 0


def test_finished_runs_leave_no_per_step_records(workers, instance, executor_config):
    # Given two runs of 100 steps each (200 step attempts)
    run_prefixes = set()
    for _ in range(2):
        with execute_job(
            reconstructable(jobs.fan_100), instance=instance, run_config={"execution": {"config": executor_config}}
        ) as result:
            assert result.success
            run_prefixes.add(result.run_id[:8])
    # Then the instance holds none of their liveness records, only the worker registry
    from dagster._core.storage.runs.schema import KeyValueStoreTable

    with instance.run_storage.connect() as conn:
        keys = [
            row[0]
            for row in conn.execute(
                KeyValueStoreTable.select()
                .with_only_columns(KeyValueStoreTable.c.key)
                .where(KeyValueStoreTable.c.key.like(f"{KEY_PREFIX}/%"))
            )
        ]
    per_attempt = [
        k
        for k in keys
        if k.split("/")[1] in ("step", "queued", "cancel", "claim") and k.split("/")[2][:8] in run_prefixes
    ]
    assert per_attempt == []  # 0 rows for 200 attempts (they were 400 before compaction)
    assert all(
        k.split("/")[1] in ("worker", "workers", "worker-control", "step", "queued", "cancel", "claim") for k in keys
    )
