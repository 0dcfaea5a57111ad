"""Jobs run through taskiq_executor on real worker processes and a real local SQS endpoint."""

from __future__ import annotations

import os

import pytest
from dagster import DagsterEventType, execute_job, reconstructable

from dagster_taskiq_sync.storage.run_report import step_reports

from .. import jobs

pytestmark = pytest.mark.compat  # the tier bin/matrix runs on every env


def run(job_fn, instance, executor_config, ops=None):
    run_config = {"execution": {"config": executor_config}}
    if ops:
        run_config["ops"] = ops
    return execute_job(reconstructable(job_fn), instance=instance, run_config=run_config, raise_on_error=False)


def events_of(instance, run_id, event_type):
    return [r for r in instance.all_logs(run_id) if r.dagster_event and r.dagster_event.event_type == event_type]


def test_diamond_runs_every_step_on_the_workers(workers, instance, executor_config):
    # Given two workers, when a diamond job runs through taskiq_executor
    with run(jobs.diamond, instance, executor_config) as result:
        combined = result.output_for_node("combine")

    # Then every step succeeded and outputs flowed downstream
    assert result.success
    assert (combined["a"], combined["b"]) == (2, 10)
    reports = step_reports(instance, result.run_id)
    assert {k: r.status for k, r in reports.items()} == {
        "emit_one": "SUCCESS",
        "add_one": "SUCCESS",
        "times_ten": "SUCCESS",
        "combine": "SUCCESS",
    }
    # and every step ran in a child of one of the workers, not in this (orchestrator) process
    worker_names = {w.full_name for w in workers}
    for rep in reports.values():
        assert rep.worker in worker_names
        assert rep.pid is not None and rep.pid != os.getpid()
    assert combined["pid"] != os.getpid()


def test_fan_out_fan_in_spreads_across_both_workers(workers, instance, executor_config):
    with run(jobs.fan_out_fan_in, instance, executor_config) as result:
        assert result.success
        assert result.output_for_node("total") == sum((1 + i) ** 2 for i in range(6))
    reports = step_reports(instance, result.run_id)
    assert len(reports) == 8 and all(r.status == "SUCCESS" for r in reports.values())
    # Six 0.4 s squares and two threads per worker: with prefetch = concurrency, one worker
    # cannot hold them all, so both must have run some.
    used = {reports[f"square_{i}"].worker for i in range(6)}
    assert used == {w.full_name for w in workers}
    # The squares ran side by side: some two of them overlapped in time.
    squares = [reports[f"square_{i}"] for i in range(6)]
    assert any(a.started < b.finished and b.started < a.finished for a in squares for b in squares if a is not b)


def test_failing_op_fails_the_run_with_its_message_and_skips_downstream(workers, instance, executor_config):
    result = run(jobs.failing, instance, executor_config, ops={"explode": {"config": {"message": "bad input 42"}}})

    assert not result.success
    failures = events_of(instance, result.run_id, DagsterEventType.STEP_FAILURE)
    assert [f.step_key for f in failures] == ["explode"]
    assert "bad input 42" in failures[0].dagster_event.step_failure_data.error.cause.message
    # Downstream never started: Dagster logs that it was not executed (no STEP_SKIPPED for a
    # failed dependency, as with every Dagster executor).
    logs = instance.all_logs(result.run_id)
    assert not [
        r
        for r in logs
        if r.step_key == "after_explode"
        and r.dagster_event
        and r.dagster_event.event_type == DagsterEventType.STEP_START
    ]
    assert any(r.step_key == "after_explode" and "failed: ['explode']. Not executing" in r.user_message for r in logs)
    assert instance.get_run_by_id(result.run_id).status.value == "FAILURE"


def test_retry_policy_reruns_a_flaky_op_once(workers, instance, executor_config, tmp_path):
    counter = tmp_path / "flaky-count"
    with run(
        jobs.retries, instance, executor_config, ops={"flaky": {"config": {"counter_file": str(counter)}}}
    ) as result:
        assert result.success
        assert result.output_for_node("after_flaky") == 200
    assert counter.read_text() == "2"  # user code ran exactly twice: the failure and the retry
    assert len(events_of(instance, result.run_id, DagsterEventType.STEP_UP_FOR_RETRY)) == 1
    assert len(events_of(instance, result.run_id, DagsterEventType.STEP_RESTARTED)) == 1
    assert step_reports(instance, result.run_id)["flaky"].attempts == 2
