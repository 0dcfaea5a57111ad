"""No secret travels in a message or shows up in logs and events.

Messages carry no instance configuration at all (workers use their own DAGSTER_HOME), so nothing
has to be redacted and nothing can slip through a redaction blocklist. The sentinels below are the
shapes the old blocklist missed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from dagster import DagsterInstance
from dagster._serdes import serialize_value

from .. import jobs
from ..helpers import BackgroundRun, WorkerProcess, queue_counts, run_cli, sqs_client, wait_for

ROOT = Path(__file__).resolve().parents[2]
BROKER_SECRET = "broker-hunter2-SECRET"
SENTINELS = {
    "pwd": "pwd-SENTINEL-1",
    "apikey": "apikey-SENTINEL-2",
    "privateKey": "privkey-SENTINEL-3",
    "headers": {"Authorization": "Bearer auth-SENTINEL-4"},
    "dsn": "host=db password=dsn-SENTINEL-5 user=dagster",
    "url_with_slash": "postgresql://dagster:pa/ss-SENTINEL-6@db:5432/d",
    "url_with_token": "https://logs.example.com/upload?token=tok-SENTINEL-7",
    "env": ["DB_PASSWORD=envlist-SENTINEL-8"],
}
MARKS = [f"SENTINEL-{i}" for i in range(1, 9)] + [BROKER_SECRET]


@pytest.mark.slow
def test_secrets_stay_out_of_messages_logs_and_events(endpoint, tmp_path):
    # Given an instance whose dagster.yaml holds secrets of every shape, and a broker URL with a secret key
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text(
        yaml.safe_dump(
            {
                "telemetry": {"enabled": False},
                "compute_logs": {
                    "module": "tests.secret_logs",
                    "class": "TokenComputeLogManager",
                    "config": {"base_dir": str(home / "logs"), **SENTINELS},
                },
            }
        )
    )
    config = {
        "broker": f"sqs://AKIDEXAMPLE:{BROKER_SECRET}@127.0.0.1:{endpoint.port}",
        "config_source": {"task_default_queue": "secrets", "broker_transport_options": {"wait_time_seconds": 1}},
    }
    cfg = tmp_path / "secrets.yaml"
    cfg.write_text(yaml.safe_dump({"execution": {"config": config}}))
    out = run_cli("queues", "create", "-y", str(cfg))
    assert out.returncode == 0, out.stderr
    assert BROKER_SECRET not in out.stdout + out.stderr

    with DagsterInstance.from_config(str(home)) as instance:
        ref = serialize_value(instance.get_ref())
        assert all(mark in ref for mark in MARKS[:-1])  # the instance reference itself has them all

        # When a run sends its first step (no worker yet, so the message waits for us to read)
        run = BackgroundRun(jobs.diamond, instance, {"execution": {"config": config}})
        client = sqs_client(endpoint.url)
        url = client.get_queue_url(QueueName="secrets")["QueueUrl"]
        wait_for(lambda: queue_counts(endpoint.url, "secrets")[0] >= 1, what="the first step message")
        messages = client.receive_message(
            QueueUrl=url, MaxNumberOfMessages=10, VisibilityTimeout=0, MessageAttributeNames=["All"]
        ).get("Messages", [])
        # Then the raw message names a run, a step and an attempt, and nothing else
        assert messages
        for message in messages:
            raw = json.dumps(message)
            assert not [mark for mark in MARKS if mark in raw]
            kwargs = json.loads(message["Body"])["kwargs"]
            assert set(kwargs) == {"version", "run_id", "step_key", "attempt", "known_state"}

        # and a worker with its own DAGSTER_HOME runs the steps
        env = os.environ | {"DAGSTER_HOME": str(home), "PYTHONPATH": str(ROOT)}
        worker = WorkerProcess(cfg, "secretive", tmp_path, ["-q", "secrets", "-c", "2"], env=env).wait_ready()
        try:
            result = run.wait(60)
            assert result.success
            # and no secret is in the worker's log or the run's events
            log = worker.log()
            assert not [mark for mark in MARKS if mark in log] and "AKIDEXAMPLE" not in log
            events = serialize_value(list(instance.all_logs(result.run_id)))
            assert not [mark for mark in MARKS if mark in events]
        finally:
            assert worker.stop() == 0
