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

from dagster_taskiq_sync.storage.run_report import step_reports

from .. import jobs
from ..helpers import CLI, WorkerProcess, queue_counts, run_cli, wait_for

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(CLI).parent


@pytest.fixture(scope="module")
def extra_queues(endpoint, run_config_file):
    out = run_cli("queues", "create", "-y", run_config_file, "-q", "legacy", "-q", "drain")
    assert out.returncode == 0, out.stderr
    assert "queue legacy -> SQS legacy" in out.stdout and "dead-letter queue drain-dlq" in out.stdout


def test_dagster_job_execute_cli_with_a_celery_style_yaml(workers, instance, dagster_home, run_config_file):
    env = os.environ | {"DAGSTER_HOME": str(dagster_home)}
    out = subprocess.run(
        [
            str(BIN / "dagster"),
            "job",
            "execute",
            "-f",
            str(ROOT / "tests" / "jobs.py"),
            "-j",
            "diamond",
            "-c",
            str(run_config_file),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    run = instance.get_runs(limit=1)[0]
    assert run.job_name == "diamond" and run.status == DagsterRunStatus.SUCCESS


def test_native_broker_form_uses_aws_endpoint_url(workers, instance, endpoint, monkeypatch):
    # broker: "sqs://" leaves the endpoint to boto's own resolution (AWS_ENDPOINT_URL here).
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint.url)
    result = execute_job(
        reconstructable(jobs.diamond),
        instance=instance,
        run_config={"execution": {"config": {"broker": "sqs://"}}},
        raise_on_error=False,
    )
    assert result.success


def test_legacy_celery_yaml_worker_serves_a_tag_routed_queue(
    endpoint, instance, executor_config, extra_queues, tmp_path
):
    # Given a worker configured with the legacy `execution: celery:` form, consuming `legacy`
    legacy_yaml = tmp_path / "legacy.yaml"
    legacy_yaml.write_text(yaml.safe_dump({"execution": {"celery": {"broker": endpoint.broker_url}}}))
    worker = WorkerProcess(legacy_yaml, "legacy", tmp_path, ["-q", "legacy", "-c", "1"]).wait_ready()
    try:
        # When an op tagged dagster-celery/queue: legacy runs
        result = execute_job(
            reconstructable(jobs.routed),
            instance=instance,
            run_config={"execution": {"config": executor_config}},
            raise_on_error=False,
        )
        # Then that worker ran it
        assert result.success
        assert step_reports(instance, result.run_id)["on_legacy_queue"].worker == worker.full_name
        assert "queues legacy (SQS legacy)" in worker.log()
    finally:
        assert worker.stop() == 0


@pytest.mark.slow
def test_sigterm_finishes_running_steps_and_releases_unstarted_ones(
    endpoint, instance, executor_config, extra_queues, tmp_path
):
    # Given one worker on `drain` with one thread and prefetch 2: it runs one slow step and
    # holds the other unstarted.
    cfg = tmp_path / "drain.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "execution": {
                    "config": {
                        "broker": endpoint.broker_url,
                        "config_source": {
                            "worker_prefetch_multiplier": 2,
                            "broker_transport_options": {"wait_time_seconds": 1},
                        },
                    }
                }
            }
        )
    )
    first = WorkerProcess(cfg, "drain1", tmp_path, ["-q", "drain", "-c", "1"]).wait_ready()
    outcome = {}
    runner = threading.Thread(
        target=lambda: outcome.setdefault(
            "result",
            execute_job(
                reconstructable(jobs.two_slow_steps),
                instance=instance,
                run_config={"execution": {"config": executor_config}},
                raise_on_error=False,
            ),
        )
    )
    runner.start()
    wait_for(lambda: "started (queue drain" in first.log(), what="the first slow step to start")
    wait_for(lambda: queue_counts(endpoint.url, "drain") == (0, 2), what="both messages held by the worker")

    # When it gets SIGTERM
    first.proc.send_signal(15)

    # Then the unstarted message is visible again at once (not after the visibility timeout)
    wait_for(lambda: queue_counts(endpoint.url, "drain")[0] == 1, timeout=5, what="the unstarted message released")
    # and the running step finishes before the worker exits cleanly
    assert first.proc.wait(30) == 0
    assert "finished in" in first.log() and "releasing message" in first.log()

    # And another worker picks up the released step, so the run completes
    second = WorkerProcess(cfg, "drain2", tmp_path, ["-q", "drain", "-c", "1"]).wait_ready()
    try:
        runner.join(60)
        result = outcome["result"]
        assert result.success
        workers_used = {r.worker for r in step_reports(instance, result.run_id).values()}
        assert workers_used == {first.full_name, second.full_name}
        wait_for(lambda: queue_counts(endpoint.url, "drain") == (0, 0), timeout=10, what="finished messages deleted")
    finally:
        assert second.stop() == 0


