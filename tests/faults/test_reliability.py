"""Fault injection against real worker processes and the local SQS endpoint.

Each test asserts what a user would check: the run's final status, the step's events, how many
times user code actually ran (a marker file counts starts and ends) and that no message is left
stranded in the queue. Timeouts are shortened through configuration only.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import boto3
import pytest
import yaml
from dagster import DagsterEventType, DagsterRunStatus
from dagster._serdes import serialize_value

from dagster_taskiq_sync.storage.run_report import step_reports

from .. import jobs
from ..helpers import (
    CLI,
    BackgroundRun,
    PausableProxy,
    WorkerProcess,
    marker_lines,
    pid_alive,
    queue_counts,
    run_cli,
    sqs_client,
    wait_for,
)

FAULTS = "faults"


@pytest.fixture(scope="module")
def faults_config(endpoint, tmp_path_factory) -> dict:
    """Short visibility timeout and liveness limits, so faults show within seconds."""
    return {
        "broker": endpoint.broker_url,
        "config_source": {"broker_transport_options": {"visibility_timeout": 2, "wait_time_seconds": 1}},
        "health_check_interval": 1,
        "worker_lost_timeout": 5,
    }


@pytest.fixture(scope="module")
def faults_yaml(faults_config, tmp_path_factory):
    path = tmp_path_factory.mktemp("faults") / "faults.yaml"
    path.write_text(yaml.safe_dump({"execution": {"config": faults_config}}))
    out = run_cli("queues", "create", "-y", str(path), "-q", FAULTS)
    assert out.returncode == 0, out.stderr
    return path


@pytest.fixture
def start_worker(faults_yaml, tmp_path):
    started: list[WorkerProcess] = []

    def start(name: str, *extra: str) -> WorkerProcess:
        worker = WorkerProcess(
            faults_yaml,
            f"{name}-{uuid.uuid4().hex[:4]}",
            tmp_path,
            ["-q", FAULTS, "--heartbeat-interval", "0.5", *extra],
        )
        started.append(worker.wait_ready())
        return worker

    yield start
    for worker in started:
        if worker.proc.poll() is None:
            worker.stop()


@pytest.fixture
def markers(tmp_path):
    path = tmp_path / "markers"
    path.mkdir()
    return path


def fault_run(job_fn, instance, faults_config, markers, op_names, sleep=30.0) -> BackgroundRun:
    ops = {name: {"config": {"marker_dir": str(markers), "sleep": sleep}} for name in op_names}
    return BackgroundRun(job_fn, instance, {"execution": {"config": faults_config}, "ops": ops})


def events(instance, run_id, event_type):
    return [r for r in instance.all_logs(run_id) if r.dagster_event and r.dagster_event.event_type == event_type]


def wait_queue_empty(endpoint, queue=FAULTS, timeout=15):
    wait_for(lambda: queue_counts(endpoint.url, queue) == (0, 0), timeout=timeout, what=f"queue {queue} to be empty")


@pytest.mark.slow
def test_worker_killed_mid_step_fails_the_step_as_lost(endpoint, instance, faults_config, markers, start_worker):
    # Given a step running on a worker
    worker = start_worker("doomed")
    run = fault_run(jobs.one_long, instance, faults_config, markers, ["long_step"])
    wait_for(lambda: marker_lines(markers, "long_step"), what="the step to start")
    step_pid = int(marker_lines(markers, "long_step")[0].split()[1])

    # When the worker is killed with SIGKILL
    os.kill(worker.pid, signal.SIGKILL)
    killed_at = time.monotonic()

    # Then its step process dies with it, and the run fails soon with a "worker lost" error
    wait_for(lambda: not pid_alive(step_pid), timeout=10, what="the step process to die with its worker")
    result = run.wait(30)
    assert time.monotonic() - killed_at < 15
    assert not result.success
    failure = events(instance, result.run_id, DagsterEventType.STEP_FAILURE)
    assert [f.step_key for f in failure] == ["long_step"]
    message = failure[0].dagster_event.step_failure_data.error.message
    assert "stopped heartbeating" in message and "the worker was lost" in message and worker.name in message
    assert marker_lines(markers, "long_step") == [f"start {step_pid}"]  # never finished, ran once
    assert "after_long" not in {r.step_key for r in events(instance, result.run_id, DagsterEventType.STEP_START)}

    # And the dead worker's message, redelivered after its visibility timeout, is dropped by the
    # next worker without running user code again: nothing stays stranded.
    survivor = start_worker("survivor")
    wait_queue_empty(endpoint)
    assert "dropping message" in survivor.log()
    assert len(marker_lines(markers, "long_step")) == 1


@pytest.mark.slow
def test_worker_killed_mid_step_is_retried_under_its_retry_policy(
    endpoint, instance, faults_config, markers, start_worker
):
    doomed = start_worker("doomed")
    run = fault_run(jobs.one_long_retried, instance, faults_config, markers, ["retried_step"])
    wait_for(lambda: marker_lines(markers, "retried_step"), what="the first attempt to start")
    os.kill(doomed.pid, signal.SIGKILL)
    start_worker("rescuer")

    result = run.wait(40)

    assert result.success
    retries = events(instance, result.run_id, DagsterEventType.STEP_UP_FOR_RETRY)
    assert len(retries) == 1
    assert "the worker was lost" in retries[0].dagster_event.step_retry_data.error.message
    lines = marker_lines(markers, "retried_step")
    assert [line.split()[0] for line in lines] == ["start", "start", "end"]  # attempt 1 lost, attempt 2 ran
    wait_queue_empty(endpoint)


def test_run_termination_stops_running_steps_and_queued_ones_never_start(
    endpoint, instance, faults_config, markers, start_worker
):
    # Given one single-threaded worker: one step runs, the other waits in the queue
    worker = start_worker("busy", "-c", "1")
    run = fault_run(jobs.two_long, instance, faults_config, markers, ["long_a", "long_b"], sleep=60)
    running = wait_for(lambda: [n for n in ("long_a", "long_b") if marker_lines(markers, n)], what="one step to start")
    assert len(running) == 1
    queued = "long_b" if running == ["long_a"] else "long_a"
    step_pid = int(marker_lines(markers, running[0])[0].split()[1])

    # When the run is terminated the way the UI does it
    dagster_run = instance.get_run_by_id(run.run_id())
    instance.report_run_canceling(dagster_run)
    asked_at = time.monotonic()

    # Then the running step's process is killed within a few seconds and the run ends CANCELED
    wait_for(lambda: not pid_alive(step_pid), timeout=10, what="the running step to be killed")
    assert time.monotonic() - asked_at < 5
    result = run.wait(30)
    assert instance.get_run_by_id(result.run_id).status == DagsterRunStatus.CANCELED
    assert marker_lines(markers, running[0]) == [f"start {step_pid}"]
    # and the run's own log says so (Dagster's termination path: forwarded to the step's worker)
    said = [r.dagster_event.message for r in events(instance, result.run_id, DagsterEventType.ENGINE_EVENT)]
    assert f"Asked the worker running step {running[0]} (attempt 1) to stop it." in said
    # and the queued step is dropped when the worker receives it, without running user code
    wait_queue_empty(endpoint)
    assert marker_lines(markers, queued) == []
    assert "is CANCELED" in worker.log() or "is CANCELING" in worker.log()
    # and the worker stays healthy
    assert worker.proc.poll() is None
    assert "killing step" in worker.log()


@pytest.mark.slow
def test_step_longer_than_visibility_timeout_runs_exactly_once(
    endpoint, instance, faults_config, markers, start_worker
):
    # Visibility timeout 2 s, step 5 s, two idle workers that would gladly take a redelivery.
    start_worker("one")
    start_worker("two")
    result = fault_run(jobs.one_long, instance, faults_config, markers, ["long_step"], sleep=5).wait(60)

    assert result.success
    assert [line.split()[0] for line in marker_lines(markers, "long_step")] == ["start", "end"]
    wait_queue_empty(endpoint)


def test_duplicated_messages_run_user_code_once(endpoint, instance, faults_config, markers, start_worker):
    # Given the step's message in the queue three times (SQS delivers at least once)
    run = fault_run(jobs.one_long, instance, faults_config, markers, ["long_step"], sleep=0.5)
    wait_for(lambda: queue_counts(endpoint.url, FAULTS)[0] == 1, what="the step message to be queued")
    client = sqs_client(endpoint.url)
    url = client.get_queue_url(QueueName=FAULTS)["QueueUrl"]
    original = client.receive_message(QueueUrl=url, MaxNumberOfMessages=1, VisibilityTimeout=30)["Messages"][0]
    for _ in range(2):
        client.send_message(QueueUrl=url, MessageBody=original["Body"])
    client.change_message_visibility(QueueUrl=url, ReceiptHandle=original["ReceiptHandle"], VisibilityTimeout=0)

    # When a worker consumes them
    worker = start_worker("dedup", "-c", "1")
    result = run.wait(60)

    # Then the step ran once and the copies were dropped with a reason
    assert result.success
    assert [line.split()[0] for line in marker_lines(markers, "long_step")] == ["start", "end"]
    wait_queue_empty(endpoint)
    assert worker.log().count("dropping message") >= 2


@pytest.mark.slow
def test_bad_messages_end_in_the_dead_letter_queue_and_the_worker_survives(
    endpoint, instance, workers, executor_config, tmp_path
):
    from dagster import execute_job, reconstructable
    from dagster._core.code_pointer import FileCodePointer

    from dagster_taskiq_sync._dagster.names import KnownExecutionState, serialize_value
    from dagster_taskiq_sync.storage.liveness import QUEUED, LivenessStore, StepRecord
    from dagster_taskiq_sync.wire.messages import StepMessage, encode, step_task_id

    # Given a queue whose redrive policy moves a message to poison-dlq after 2 receives
    poison_yaml = tmp_path / "poison.yaml"
    poison_config = {
        "broker": endpoint.broker_url,
        "config_source": {"broker_transport_options": {"visibility_timeout": 1, "wait_time_seconds": 1}},
    }
    poison_yaml.write_text(yaml.safe_dump({"execution": {"config": poison_config}}))
    out = run_cli("queues", "create", "-y", str(poison_yaml), "-q", "poison", "--max-receive-count", "2")
    assert out.returncode == 0, out.stderr
    client = sqs_client(endpoint.url)
    url = client.get_queue_url(QueueName="poison")["QueueUrl"]

    # and four messages no worker can run: not JSON, an unknown task, a run this instance does
    # not have, and a run whose job code cannot be loaded
    client.send_message(QueueUrl=url, MessageBody="this is not json {")
    client.send_message(
        QueueUrl=url,
        MessageBody=json.dumps(
            {"task_id": "t1", "task_name": "someone.elses.task", "labels": {}, "args": [], "kwargs": {}}
        ),
    )
    with execute_job(
        reconstructable(jobs.diamond), instance=instance, run_config={"execution": {"config": executor_config}}
    ) as done:
        real_run = instance.get_run_by_id(done.run_id)
    origin = real_run.job_code_origin
    gone = FileCodePointer(python_file=str(tmp_path / "gone.py"), fn_name="diamond", working_directory=str(tmp_path))
    missing_code = origin._replace(repository_origin=origin.repository_origin._replace(code_pointer=gone))
    unloadable = real_run._replace(
        run_id=str(uuid.uuid4()), status=DagsterRunStatus.STARTED, job_code_origin=missing_code
    )
    instance.add_run(unloadable)
    # its step recorded as sent, as its orchestrator records it before sending (workers refuse what was never sent)
    LivenessStore(instance).write_queued({step_task_id(unloadable.run_id, "emit_one", 1): StepRecord(QUEUED)})
    state = serialize_value(KnownExecutionState())
    for run_id in (str(uuid.uuid4()), unloadable.run_id):
        client.send_message(
            QueueUrl=url, MessageBody=encode(StepMessage(run_id, "emit_one", 1, state), "poison").decode()
        )

    # When a worker consumes the queue
    worker = WorkerProcess(poison_yaml, "poison", tmp_path, ["-q", "poison", "-c", "2"]).wait_ready()
    try:
        # Then every message ends in the dead-letter queue, and the worker is still up
        try:
            wait_for(
                lambda: (
                    queue_counts(endpoint.url, "poison-dlq")[0] == 4 and queue_counts(endpoint.url, "poison") == (0, 0)
                ),
                timeout=30,
                what="all four messages in poison-dlq",
            )
        except AssertionError as exc:
            counts = queue_counts(endpoint.url, "poison"), queue_counts(endpoint.url, "poison-dlq")
            raise AssertionError(f"{exc}; poison/dlq counts {counts}; worker log:\n{worker.log()[-4000:]}") from None
        assert worker.proc.poll() is None
        log = worker.log()
        assert "the body is not JSON" in log
        assert "the message is for unknown task 'someone.elses.task'" in log
        assert "is not in this worker's Dagster instance" in log
        assert "its job could not be loaded on the worker" in log
        assert "Traceback" not in log
        # and the run whose code is missing says why in its own event log
        assert any(
            "its job could not be loaded" in (r.dagster_event.message or "")
            for r in instance.all_logs(unloadable.run_id)
            if r.dagster_event
        )
    finally:
        assert worker.stop() == 0


@pytest.fixture(scope="module")
def big_config(endpoint, tmp_path_factory) -> dict:
    """Queue `big` accepts 256 KiB (the old SQS default); payloads above go to the bucket."""
    config = {
        "broker": endpoint.broker_url,
        "backend": "s3://dagster-payloads/steps",
        "config_source": {
            "task_default_queue": "big",
            "broker_transport_options": {
                "wait_time_seconds": 1,
                "sqs-creation-attributes": {"MaximumMessageSize": "262144"},
            },
        },
    }
    path = tmp_path_factory.mktemp("big") / "big.yaml"
    path.write_text(yaml.safe_dump({"execution": {"config": config}}))
    out = run_cli("queues", "create", "-y", str(path))
    assert out.returncode == 0, out.stderr
    assert "bucket dagster-payloads" in out.stdout
    # big1m was created with SQS's old 256 KiB default (as queues made before August 2025 were);
    # `queues create` brings it to 1 MiB. Workers read offloaded payloads only from the bucket
    # their own config names, so this worker (with the bucket) serves both queues.
    sqs = boto3.client("sqs", endpoint_url=endpoint.url, region_name="us-east-1")
    sqs.create_queue(QueueName="big1m", Attributes={"MaximumMessageSize": "262144"})
    path_1m = path.parent / "big1m.yaml"
    path_1m.write_text(
        yaml.safe_dump(
            {
                "execution": {
                    "config": {
                        **config,
                        "config_source": {
                            "task_default_queue": "big1m",
                            "broker_transport_options": {"wait_time_seconds": 1},
                        },
                    }
                }
            }
        )
    )
    out = run_cli("queues", "create", "-y", str(path_1m))
    assert out.returncode == 0, out.stderr
    assert "MaximumMessageSize 262144 -> 1048576" in out.stdout
    worker = WorkerProcess(
        path, "big", tmp_path_factory.mktemp("bigw"), ["-q", "big", "-q", "big1m", "-c", "2"]
    ).wait_ready()
    yield config
    assert worker.stop() == 0


def sent_payload(instance, run_id, step_key) -> dict:
    [event] = [r for r in events(instance, run_id, DagsterEventType.STEP_WORKER_STARTING) if r.step_key == step_key]
    return {k: v.value for k, v in event.dagster_event.event_specific_data.metadata.items()}


def offloaded_to(instance, run_id, step_key) -> str | None:
    """Where the orchestrator said a step's payload went (an engine event), if it was offloaded."""
    urls = [
        r.dagster_event.event_specific_data.metadata["payload"].value
        for r in events(instance, run_id, DagsterEventType.ENGINE_EVENT)
        if r.step_key == step_key and "payload" in (r.dagster_event.event_specific_data.metadata or {})
    ]
    assert len(urls) <= 1
    return urls[0] if urls else None


