"""The worker and the CLI as a user drives them: flags, config forms, signals."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml
from dagster import DagsterRunStatus, execute_job, reconstructable

from dagster_taskiq_sync.run_report import step_reports

from . import jobs
from .helpers import CLI, WorkerProcess, queue_counts, wait_for

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(CLI).parent


@pytest.fixture(scope="module")
def extra_queues(endpoint, run_config_file):
    out = subprocess.run(
        [CLI, "queues", "create", "-y", str(run_config_file), "-q", "legacy", "-q", "drain"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "queue legacy -> SQS legacy" in out.stdout and "dead-letter queue drain-dlq" in out.stdout


def test_dagster_job_execute_cli_with_a_celery_style_yaml(workers, instance, dagster_home, run_config_file):
    env = os.environ | {"DAGSTER_HOME": str(dagster_home)}
    out = subprocess.run(
        [str(BIN / "dagster"), "job", "execute", "-f", str(ROOT / "tests" / "jobs.py"), "-j", "diamond",
         "-c", str(run_config_file)],
        capture_output=True, text=True, timeout=120, env=env, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    run = instance.get_runs(limit=1)[0]
    assert run.job_name == "diamond" and run.status == DagsterRunStatus.SUCCESS


def test_native_broker_form_uses_aws_endpoint_url(workers, instance, endpoint, monkeypatch):
    # broker: "sqs://" leaves the endpoint to boto's own resolution (AWS_ENDPOINT_URL here).
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint.url)
    result = execute_job(
        reconstructable(jobs.diamond), instance=instance,
        run_config={"execution": {"config": {"broker": "sqs://"}}}, raise_on_error=False,
    )
    assert result.success


def test_legacy_celery_yaml_worker_serves_a_tag_routed_queue(endpoint, instance, executor_config, extra_queues, tmp_path):
    # Given a worker configured with the legacy `execution: celery:` form, consuming `legacy`
    legacy_yaml = tmp_path / "legacy.yaml"
    legacy_yaml.write_text(yaml.safe_dump({"execution": {"celery": {"broker": endpoint.broker_url}}}))
    worker = WorkerProcess(legacy_yaml, "legacy", tmp_path, ["-q", "legacy", "-c", "1"]).wait_ready()
    try:
        # When an op tagged dagster-celery/queue: legacy runs
        result = execute_job(
            reconstructable(jobs.routed), instance=instance,
            run_config={"execution": {"config": executor_config}}, raise_on_error=False,
        )
        # Then that worker ran it
        assert result.success
        assert step_reports(instance, result.run_id)["on_legacy_queue"].worker == worker.full_name
        assert "queues legacy (SQS legacy)" in worker.log()
    finally:
        assert worker.stop() == 0


def test_sigterm_finishes_running_steps_and_releases_unstarted_ones(endpoint, instance, executor_config, extra_queues, tmp_path):
    # Given one worker on `drain` with one thread and prefetch 2: it runs one slow step and
    # holds the other unstarted.
    cfg = tmp_path / "drain.yaml"
    cfg.write_text(yaml.safe_dump({"execution": {"config": {
        "broker": endpoint.broker_url,
        "config_source": {"worker_prefetch_multiplier": 2, "broker_transport_options": {"wait_time_seconds": 1}},
    }}}))
    first = WorkerProcess(cfg, "drain1", tmp_path, ["-q", "drain", "-c", "1"]).wait_ready()
    outcome = {}
    runner = threading.Thread(target=lambda: outcome.setdefault("result", execute_job(
        reconstructable(jobs.two_slow_steps), instance=instance,
        run_config={"execution": {"config": executor_config}}, raise_on_error=False,
    )))
    runner.start()
    wait_for(lambda: "started (queue drain" in first.log(), what="the first slow step to start")
    wait_for(lambda: queue_counts(endpoint.url, "drain") == (0, 2), what="both messages held by the worker")

    # When it gets SIGTERM
    first.proc.send_signal(15)

    # Then the unstarted message is visible again at once (not after the visibility timeout)
    wait_for(lambda: queue_counts(endpoint.url, "drain")[0] == 1, timeout=5, what="the unstarted message released")
    # and the running step finishes before the worker exits cleanly
    assert first.proc.wait(30) == 0
    assert "finished in" in first.log() and "releasing unstarted message" in first.log()

    # And another worker picks up the released step, so the run completes
    second = WorkerProcess(cfg, "drain2", tmp_path, ["-q", "drain", "-c", "1"]).wait_ready()
    try:
        runner.join(60)
        result = outcome["result"]
        assert result.success
        workers_used = {r.worker for r in step_reports(instance, result.run_id).values()}
        assert workers_used == {first.full_name, second.full_name}
        assert queue_counts(endpoint.url, "drain") == (0, 0)
    finally:
        assert second.stop() == 0


def test_idle_worker_stops_promptly_on_sigint(run_config_file, queues_created, tmp_path):
    worker = WorkerProcess(run_config_file, "idle", tmp_path, ["-c", "1"]).wait_ready()
    started = time.monotonic()
    worker.proc.send_signal(2)
    assert worker.proc.wait(15) == 0
    assert time.monotonic() - started < 5  # a long poll in flight does not hold shutdown
    assert "stopped after running 0 step(s)" in worker.log()
