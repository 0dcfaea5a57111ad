"""A real worker's /metrics, /livez and /readyz, scraped over HTTP while it works, loses SQS and drains."""

from __future__ import annotations

import socket
import subprocess
import urllib.error
import urllib.request

import yaml
from dagster import execute_job, reconstructable

from dagster_taskiq_sync.ops.local_endpoint import free_port

from .. import jobs
from ..helpers import (
    CLI,
    BackgroundRun,
    PausableProxy,
    Recorder,
    WorkerProcess,
    marker_lines,
    queue_counts,
    run_cli,
    wait_for,
)


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            head, value = line.rsplit(" ", 1)
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                return float(value)
    return 0.0


def test_probes_and_metrics_follow_work_outages_and_drain(endpoint, instance, tmp_path):
    # Given a worker serving its metrics port, talking to SQS through a proxy we can cut
    proxy = PausableProxy(endpoint.port)
    config = {
        "broker": proxy.broker_url,
        "config_source": {"task_default_queue": "probed", "broker_transport_options": {"wait_time_seconds": 1}},
    }
    path = tmp_path / "probed.yaml"
    path.write_text(yaml.safe_dump({"execution": {"config": config}}))
    out = run_cli("queues", "create", "-y", str(path))
    assert out.returncode == 0, out.stderr
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    worker = WorkerProcess(
        path, "probed", tmp_path, ["-q", "probed", "-c", "2", "--metrics-port", str(port)]
    ).wait_ready()
    try:
        assert get(base + "/livez")[0] == 200
        wait_for(lambda: get(base + "/readyz")[0] == 200, timeout=10, what="the worker to be ready")

        # When it runs a job, its metrics count the steps by queue and job
        with execute_job(
            reconstructable(jobs.diamond), instance=instance, run_config={"execution": {"config": config}}
        ) as result:
            assert result.success
        status, text = get(base + "/metrics")
        assert status == 200
        assert metric(text, "dagster_taskiq_worker_steps_received_total", queue="probed") == 4
        assert metric(text, "dagster_taskiq_worker_steps_started_total", queue="probed") == 4
        assert metric(text, "dagster_taskiq_worker_steps_succeeded_total", queue="probed") == 4
        assert metric(text, "dagster_taskiq_worker_step_queue_wait_seconds_count", queue="probed", job="diamond") == 4
        assert metric(text, "dagster_taskiq_worker_free_slots") == 2
        assert metric(text, "dagster_taskiq_sqs_call_duration_seconds_count", action="ReceiveMessage") > 0
        # finished messages are deleted within the Acker's batching window (0.5 s), in 1 to 4 calls
        wait_for(lambda: queue_counts(endpoint.url, "probed") == (0, 0), timeout=10, what="the four messages deleted")
        text = get(base + "/metrics")[1]
        deletes = sum(
            metric(text, "dagster_taskiq_sqs_call_duration_seconds_count", action=action)
            for action in ("DeleteMessage", "DeleteMessageBatch")
        )
        assert 1 <= deletes <= 4

        # When SQS becomes unreachable, it is not ready (send it no work) but alive (do not restart it)
        proxy.pause()
        wait_for(lambda: get(base + "/readyz")[0] == 503, timeout=30, what="readiness to drop during the outage")
        assert "SQS unreachable" in get(base + "/readyz")[1]
        assert get(base + "/livez")[0] == 200
        proxy.resume()
        wait_for(lambda: get(base + "/readyz")[0] == 200, timeout=60, what="readiness to come back")

        # When it drains on SIGTERM with a step still running, it is not ready but alive
        markers = tmp_path / "markers"
        markers.mkdir()
        run = BackgroundRun(
            jobs.two_sleepers,
            instance,
            {
                "execution": {"config": config},
                "ops": {
                    name: {"config": {"marker_dir": str(markers), "sleep": 4}} for name in ("sleeper_a", "sleeper_b")
                },
            },
        )
        wait_for(
            lambda: marker_lines(markers, "sleeper_a") and marker_lines(markers, "sleeper_b"),
            timeout=60,
            what="the long steps to start",
        )
        worker.proc.send_signal(15)
        wait_for(
            lambda: get(base + "/readyz")[0] == 503 and "draining" in get(base + "/readyz")[1],
            timeout=10,
            what="readiness to drop while draining",
        )
        assert get(base + "/livez")[0] == 200
        assert worker.proc.wait(60) == 0
        assert run.wait(120).success  # the running steps finished during the drain
    finally:
        if worker.proc.poll() is None:
            worker.stop()
        proxy.close()


def test_a_metrics_port_in_use_is_one_sentence_naming_the_flag(run_config_file, queues_created, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        out = subprocess.run(
            [CLI, "worker", "start", "-y", str(run_config_file), "--metrics-port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert out.returncode != 0
    assert "--metrics-port" in out.stderr and str(port) in out.stderr
    assert "Traceback" not in out.stderr


def test_scale_in_protection_outside_its_platform_is_one_sentence(run_config_file, queues_created, tmp_path):
    env = {k: v for k, v in __import__("os").environ.items() if k != "ECS_AGENT_URI"}
    out = subprocess.run(
        [CLI, "worker", "start", "-y", str(run_config_file), "--scale-in-protection", "ecs"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert out.returncode != 0
    assert "--scale-in-protection ecs needs ECS_AGENT_URI" in out.stderr and "Traceback" not in out.stderr


def test_a_busy_worker_is_protected_from_ecs_scale_in_and_released_when_it_stops(endpoint, instance, tmp_path):

    config = {
        "broker": endpoint.broker_url,
        "config_source": {"task_default_queue": "protected", "broker_transport_options": {"wait_time_seconds": 1}},
    }
    path = tmp_path / "protected.yaml"
    path.write_text(yaml.safe_dump({"execution": {"config": config}}))
    out = run_cli("queues", "create", "-y", str(path))
    assert out.returncode == 0, out.stderr
    agent = Recorder()  # stands in for the ECS agent's task-protection endpoint
    env = __import__("os").environ | {"ECS_AGENT_URI": agent.url + "/api/task-1"}
    worker = WorkerProcess(
        path, "protected", tmp_path, ["-q", "protected", "-c", "2", "--scale-in-protection", "ecs"], env=env
    ).wait_ready()
    try:
        with execute_job(
            reconstructable(jobs.diamond), instance=instance, run_config={"execution": {"config": config}}
        ) as result:
            assert result.success
        assert worker.stop() == 0
        puts = [call for call in agent.calls if call["method"] == "PUT"]
        assert all(call["path"] == "/api/task-1/task-protection/v1/state" for call in puts)
        states = [call["body"]["ProtectionEnabled"] for call in puts]
        assert True in states  # protected while it held steps
        assert states[-1] is False  # and released when it stopped
    finally:
        if worker.proc.poll() is None:
            worker.stop()
        agent.close()