def wide_run(instance, config, count, tmp_path):
    outputs = tmp_path / "outputs"
    outputs.mkdir(exist_ok=True)
    return BackgroundRun(
        jobs.wide,
        instance,
        {
            "execution": {"config": config},
            "ops": {"emit_wide": {"config": {"count": count}}},
            "resources": {"io_manager": {"config": {"base_dir": str(outputs)}}},
        },
    )


@pytest.mark.parametrize(
    "queue, queue_bytes, count",
    [("big", 262_144, 28), ("big1m", 1_048_576, 110)],  # ~10 KB mapping keys: ~280 KB, ~1.1 MB
    ids=["256KiB-queue", "1MiB-queue"],
)
def test_step_payload_larger_than_the_queue_accepts_goes_through_s3(
    endpoint, instance, big_config, tmp_path, queue, queue_bytes, count
):
    config = {**big_config, "config_source": {**big_config["config_source"], "task_default_queue": queue}}
    result = wide_run(instance, config, count, tmp_path).wait(120)
    assert result.success
    assert [r.step_key for r in events(instance, result.run_id, DagsterEventType.STEP_SUCCESS)] == [
        "emit_wide",
        "sum_wide",
    ]
    sent = sent_payload(instance, result.run_id, "sum_wide")
    assert int(sent["payload_bytes"]) > queue_bytes
    assert offloaded_to(instance, result.run_id, "sum_wide").startswith("s3://dagster-payloads/steps/")
    assert offloaded_to(instance, result.run_id, "emit_wide") is None
    # the offloaded payload is deleted once its step's message is settled
    s3 = boto3.client("s3", endpoint_url=endpoint.url, region_name="us-east-1")
    wait_for(
        lambda: s3.list_objects_v2(Bucket="dagster-payloads").get("KeyCount", 0) == 0,
        what="the offloaded payload to be deleted",
    )
    wait_queue_empty(endpoint, queue)


