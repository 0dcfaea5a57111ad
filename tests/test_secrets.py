"""No secret travels in a step message or shows up in logs and events."""

from __future__ import annotations

import pytest

import os
import subprocess
from pathlib import Path

import yaml
from dagster import DagsterInstance
from dagster._serdes import serialize_value

from dagster_taskiq_sync.secrets import REDACTED, redact_instance_ref

from . import jobs
from .helpers import CLI, BackgroundRun, WorkerProcess, queue_counts, sqs_client, wait_for

ROOT = Path(__file__).resolve().parent.parent
INSTANCE_TOKEN = "tok-hunter2-INSTANCE-SECRET"
BROKER_SECRET = "broker-hunter2-SECRET"


@pytest.mark.slow
def test_secrets_stay_out_of_messages_logs_and_events(endpoint, tmp_path):
    # Given an instance whose dagster.yaml holds a token, and a broker URL with a secret key
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump({
        "telemetry": {"enabled": False},
        "compute_logs": {"module": "tests.secret_logs", "class": "TokenComputeLogManager",
                         "config": {"base_dir": str(home / "logs"), "api_token": INSTANCE_TOKEN}},
    }))
    config = {
        "broker": f"sqs://AKIDEXAMPLE:{BROKER_SECRET}@127.0.0.1:{endpoint.port}",
        "config_source": {"task_default_queue": "secrets", "broker_transport_options": {"wait_time_seconds": 1}},
    }
    cfg = tmp_path / "secrets.yaml"
    cfg.write_text(yaml.safe_dump({"execution": {"config": config}}))
    out = subprocess.run([CLI, "queues", "create", "-y", str(cfg)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert BROKER_SECRET not in out.stdout + out.stderr

    with DagsterInstance.from_config(str(home)) as instance:
        assert INSTANCE_TOKEN in serialize_value(instance.get_ref())  # the reference itself has it

        # When a run sends its first step (no worker yet, so the message waits for us to read)
        run = BackgroundRun(jobs.diamond, instance, {"execution": {"config": config}})
        client = sqs_client(endpoint.url)
        url = client.get_queue_url(QueueName="secrets")["QueueUrl"]
        wait_for(lambda: queue_counts(endpoint.url, "secrets")[0] >= 1, what="the first step message")
        bodies = [m["Body"] for m in client.receive_message(QueueUrl=url, MaxNumberOfMessages=10,
                                                            VisibilityTimeout=0).get("Messages", [])]
        # Then the raw message has the instance reference without the token
        assert bodies and all(INSTANCE_TOKEN not in b and BROKER_SECRET not in b for b in bodies)
        assert any(REDACTED in b for b in bodies)

        # and a worker with its own DAGSTER_HOME runs the steps
        env = os.environ | {"DAGSTER_HOME": str(home), "PYTHONPATH": str(ROOT)}
        worker = WorkerProcess(cfg, "secretive", tmp_path, ["-q", "secrets", "-c", "2"], env=env).wait_ready()
        try:
            result = run.wait(60)
            assert result.success
            # and neither secret is in the worker's log or the run's events
            assert INSTANCE_TOKEN not in worker.log() and BROKER_SECRET not in worker.log()
            logs = serialize_value(list(instance.all_logs(result.run_id)))
            assert INSTANCE_TOKEN not in logs and BROKER_SECRET not in logs
            assert "AKIDEXAMPLE" not in worker.log()
        finally:
            assert worker.stop() == 0


def test_redaction_keeps_env_references_and_hides_url_passwords(tmp_path):
    from dagster._core.instance.ref import InstanceRef
    from dagster._serdes import ConfigurableClassData

    def with_storage(config: dict):
        ref = InstanceRef.from_dir(str(tmp_path))
        return ref._replace(storage_data=ConfigurableClassData("dagster_postgres", "DagsterPostgresStorage", yaml.safe_dump(config)))

    by_env = with_storage({"postgres_db": {"username": "dagster", "password": {"env": "PG_PASSWORD"}, "hostname": "db"}})
    redacted, changed = redact_instance_ref(by_env)
    assert not changed and redacted == by_env  # an env reference is a name, not a secret

    inline = with_storage({"postgres_db": {"username": "dagster", "password": "pg-SECRET-1", "hostname": "db"}})
    redacted, changed = redact_instance_ref(inline)
    assert changed and "pg-SECRET-1" not in serialize_value(redacted) and REDACTED in serialize_value(redacted)

    url = with_storage({"postgres_url": "postgresql://dagster:pg-SECRET-2@db:5432/d"})
    redacted, changed = redact_instance_ref(url)
    assert changed and "pg-SECRET-2" not in serialize_value(redacted)
    assert "postgresql://dagster:***@db:5432/d" in serialize_value(redacted)
