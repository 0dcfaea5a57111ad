"""Bad input fails fast with one sentence naming the setting and the fix."""

from __future__ import annotations

import subprocess
import time

import pytest
import yaml
from dagster import DagsterEventType, DagsterUnmetExecutorRequirementsError, execute_job, reconstructable

from dagster_taskiq_sync.ops.local_endpoint import free_port

from .. import jobs
from ..helpers import CLI


def failed_run_message(instance, executor_config, job_fn=jobs.diamond) -> tuple[str, float]:
    started = time.monotonic()
    result = execute_job(
        reconstructable(job_fn),
        instance=instance,
        run_config={"execution": {"config": executor_config}},
        raise_on_error=False,
    )
    elapsed = time.monotonic() - started
    assert not result.success
    failure = [
        r
        for r in instance.all_logs(result.run_id)
        if r.dagster_event and r.dagster_event.event_type == DagsterEventType.RUN_FAILURE
    ]
    assert len(failure) == 1
    errors = [r.user_message for r in instance.all_logs(result.run_id) if r.level >= 40]
    return "\n".join(errors), elapsed


@pytest.mark.parametrize(
    "broker, expected",
    [
        ("amqp://guest@localhost//", "scheme 'amqp://'"),
        ("redis://localhost:6379/0", "scheme 'redis://'"),
        ("sqs://127.0.0.1:notaport", "is not a valid URL"),
        ("sqs://127.0.0.1", "without a port"),
        ("sqs://key@127.0.0.1:9324", "access key without a secret"),
        # an AWS secret with an unquoted '/': the run's failure event shows neither half of it
        ("sqs://AKIAEXAMPLE:wJalrX/UtnFEMI@127.0.0.1:9324", "sqs://AKIAEXAMPLE:***@127.0.0.1:9324"),
    ],
)
def test_bad_broker_url_fails_the_run_naming_the_setting(instance, broker, expected):
    message, elapsed = failed_run_message(instance, {"broker": broker})
    assert "execution.config.broker" in message and expected in message
    assert "sqs://" in message  # says what to write instead
    assert "wJalrX" not in message and "UtnFEMI" not in message
    assert elapsed < 15


def test_missing_queue_names_it_and_the_command_that_creates_it(instance, endpoint, queues_created):
    config = {"broker": endpoint.broker_url, "config_source": {"task_default_queue": "no-such-queue"}}
    message, elapsed = failed_run_message(instance, config)
    assert "SQS queue 'no-such-queue' does not exist" in message
    assert "dagster-taskiq-sync queues create" in message
    assert elapsed < 15


def test_unreachable_endpoint_fails_fast(instance):
    closed_port = free_port()  # nothing listens there
    message, elapsed = failed_run_message(instance, {"broker": f"sqs://127.0.0.1:{closed_port}"})
    assert f"cannot reach the SQS endpoint http://127.0.0.1:{closed_port}" in message
    assert elapsed < 20


def test_unknown_backend_scheme_is_refused(instance, endpoint):
    message, _ = failed_run_message(instance, {"broker": endpoint.broker_url, "backend": "redis://localhost/1"})
    assert "execution.config.backend" in message and "'rpc://'" in message


def test_in_memory_io_manager_is_refused_before_any_step_runs(instance, endpoint):
    # Steps run in other processes, so they could never read in-memory outputs.
    # taskiq_executor declares Dagster's multi-process requirements, so Dagster refuses the run
    # before anything is sent, with its own sentence naming the fix.
    runs_before = len(instance.get_runs())
    with pytest.raises(DagsterUnmetExecutorRequirementsError, match="Please use a persistent IO manager"):
        execute_job(
            reconstructable(jobs.in_memory_outputs),
            instance=instance,
            run_config={"execution": {"config": {"broker": endpoint.broker_url}}},
        )
    assert len(instance.get_runs()) == runs_before


def run_cli(*args, timeout=30):
    started = time.monotonic()
    out = subprocess.run([CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout)
    return out, time.monotonic() - started


def test_worker_with_missing_queue_exits_with_one_sentence(endpoint, queues_created, tmp_path):
    # The real console script's error path; the flag and config-file checks are unit tests
    # (tests/unit/test_cli_validation.py, click's runner).
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump({"execution": {"config": {"broker": endpoint.broker_url}}}))
    out, elapsed = run_cli("worker", "start", "-y", config, "-q", "nobody-made-this")
    assert out.returncode == 1
    assert "SQS queue 'nobody-made-this' does not exist" in out.stderr
    assert "Traceback" not in out.stderr
    assert elapsed < 20


def test_a_bad_routing_table_fails_the_run_with_one_sentence(instance, endpoint):
    # (worker start -y and queues create -y refuse it too: tests/unit/test_cli_validation.py)
    routes = [{"queue": "big", "when": {"ecs/memory": ">= 8Gi"}}]  # ecs/memory counts MiB, as the ECS tag
    expected = (
        "execution.config.routes[0].when.ecs/memory is '>= 8Gi': '8Gi' is not MiB, e.g. 8192 or '8 GB'; fix the value."
    )
    message, _ = failed_run_message(instance, {"broker": endpoint.broker_url, "routes": routes})
    assert expected in message