def test_step_payload_over_256KiB_goes_inline_on_a_queue_made_by_queues_create(
    endpoint, instance, big_config, tmp_path
):
    # Given big1m, which `queues create` brought to 1 MiB, and no S3 bucket in the run's config
    config = {
        **big_config,
        "backend": "rpc://",
        "config_source": {**big_config["config_source"], "task_default_queue": "big1m"},
    }
    # When a step's message is ~500 KB (over the old 256 KiB, under 1 MiB)
    result = wide_run(instance, config, 50, tmp_path).wait(120)
    # Then it went inline (with no bucket there is nowhere else) and the step ran
    assert result.success
    assert 262_144 < int(sent_payload(instance, result.run_id, "sum_wide")["payload_bytes"]) < 1_048_576 - 1024
    assert offloaded_to(instance, result.run_id, "sum_wide") is None
    assert [r.step_key for r in events(instance, result.run_id, DagsterEventType.STEP_SUCCESS)] == [
        "emit_wide",
        "sum_wide",
    ]


def test_step_payload_too_large_without_a_bucket_fails_naming_the_setting(endpoint, instance, big_config, tmp_path):
    result = wide_run(instance, {**big_config, "backend": "rpc://"}, 28, tmp_path).wait(120)
    assert not result.success
    text = "\n".join(serialize_value(r) for r in instance.all_logs(result.run_id))
    assert "more than SQS queue 'big' accepts (262144 bytes)" in text
    assert "execution.config.backend to 's3://BUCKET/PREFIX'" in text
    # the sender's failure reaches the run's log naming the step that could not be sent
    assert f"step sum_wide (attempt 1) of run {result.run_id} could not be sent" in text


