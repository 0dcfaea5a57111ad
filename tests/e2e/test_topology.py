"""The production topology, end to end: what a deployment runs, started as its operator starts it.

- a PostgreSQL Dagster instance (dagster-postgres through psycopg2),
- dagster-aws's S3 io manager and S3 compute log manager, on the local endpoint,
- `dagster-daemon run` with the QueuedRunCoordinator and run monitoring,
- `dagster-webserver` on 127.0.0.1, whose GraphQL API submits and terminates runs, launched by
  `TaskiqRunLauncher` (dagster.yaml),
- a code location (tests/topology_jobs.py) whose jobs fan their steps out with `taskiq_executor`,
- two `dagster-taskiq-sync worker start` processes sharing no directory (own HOME, TMPDIR, working
  directory and DAGSTER_HOME holding a copy of dagster.yaml), each serving the run queue and the
  step queue.

The servers are shared by the module; each test asserts what a user sees.
"""

from __future__ import annotations

import concurrent.futures
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import boto3
import pytest
import yaml
from dagster import DagsterEventType, DagsterInstance

from dagster_taskiq_sync.ops.local_endpoint import free_port
from dagster_taskiq_sync.storage.run_report import step_reports

from ..helpers import CLI, WorkerProcess, pid_alive, queue_counts, wait_for
from ..topology import GraphQL, Service, die_with_parent, environ, instance_yaml, listening_sockets
from ..topology_jobs import BUCKET, IO_PREFIX, PARTS

pytest.importorskip("dagster_postgres", reason="dagster-postgres is not installed (pip install -e '.[test]')")
pytest.importorskip("dagster_aws", reason="dagster-aws is not installed (pip install -e '.[test]')")
pytest.importorskip("dagster_webserver", reason="dagster-webserver is not installed (pip install -e '.[test]')")

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
LOCATION = "topology"
RUN_QUEUE = "topology-runs"
STEP_QUEUE = "topology-steps"
QUEUES = (RUN_QUEUE, STEP_QUEUE, f"{RUN_QUEUE}-dlq", f"{STEP_QUEUE}-dlq")
LOG_PREFIX = "compute-logs"
WORKER_LOST_TIMEOUT = 5.0  # > 3 x the workers' --heartbeat-interval
TRANSPORT = {"region": "us-east-1", "wait_time_seconds": 1, "visibility_timeout": 10}


def run_config(**ops: dict) -> dict:
    """What the launchpad submits: the dagster-celery style executor block, steps to STEP_QUEUE."""
    executor = {
        "broker": "sqs://",
        "worker_lost_timeout": WORKER_LOST_TIMEOUT,
        "health_check_interval": 1,
        "config_source": {"task_default_queue": STEP_QUEUE, "broker_transport_options": TRANSPORT},
    }
    return {"execution": {"config": executor}, "ops": {name: {"config": cfg} for name, cfg in ops.items()}}


