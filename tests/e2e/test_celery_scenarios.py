"""dagster-celery's own execution tests, ported to taskiq_executor with real workers.

Each test runs the dagster-celery job of the same name and asserts the same outputs and typed
event counts (dagster-celery's `all_node_events` totals are not compared: worker-start and
log-capture events differ between engines by design).
"""

from __future__ import annotations

import time

import pytest
import yaml
from dagster import execute_job, reconstructable

from .. import celery_jobs as cj
from ..helpers import BackgroundRun, WorkerProcess, queue_counts, run_cli, wait_for

EAGER = {"config_source": {"task_always_eager": True}}


def run(job_fn, instance, executor_config, op_selection=None):
    return execute_job(
        reconstructable(job_fn),
        instance=instance,
        op_selection=op_selection,
        run_config={"execution": {"config": executor_config}},
        raise_on_error=False,
    )


def count(result, event_type: str) -> int:
    return len([e for e in result.all_events if e.event_type_value == event_type])


@pytest.fixture(params=["workers", "eager"])
def engine(request, executor_config):
    """Every scenario runs on SQS workers and in Celery's eager mode (task_always_eager)."""
    if request.param == "workers":
        request.getfixturevalue("workers")
        return executor_config
    return EAGER


@pytest.mark.compat  # on workers and eager: the tier bin/matrix runs on every env
def test_execute_default(engine, instance):
    with run(cj.test_job, instance, engine) as result:
        assert result.output_for_node("simple") == 1
        assert (
            count(result, "STEP_START"),
            count(result, "STEP_OUTPUT"),
            count(result, "HANDLED_OUTPUT"),
            count(result, "STEP_SUCCESS"),
        ) == (1, 1, 1, 1)


@pytest.mark.compat  # on workers and eager: the tier bin/matrix runs on every env
def test_execute_serial(engine, instance):
    with run(cj.test_serial_job, instance, engine) as result:
        assert result.output_for_node("simple") == 1
        assert result.output_for_node("add_one") == 2
        assert (
            count(result, "STEP_START"),
            count(result, "STEP_INPUT"),
            count(result, "STEP_OUTPUT"),
            count(result, "HANDLED_OUTPUT"),
            count(result, "LOADED_INPUT"),
            count(result, "STEP_SUCCESS"),
        ) == (2, 1, 2, 2, 1, 2)


@pytest.mark.compat  # on workers and eager: the tier bin/matrix runs on every env
def test_execute_diamond(engine, instance):
    with run(cj.test_diamond_job, instance, engine) as result:
        assert result.output_for_node("emit_values", "value_one") == 1
        assert result.output_for_node("emit_values", "value_two") == 2
        assert result.output_for_node("add_one") == 2
        assert result.output_for_node("renamed") == 3
        assert result.output_for_node("subtract") == -1


@pytest.mark.compat  # on workers and eager: the tier bin/matrix runs on every env
def test_execute_diamond_subset(engine, instance):
    with run(cj.test_diamond_job, instance, engine, op_selection=["emit_values"]) as result:
        assert result.output_for_node("emit_values", "value_one") == 1
        assert len(result.get_step_success_events()) == 1


@pytest.mark.compat  # on workers and eager: the tier bin/matrix runs on every env
def test_execute_parallel(engine, instance):
    with run(cj.test_parallel_job, instance, engine) as result:
        assert len(result.get_step_success_events()) == 11


@pytest.mark.compat  # on workers and eager: the tier bin/matrix runs on every env
def test_execute_composite(engine, instance):
    with run(cj.composite_job, instance, engine) as result:
        assert result.success
        assert len(result.get_step_success_events()) == 16


@pytest.mark.compat  # on workers and eager: the tier bin/matrix runs on every env
def test_execute_optional_outputs(engine, instance):
    with run(cj.test_optional_outputs, instance, engine) as result:
        assert len(result.get_step_success_events()) == 2
        assert len(result.get_step_skipped_events()) == 2


@pytest.mark.compat  # on workers and eager: the tier bin/matrix runs on every env
def test_execute_fails(engine, instance):
    with run(cj.test_fails, instance, engine) as result:
        assert len(result.get_step_failure_events()) == 1
        assert result.is_node_failed("fails")
        assert "Exception: argjhgjh\n" in result.failure_data_for_node("fails").error.cause.message
        assert result.is_node_untouched("should_never_execute")


@pytest.mark.compat  # on workers and eager: the tier bin/matrix runs on every env
def test_execute_retries(engine, instance):
    with run(cj.test_retries, instance, engine) as result:
        assert (
            count(result, "STEP_START"),
            count(result, "STEP_UP_FOR_RETRY"),
            count(result, "STEP_RESTARTED"),
            count(result, "STEP_FAILURE"),
        ) == (1, 1, 1, 1)


@pytest.mark.compat  # on workers and eager: the tier bin/matrix runs on every env
def test_execute_resources_limit(engine, instance):
    with run(cj.test_resources_limit, instance, engine) as result:
        assert result.is_node_success("resource_req_op")
        assert result.success


def _queue_yaml(tmp_path, endpoint, queue):
    cfg = tmp_path / f"{queue}.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "execution": {
                    "config": {
                        "broker": endpoint.broker_url,
                        "config_source": {"broker_transport_options": {"wait_time_seconds": 1}},
                    }
                }
            }
        )
    )
    out = run_cli("queues", "create", "-y", str(cfg), "-q", queue)
    assert out.returncode == 0, out.stderr
    return cfg


@pytest.mark.slow
def test_multiqueue_job_waits_for_a_worker_on_its_queue(instance, workers, executor_config, endpoint, tmp_path):
    cfg = _queue_yaml(tmp_path, endpoint, "fooqueue")
    pending = BackgroundRun(cj.multiqueue_job, instance, {"execution": {"config": executor_config}})
    # With only `dagster` workers up, the step stays queued on fooqueue and the run pending
    wait_for(lambda: queue_counts(endpoint.url, "fooqueue")[0] == 1, what="the step queued on fooqueue")
    time.sleep(2)
    assert pending.thread.is_alive()
    assert queue_counts(endpoint.url, "fooqueue") == (1, 0)
    # A worker started with -q fooqueue picks it up and the run completes
    worker = WorkerProcess(cfg, "foo", tmp_path, ["-q", "fooqueue", "-c", "1"]).wait_ready()
    try:
        result = pending.wait(60)
        assert result.success
        assert "step fooqueue" in worker.log()
    finally:
        assert worker.stop() == 0


@pytest.mark.slow
def test_priority_orders_submission_higher_first(instance, executor_config, endpoint, tmp_path):
    # One single-threaded worker takes the eleven ready steps one at a time, in the order sent.
    # With no live worker on the queue yet, the run sends the first four (min_steps_in_flight) and
    # the rest as those finish, still highest priority first.
    cfg = _queue_yaml(tmp_path, endpoint, "prio")
    result = BackgroundRun(cj.simple_priority_job, instance, {"execution": {"config": executor_config}})
    wait_for(lambda: queue_counts(endpoint.url, "prio")[0] == 4, what="the first four steps queued")
    worker = WorkerProcess(cfg, "prio", tmp_path, ["-q", "prio", "-c", "1"]).wait_ready()
    try:
        result = result.wait(120)
        assert result.success
        starts = [e.step_key for e in result.all_events if e.event_type_value == "STEP_START"]
        assert starts == [f"priority_{p}" for p in range(10, -1, -1)]
        warnings = [
            r.user_message for r in instance.all_logs(result.run_id) if "SQS has no message priority" in r.user_message
        ]
        assert len(warnings) == 1
    finally:
        assert worker.stop() == 0