def test_concurrent_steps_on_one_worker_get_their_own_compute_logs(endpoint, instance, faults_config, start_worker):
    worker = start_worker("chatty", "-c", "2")
    result = BackgroundRun(jobs.two_chatty, instance, {"execution": {"config": faults_config}}).wait(60)
    shutil.rmtree(Path(tempfile.gettempdir()) / f"chatty-{result.run_id}", ignore_errors=True)
    assert result.success
    reports = step_reports(instance, result.run_id)
    assert {reports["chatty_a"].worker, reports["chatty_b"].worker} == {worker.full_name}
    # they really overlapped on that worker
    assert reports["chatty_a"].started < reports["chatty_b"].finished
    assert reports["chatty_b"].started < reports["chatty_a"].finished

    captured = events(instance, result.run_id, DagsterEventType.LOGS_CAPTURED)
    by_step = {
        tuple(e.dagster_event.logs_captured_data.step_keys): e.dagster_event.logs_captured_data.file_key
        for e in captured
    }
    for mine, other in (("chatty_a", "chatty_b"), ("chatty_b", "chatty_a")):
        data = instance.compute_log_manager.get_log_data([result.run_id, "compute_logs", by_step[(mine,)]])
        stdout, stderr = data.stdout.decode(), data.stderr.decode()
        assert [line for line in stdout.splitlines() if "stdout" in line] == [f"{mine} stdout {i}" for i in range(40)]
        assert [line for line in stderr.splitlines() if line.startswith(("chatty_a", "chatty_b"))] == [
            f"{mine} stderr {i}" for i in range(40)
        ]
        assert other not in stdout and other not in stderr