@pytest.fixture(scope="module")
def topology(endpoint, postgres, tmp_path_factory):
    root = tmp_path_factory.mktemp("topology")
    logs = root / "logs"
    logs.mkdir()
    orchestrator = root / "orchestrator"  # the webserver's and the daemon's host
    for sub in ("dagster_home", "tmp", "home"):
        (orchestrator / sub).mkdir(parents=True)
    # Everything this process starts finds the endpoint as boto does on AWS (AWS_ENDPOINT_URL),
    # and stages compute logs in its own TMPDIR (dagster.yaml: local_dir: {env: TMPDIR}).
    with environ(AWS_ENDPOINT_URL=endpoint.url, TMPDIR=str(orchestrator / "tmp")):
        boto3.client("s3", endpoint_url=endpoint.url, region_name="us-east-1").create_bucket(Bucket=BUCKET)
        db_name = postgres.create_database("topology")
        dagster_yaml = orchestrator / "dagster_home" / "dagster.yaml"
        dagster_yaml.write_text(
            yaml.safe_dump(
                instance_yaml(
                    postgres.db_settings(db_name),
                    run_queue=RUN_QUEUE,
                    bucket=BUCKET,
                    log_prefix=LOG_PREFIX,
                    worker_lost_timeout=WORKER_LOST_TIMEOUT,
                ),
                sort_keys=False,
            )
        )
        (orchestrator / "workspace.yaml").write_text(
            yaml.safe_dump(
                {
                    "load_from": [
                        {
                            "python_file": {
                                "relative_path": str(ROOT / "tests" / "topology_jobs.py"),
                                "working_directory": str(ROOT),
                                "location_name": LOCATION,
                            }
                        }
                    ]
                }
            )
        )
        worker_yaml = orchestrator / "run_config.yaml"  # the workers' -y file
        worker_yaml.write_text(
            yaml.safe_dump(
                {
                    "execution": {
                        "config": {
                            "broker": "sqs://",
                            "config_source": {"task_default_queue": STEP_QUEUE, "broker_transport_options": TRANSPORT},
                        }
                    }
                }
            )
        )

        # The operator creates the queues (and their dead-letter queues) once.
        out = subprocess.run(
            [CLI, "queues", "create", "-y", str(worker_yaml), "-q", RUN_QUEUE, "-q", STEP_QUEUE],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr

        orch_env = os.environ | {"DAGSTER_HOME": str(dagster_yaml.parent), "HOME": str(orchestrator / "home")}
        port = free_port()
        services = [
            Service(
                "webserver",
                [BIN / "dagster-webserver", "-h", "127.0.0.1", "-p", port, "-w", orchestrator / "workspace.yaml"],
                logs,
                orch_env,
                orchestrator,
            ),
            Service(
                "daemon",
                [BIN / "dagster-daemon", "run", "-w", orchestrator / "workspace.yaml"],
                logs,
                orch_env,
                orchestrator,
            ),
        ]
        workers = []
        try:
            for i in (1, 2):
                # A machine of its own: nothing shared with the orchestrator or the other worker
                # but the database, the queues and the bucket.
                machine = root / f"worker{i}"
                for sub in ("home", "tmp", "cwd", "dagster_home"):
                    (machine / sub).mkdir(parents=True)
                shutil.copy(dagster_yaml, machine / "dagster_home" / "dagster.yaml")
                shutil.copy(worker_yaml, machine / "cwd" / "run_config.yaml")
                env = os.environ | {
                    "HOME": str(machine / "home"),
                    "TMPDIR": str(machine / "tmp"),
                    "DAGSTER_HOME": str(machine / "dagster_home"),
                }
                workers.append(
                    WorkerProcess(
                        Path("run_config.yaml"),
                        f"topo{i}",
                        logs,
                        [
                            "-q",
                            RUN_QUEUE,
                            "-q",
                            STEP_QUEUE,
                            "-c",
                            "3",
                            "--heartbeat-interval",
                            "0.5",
                            "--shutdown-timeout",
                            "10",
                        ],
                        env=env,
                        cwd=machine / "cwd",
                        preexec_fn=die_with_parent,
                    )
                )
            for worker in workers:
                worker.wait_ready(timeout=120)
            graphql = GraphQL(port)
            webserver = services[0]
            webserver.wait_until(graphql.ping, "the webserver to answer", timeout=120)
            webserver.wait_until(lambda: graphql.location_loaded(LOCATION), "the code location to load", timeout=120)
            with DagsterInstance.from_config(str(dagster_yaml.parent)) as instance:
                yield SimpleNamespace(
                    graphql=graphql,
                    instance=instance,
                    workers=workers,
                    services=services,
                    endpoint=endpoint,
                    root=root,
                    webserver_port=port,
                )
        finally:
            # All at once: each waits for its own graceful stop (SIGTERM), then is killed.
            with concurrent.futures.ThreadPoolExecutor(len(services) + len(workers)) as pool:
                stopping = [pool.submit(service.stop) for service in services]
                codes = [future.result() for future in [pool.submit(worker.stop) for worker in workers]]
                for future in stopping:
                    future.result()
    assert codes == [0] * len(workers), [w.log() for w in workers]


def s3_keys(endpoint, prefix: str) -> set[str]:
    client = boto3.client("s3", endpoint_url=endpoint.url, region_name="us-east-1")
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {obj["Key"] for page in pages for obj in page.get("Contents", [])}


def s3_object(endpoint, key: str) -> bytes:
    client = boto3.client("s3", endpoint_url=endpoint.url, region_name="us-east-1")
    return client.get_object(Bucket=BUCKET, Key=key)["Body"].read()


def events(instance, run_id, kind: DagsterEventType) -> list:
    return [r for r in instance.all_logs(run_id) if r.dagster_event and r.dagster_event.event_type == kind]


def queues_drained(endpoint) -> bool:
    return all(queue_counts(endpoint.url, queue) == (0, 0) for queue in QUEUES)


def test_run_submitted_through_graphql_succeeds_on_both_workers_with_outputs_and_logs_in_s3(topology):
    gql, instance = topology.graphql, topology.instance
    started = time.monotonic()
    run_id, status = gql.launch_run(LOCATION, "fan_out", run_config())
    assert status == "QUEUED"  # the QueuedRunCoordinator holds it until the daemon launches it

    run = gql.wait_finished(run_id, timeout=180)
    elapsed = time.monotonic() - started
    assert run["status"] == "SUCCESS", [w.log() for w in topology.workers]

    # The daemon launched it through TaskiqRunLauncher; a worker ran the run (its orchestrator)
    text = "\n".join(r.dagster_event.message or "" for r in instance.all_logs(run_id) if r.dagster_event)
    assert f"Sent run to SQS queue '{RUN_QUEUE}' (launch)" in text
    names = {w.full_name for w in topology.workers}
    assert any(f"Run picked up by worker {name}" in text for name in names)

    # and its steps were spread over both workers.
    reports = step_reports(instance, run_id)
    steps = {"numbers", "total", *(f"part_{i}" for i in range(PARTS))}
    assert set(reports) == steps
    assert all(r.status == "SUCCESS" and r.queue == STEP_QUEUE for r in reports.values()), reports
    assert {r.worker for r in reports.values()} == names, {k: r.worker for k, r in reports.items()}
    assert all(s["status"] == "SUCCESS" for s in run["stepStats"]) and len(run["stepStats"]) == len(steps)

    # Outputs are in S3, written by S3PickleIOManager on the workers; the last one is the answer.
    outputs = s3_keys(topology.endpoint, f"{IO_PREFIX}/storage/{run_id}/")
    assert outputs == {f"{IO_PREFIX}/storage/{run_id}/{step}/result" for step in steps}
    assert pickle.loads(s3_object(topology.endpoint, f"{IO_PREFIX}/storage/{run_id}/total/result")) == 55

    # Compute logs are in S3, uploaded by S3ComputeLogManager on the workers,
    captured = {
        r.dagster_event.logs_captured_data.file_key: r.dagster_event.logs_captured_data.step_keys
        for r in events(instance, run_id, DagsterEventType.LOGS_CAPTURED)
    }
    assert sorted(k for keys in captured.values() for k in keys) == sorted(steps)
    # S3ComputeLogManager uploads a step's files as its capture ends, after the step's success
    # event, so possibly after the run's SUCCESS: the workers let those children finish.
    prefix = f"{LOG_PREFIX}/storage/{run_id}/compute_logs/"
    wanted = {f"{prefix}{key}.{ext}" for key in captured for ext in ("out", "err")}
    missing = wanted

    def all_logs_landed() -> bool:
        nonlocal missing
        missing = wanted - s3_keys(topology.endpoint, prefix)
        return not missing

    try:
        wait_for(all_logs_landed, timeout=30, what="every step's compute logs in S3")
    except AssertionError as exc:  # say which, and what the workers did with those steps
        raise AssertionError(f"{exc}; missing {sorted(missing)}", [w.log() for w in topology.workers]) from None
    # and the webserver (no file of the workers) shows them from there.
    [part_1] = [key for key, keys in captured.items() if keys == ["part_1"]]
    shown = gql.captured_logs([run_id, "compute_logs", part_1])
    assert "part_1: sum 15 in pid" in shown["stdout"] and "part_1: to stderr" in shown["stderr"]

    # The daemon's queued-run coordinator and run monitoring are running,
    daemons = gql.daemons()
    assert daemons["QUEUED_RUN_COORDINATOR"]["healthy"] and daemons["MONITORING"]["healthy"], daemons
    # Every server of the deployment (webserver, daemon, their code servers, workers, step children)
    # listens on loopback only: code servers use Unix sockets, workers serve no port by default.
    groups = {service.proc.pid for service in topology.services} | {w.pid for w in topology.workers}
    listening = listening_sockets(groups)
    assert ("127.0.0.1", topology.webserver_port) in listening
    assert all(address in ("127.0.0.1", "::1") for address, _ in listening), listening
    # And every message was deleted once handled.
    wait_for(lambda: queues_drained(topology.endpoint), timeout=30, interval=0.5, what="the queues to drain")
    print(f"fan_out: SUCCESS in {elapsed:.1f} s from launchRun")


def test_run_terminated_through_graphql_ends_canceled_with_its_running_step_killed(topology):
    gql, instance = topology.graphql, topology.instance
    run_id, _ = gql.launch_run(LOCATION, "long_sleep", run_config(sleeper={"seconds": 120}))

    def sleeper_pid():
        for record in instance.all_logs(run_id):
            match = re.search(r"sleeper started in pid (\d+)", record.user_message or "")
            if match:
                return int(match.group(1))
        return None

    pid = wait_for(sleeper_pid, timeout=120, interval=0.5, what="the sleeper step to start on a worker")
    assert pid_alive(pid)
    worker = step_reports(instance, run_id)["sleeper"].worker
    assert worker in {w.full_name for w in topology.workers}

    asked = time.monotonic()
    gql.terminate_run(run_id)  # TaskiqRunLauncher.terminate, in the webserver
    assert gql.run(run_id)["status"] in ("CANCELING", "CANCELED")
    run = gql.wait_finished(run_id, timeout=60)
    took = time.monotonic() - asked

    assert run["status"] == "CANCELED", [w.log() for w in topology.workers]
    assert took < 30
    # The step's process was killed (not left sleeping), the step did not succeed, nothing ran after it.
    wait_for(lambda: not pid_alive(pid), timeout=15, what=f"the sleeper's process {pid} to be killed")
    reports = step_reports(instance, run_id)
    assert reports["sleeper"].status != "SUCCESS"
    assert "after_sleeper" not in reports or reports["after_sleeper"].status == "NOT RUN"
    assert not events(instance, run_id, DagsterEventType.STEP_SUCCESS)
    [w] = [w for w in topology.workers if w.full_name == worker]
    assert f"killing step sleeper (attempt 1) of run {run_id} (pid {pid})" in w.log()
    # The launch and the step messages were all deleted: nothing is left to run again.
    wait_for(lambda: queues_drained(topology.endpoint), timeout=30, interval=0.5, what="the queues to drain")
    print(f"long_sleep: CANCELED {took:.1f} s after terminateRun")