def test_idle_worker_stops_promptly_on_sigint(run_config_file, queues_created, tmp_path):
    # (at -l DEBUG, which must not turn on botocore's DEBUG lines: they hold credentials)
    worker = WorkerProcess(run_config_file, "idle", tmp_path, ["-c", "1", "-l", "DEBUG"]).wait_ready()
    started = time.monotonic()
    worker.proc.send_signal(2)
    assert worker.proc.wait(20) == 0
    # Its last long poll (1 s here) is allowed to return, so nothing it might take is hidden for a
    # visibility timeout: an idle worker stops within one long poll (plus a margin for a loaded
    # machine), not within --shutdown-timeout (60 s).
    assert time.monotonic() - started < 1 + 10
    log = worker.log()
    assert "stopped after running 0 step(s)" in log
    assert " botocore" not in log and " aiobotocore" not in log and "Authorization" not in log


@pytest.mark.slow
def test_worker_list_and_terminate_work_on_sqs(run_config_file, queues_created, tmp_path):
    # Given two workers registered in a DAGSTER_HOME; one configured by Celery passthrough args
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = os.environ | {"DAGSTER_HOME": str(home)}
    a = WorkerProcess(run_config_file, "listed-a", tmp_path, ["-c", "1"], env=env).wait_ready()
    b = WorkerProcess(
        run_config_file, "listed-b", tmp_path, ["--", "--concurrency", "3", "--prefetch-multiplier", "2"], env=env
    ).wait_ready()
    assert "concurrency 3, prefetch 6" in b.log()
    try:
        # When listing workers, both show with their queues and a fresh heartbeat
        listed = run_cli("worker", "list", env=env)
        assert listed.returncode == 0, listed.stderr
        for worker in (a, b):
            line = next(line for line in listed.stdout.splitlines() if line.startswith(worker.full_name))
            assert "dagster" in line and "running" in line
        # When one is asked to terminate, it stops gracefully and leaves the list
        out = run_cli("worker", "terminate", "listed-a", "--wait", "20", env=env)
        assert out.returncode == 0, out.stderr
        assert a.proc.wait(10) == 0 and "asked this worker to stop" in a.log()
        assert b.proc.poll() is None
        listed = run_cli("worker", "list", env=env).stdout
        assert a.full_name not in listed and b.full_name in listed
        # and -a stops the rest; an unknown name is a clear error
        assert run_cli("worker", "terminate", "-a", "--wait", "20", env=env).returncode == 0
        assert b.proc.wait(10) == 0
        missing = run_cli("worker", "terminate", "nobody", env=env)
        assert missing.returncode == 1 and "no registered worker is named 'nobody'" in missing.stderr
    finally:
        for worker in (a, b):
            if worker.proc.poll() is None:
                worker.stop()


def test_background_worker_runs_detached_and_logs_to_its_file(run_config_file, queues_created, tmp_path):
    log = tmp_path / "bg.log"
    out = subprocess.run(
        [CLI, "worker", "start", "-d", "-f", str(log), "-y", str(run_config_file), "-n", "bg", "-c", "1"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    pid = int(out.stdout.split("pid ")[1].split(",")[0])
    try:
        wait_for(lambda: log.exists() and " ready: " in log.read_text(), timeout=60, what="the background worker")
    finally:
        os.kill(pid, 15)
    wait_for(lambda: "stopped after running" in log.read_text(), timeout=30, what="the background worker to stop")


def test_parallel_job_on_a_fifo_queue_runs_its_steps_side_by_side(endpoint, instance, tmp_path):
    # One message group per step attempt: SQS FIFO does not serialize independent steps.
    config = {
        "broker": endpoint.broker_url,
        "config_source": {"task_default_queue": "steps.fifo", "broker_transport_options": {"wait_time_seconds": 1}},
    }
    cfg = tmp_path / "fifo.yaml"
    cfg.write_text(yaml.safe_dump({"execution": {"config": config}}))
    out = run_cli("queues", "create", "-y", cfg)
    assert out.returncode == 0 and "SQS steps.fifo" in out.stdout, out.stderr
    worker = WorkerProcess(cfg, "fifo", tmp_path, ["-c", "3"]).wait_ready()
    try:
        with execute_job(
            reconstructable(jobs.fan_out_fan_in), instance=instance, run_config={"execution": {"config": config}}
        ) as result:
            assert result.success
            assert result.output_for_node("total") == sum((1 + i) ** 2 for i in range(6))
        reports = step_reports(instance, result.run_id)
        starts = sorted(reports[f"square_{i}"].started for i in range(6))
        ends = sorted(reports[f"square_{i}"].finished for i in range(6))
        assert starts[2] < ends[0]  # three squares were running at the same time
        wait_for(
            lambda: queue_counts(endpoint.url, "steps.fifo") == (0, 0), timeout=10, what="finished messages deleted"
        )
    finally:
        assert worker.stop() == 0