@pytest.mark.slow
def test_second_sigterm_kills_running_steps_and_the_run_says_why(
    endpoint, instance, faults_config, markers, start_worker
):
    worker = start_worker("impatient", "-c", "1")
    run = fault_run(jobs.one_long, instance, faults_config, markers, ["long_step"], sleep=60)
    wait_for(lambda: marker_lines(markers, "long_step"), what="the step to start")
    step_pid = int(marker_lines(markers, "long_step")[0].split()[1])

    worker.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: "finishing running steps" in worker.log(), what="the first SIGTERM to be seen")
    assert pid_alive(step_pid)  # the first SIGTERM lets it run
    worker.proc.send_signal(signal.SIGTERM)

    assert worker.proc.wait(15) == 0
    assert not pid_alive(step_pid)
    result = run.wait(30)
    assert not result.success
    [failure] = events(instance, result.run_id, DagsterEventType.STEP_FAILURE)
    assert "killed: second SIGTERM" in failure.dagster_event.step_failure_data.error.message
    assert marker_lines(markers, "long_step") == [f"start {step_pid}"]
    wait_queue_empty(endpoint)


@pytest.mark.slow
def test_step_nobody_consumes_is_reported_then_failed_at_the_configured_limit(
    endpoint, instance, faults_config, faults_yaml, tmp_path
):
    out = run_cli("queues", "create", "-y", str(faults_yaml), "-q", "lonely")
    assert out.returncode == 0, out.stderr
    config = {**faults_config, "queued_step_warning": 1, "queued_step_timeout": 4}
    started = time.monotonic()
    result = BackgroundRun(jobs.unserved, instance, {"execution": {"config": config}}).wait(30)
    assert time.monotonic() - started < 15

    assert not result.success
    warnings = [
        r
        for r in events(instance, result.run_id, DagsterEventType.ENGINE_EVENT)
        if "still queued on SQS queue 'lonely'" in (r.dagster_event.message or "")
    ]
    assert len(warnings) == 1 and "no live worker has taken it" in warnings[0].dagster_event.message
    [failure] = events(instance, result.run_id, DagsterEventType.STEP_FAILURE)
    message = failure.dagster_event.step_failure_data.error.message
    assert "queued_step_timeout is 4 s" in message and "worker start -q lonely" in message

    # A worker that shows up later drops the leftover message instead of running a finished run's step.
    late = WorkerProcess(faults_yaml, "late", tmp_path, ["-q", "lonely", "-c", "1"]).wait_ready()
    try:
        wait_queue_empty(endpoint, "lonely")
        assert "is FAILURE, so step nobody_serves_this" in late.log()
    finally:
        assert late.stop() == 0


