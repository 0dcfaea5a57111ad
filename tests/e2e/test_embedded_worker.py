"""The worker as a library: built from the same config the CLI takes, started and stopped by the
process that embeds it, with no signal handlers and no sys.exit."""

from __future__ import annotations

import signal
import subprocess

import yaml
from dagster import execute_job, reconstructable

from dagster_taskiq_sync import Worker, WorkerConfig
from dagster_taskiq_sync.storage.run_report import step_reports

from .. import jobs
from ..helpers import CLI


def test_a_worker_embedded_in_this_process_runs_a_job(endpoint, instance, tmp_path):
    config = {
        "broker": endpoint.broker_url,
        "config_source": {"task_default_queue": "embedded", "broker_transport_options": {"wait_time_seconds": 1}},
    }
    path = tmp_path / "embedded.yaml"
    path.write_text(yaml.safe_dump({"execution": {"config": config}}))
    out = subprocess.run([CLI, "queues", "create", "-y", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    worker_config = WorkerConfig.from_yaml(str(path), queues=["embedded"], name="embedded", concurrency=2)
    with Worker(worker_config, instance=instance) as worker:
        assert worker.ready() == (True, "ok") and worker.live() == (True, "ok")
        assert {sig: signal.getsignal(sig) for sig in handlers} == handlers  # none installed
        with execute_job(
            reconstructable(jobs.diamond), instance=instance, run_config={"execution": {"config": config}}
        ) as result:
            assert result.success
    # leaving the block stopped it in order (no sys.exit: we are still here)
    assert worker.steps_done == 4 and worker.ready() == (False, "draining")
    assert {r.worker for r in step_reports(instance, result.run_id).values()} == {worker.name}