@pytest.mark.slow
def test_sqs_outage_during_a_run_is_ridden_out(endpoint, instance, faults_config, faults_yaml, markers, tmp_path):
    # Given every SQS call of the run and its worker going through a proxy we can cut
    proxy = PausableProxy(endpoint.port)
    config = {**faults_config, "broker": proxy.broker_url}
    cfg = tmp_path / "outage.yaml"
    cfg.write_text(yaml.safe_dump({"execution": {"config": config}}))
    worker = WorkerProcess(
        cfg, "outage", tmp_path, ["-q", FAULTS, "-c", "1", "--heartbeat-interval", "0.5"]
    ).wait_ready()
    try:
        run = fault_run(jobs.one_long, instance, config, markers, ["long_step"], sleep=3)
        wait_for(lambda: marker_lines(markers, "long_step"), what="the step to start")

        # When the endpoint goes away for ~10 s (the step finishes, and its successor is
        # launched, while SQS is unreachable) and comes back
        proxy.pause()
        time.sleep(10)
        proxy.resume()

        # Then the run completes, each step's user code ran once, and nothing is left in the queue
        result = run.wait(90)
        assert result.success
        assert [line.split()[0] for line in marker_lines(markers, "long_step")] == ["start", "end"]
        assert len([r for r in events(instance, result.run_id, DagsterEventType.STEP_START)]) == 2
        wait_queue_empty(endpoint)
        assert worker.proc.poll() is None
        # the worker saw the outage (its delete failed) and dropped the redelivered message
        assert "cannot reach the SQS endpoint" in worker.log()
        assert "dropping message" in worker.log()
    finally:
        worker.stop()
        proxy.close()


def test_interrupting_the_run_process_cancels_its_running_steps_by_id(
    endpoint, instance, dagster_home, faults_config, faults_yaml, markers, start_worker, tmp_path
):
    # The UI's terminate interrupts the run process; the executor then asks each running step's
    # worker, by the step attempt's id, to stop it.
    worker = start_worker("interrupted", "-c", "1")
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(
        yaml.safe_dump(
            {
                "execution": {"config": faults_config},
                "ops": {"long_step": {"config": {"marker_dir": str(markers), "sleep": 60}}},
            }
        )
    )
    bin_dir = os.path.dirname(CLI)
    proc = subprocess.Popen(
        [
            os.path.join(bin_dir, "dagster"),
            "job",
            "execute",
            "-f",
            os.path.join(os.path.dirname(os.path.dirname(__file__)), "jobs.py"),
            "-j",
            "one_long",
            "-c",
            str(run_yaml),
        ],
        env=os.environ | {"DAGSTER_HOME": str(dagster_home)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # a fresh `dagster job execute` process, then a step child: allow for a loaded machine
        wait_for(lambda: marker_lines(markers, "long_step"), timeout=90, what="the step to start")
        step_pid = int(marker_lines(markers, "long_step")[0].split()[1])
        proc.send_signal(signal.SIGINT)
        wait_for(lambda: not pid_alive(step_pid), timeout=10, what="the step to be killed")
        assert "cancel requested: the run was terminated" in worker.log()
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    run = instance.get_runs(limit=1)[0]
    assert run.job_name == "one_long" and run.is_finished
    assert marker_lines(markers, "long_step") == [f"start {step_pid}"]
    wait_queue_empty(endpoint)
