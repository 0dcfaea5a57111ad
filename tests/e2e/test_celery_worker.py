"""A real ``celery -A proj worker`` that also serves Dagster's step queues (the README's recipe, as
pasted): Celery's broker is a Redis on loopback started here, Dagster's queues are on the session's
local SQS endpoint. Both workloads run at once; a warm shutdown loses nothing, a cold one kills."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from benchmarks.services import ServiceError, Services, redis_server
from dagster_taskiq_sync.ops.local_endpoint import free_port

from .. import celery_host_jobs
from ..helpers import CLI, BackgroundRun, pid_alive, queue_counts, run_cli, wait_for
from ..topology import die_with_parent

celery = pytest.importorskip("celery", reason="Celery is not installed (pip install 'dagster-taskiq-sync[celery]')")

ROOT = Path(__file__).resolve().parents[2]
QUEUE = "celery_steps"
CELERY = Path(sys.executable).parent / "celery"
# Appended to the README's proj.py: a result backend, and a task that must overlap a Dagster step.
TEST_TASKS = """
app.conf.result_backend = {backend!r}


@app.task(name="proj.meet")
def meet(marker_dir):
    import os, pathlib, time

    markers = pathlib.Path(marker_dir)
    (markers / "task-started").write_text(str(os.getpid()))
    deadline = time.monotonic() + 60
    while not (markers / "step.jsonl").exists():  # the Dagster step, running at the same time
        if time.monotonic() > deadline:
            raise TimeoutError("no Dagster step ran while this task ran")
        time.sleep(0.05)
    return os.getpid()
"""


def readme_recipe() -> str:
    """The README's Celery recipe, as a user would paste it into proj.py."""
    section = (ROOT / "README.md").read_text().split("#### In a Celery worker", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def write_proj(home: Path, redis_url: str, queue: str, port: int) -> None:
    """proj.py: the README's recipe for this Redis, queue and metrics port, plus the test's task."""
    recipe = readme_recipe()
    for old, new in (
        ("redis://localhost:6379/0", f"{redis_url}/0"),
        ('queues=["dagster"]', f'queues=["{queue}"]'),
        ("metrics_port=9090", f"metrics_port={port}"),
    ):
        assert old in recipe, f"the README's recipe no longer says {old}"
        recipe = recipe.replace(old, new)
    (home / "proj.py").write_text(recipe + TEST_TASKS.format(backend=f"{redis_url}/1"))


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    services = Services(tmp_path_factory.mktemp("redis"))
    try:
        yield redis_server(services)  # no persistence, 127.0.0.1, dies with this process
    except ServiceError as exc:
        pytest.fail(str(exc))
    finally:
        services.close()


@pytest.fixture(scope="module")
def proj(endpoint, redis_url, tmp_path_factory) -> dict:
    """A Celery project directory: run_config.yaml (queues created) and the README's proj.py."""
    home = tmp_path_factory.mktemp("proj")
    config = {
        "broker": endpoint.broker_url,
        "config_source": {"task_default_queue": QUEUE, "broker_transport_options": {"wait_time_seconds": 1}},
        "health_check_interval": 1,  # the orchestrator sees a killed step within a second
    }
    (home / "run_config.yaml").write_text(yaml.safe_dump({"execution": {"config": config}}))
    out = subprocess.run(
        [CLI, "queues", "create", "-y", "run_config.yaml"], cwd=home, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    port = free_port()
    write_proj(home, redis_url, QUEUE, port)
    client = celery.Celery("client", broker=f"{redis_url}/0", backend=f"{redis_url}/1")
    yield {"home": home, "executor": config, "port": port, "client": client}
    client.close()


class CeleryWorker:
    """``celery -A proj worker`` started the way a user starts it, in the project directory."""

    def __init__(self, home: Path, name: str) -> None:
        self.log_path = home / f"celery-{name}.log"
        self.node = f"{name}@{os.uname().nodename}"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [CELERY, "-A", "proj", "worker", "-l", "INFO", "-c", "1", "-n", self.node],
                cwd=home,
                env={**os.environ, "PYTHONPATH": str(ROOT)},  # for tests.celery_host_jobs in step children
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=die_with_parent,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self) -> CeleryWorker:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"celery exited at start ({self.proc.returncode}):\n{self.log()}")
            return " ready." in self.log()

        wait_for(ready, timeout=120, what="the Celery worker to be ready")
        assert f"worker {self.node} ready: " in self.log()  # the Dagster worker started before Celery's consumer
        return self

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def probe(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def steps_run(markers: Path) -> list[dict]:
    path = markers / "step.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def meeting_run(instance, proj: dict, markers: Path, wait_for_file: str) -> BackgroundRun:
    run_config = {
        "execution": {"config": proj["executor"]},
        "ops": {"meet": {"config": {"marker_dir": str(markers), "wait_for": wait_for_file}}},
    }
    return BackgroundRun(celery_host_jobs.meeting, instance, run_config)


def test_a_celery_worker_serves_its_tasks_and_dagster_steps_at_once_and_drains_on_sigterm(
    endpoint, instance, proj, tmp_path
):
    worker = CeleryWorker(proj["home"], "both")
    try:
        worker.wait_ready()
        # Given a Celery worker serving both, a Celery task and a Dagster step that wait for each other
        together = tmp_path / "together"
        together.mkdir()
        assert proj["client"].send_task("proj.add", (2, 3)).get(timeout=60) == 5
        task = proj["client"].send_task("proj.meet", (str(together),))
        run = meeting_run(instance, proj, together, "task-started")
        # Then both succeed, each in the Celery worker's process tree
        task_pid = task.get(timeout=90)
        result = run.wait(90)
        assert result.success
        [step] = steps_run(together)
        assert worker.proc.pid in celery_host_jobs.ancestors(task_pid)  # a pool child
        assert worker.proc.pid in step["ancestors"] and step["pid"] != task_pid
        # and Celery's inspect and the metrics port show the Dagster worker ready
        [stats] = proj["client"].control.inspect(destination=[worker.node], timeout=5).stats().values()
        assert stats["dagster_taskiq_sync"]["ready"] is True and stats["dagster_taskiq_sync"]["queues"] == [QUEUE]
        assert probe(proj["port"], "/readyz") == 200 and probe(proj["port"], "/livez") == 200

        # When a step runs and Celery gets SIGTERM (warm shutdown)
        held = tmp_path / "held"
        held.mkdir()
        run = meeting_run(instance, proj, held, "release")
        wait_for(lambda: steps_run(held), timeout=60, what="the held step to start")
        worker.proc.send_signal(signal.SIGTERM)
        # Then the worker drains: not ready, still running the step, not exiting
        wait_for(lambda: probe(proj["port"], "/readyz") == 503, what="/readyz to say draining")
        assert worker.proc.poll() is None and "Warm shutdown" in worker.log()
        (held / "release").touch()
        # and the step finishes, the run succeeds, nothing is left on the queue, celery exits 0
        result = run.wait(60)
        assert result.success, worker.log()
        assert worker.proc.wait(60) == 0, worker.log()
        assert len(steps_run(held)) == 1
        assert queue_counts(endpoint.url, QUEUE) == (0, 0)
        assert f"worker {worker.node} stopped after running 2 step(s)" in worker.log()
    finally:
        worker.close()


def test_worker_terminate_drains_the_celery_worker_and_a_cold_shutdown_then_kills_the_running_step(
    endpoint, instance, proj, tmp_path
):
    # Given a step running in a Celery worker
    worker = CeleryWorker(proj["home"], "cold")
    try:
        worker.wait_ready()
        run = meeting_run(instance, proj, tmp_path, "never")
        wait_for(lambda: steps_run(tmp_path), timeout=60, what="the step to start")
        [step] = steps_run(tmp_path)
        # When `worker terminate` asks its Dagster worker to stop: Celery starts a warm shutdown
        out = run_cli("worker", "terminate", "cold")
        assert out.returncode == 0, out.stderr
        wait_for(lambda: probe(proj["port"], "/readyz") == 503, what="/readyz to say draining")
        assert "asking the Celery worker for a warm shutdown" in worker.log()
        assert pid_alive(step["pid"]) and worker.proc.poll() is None  # the warm shutdown lets it run
        # and then gets a cold shutdown (SIGQUIT)
        worker.proc.send_signal(signal.SIGQUIT)
        # Then the step is killed at once, its run fails saying why, and nothing is left on the queue
        assert_killed_by_cold_shutdown(endpoint, instance, worker, step, run)
    finally:
        worker.close()


def test_a_cold_shutdown_kills_the_running_step_at_once(endpoint, instance, proj, tmp_path):
    # Given a step running in a Celery worker
    worker = CeleryWorker(proj["home"], "quit")
    try:
        worker.wait_ready()
        run = meeting_run(instance, proj, tmp_path, "never")
        wait_for(lambda: steps_run(tmp_path), timeout=60, what="the step to start")
        [step] = steps_run(tmp_path)
        # When Celery gets a cold shutdown (SIGQUIT) with no warm one before it
        worker.proc.send_signal(signal.SIGQUIT)
        # Then the step is killed at once (not after the 60 s shutdown_timeout), its run fails
        # saying why, and nothing is left on the queue
        assert_killed_by_cold_shutdown(endpoint, instance, worker, step, run)
        assert "Cold shutdown" in worker.log()
    finally:
        worker.close()


def assert_killed_by_cold_shutdown(endpoint, instance, worker: CeleryWorker, step: dict, run: BackgroundRun) -> None:
    worker.proc.wait(30)  # well within the 60 s a warm shutdown would give the step; the code is Celery's
    assert not pid_alive(step["pid"])
    result = run.wait(60)
    assert not result.success
    [failure] = [e for e in instance.all_logs(result.run_id) if e.dagster_event and e.dagster_event.is_step_failure]
    assert "killed: cold shutdown of the Celery worker" in failure.dagster_event.step_failure_data.error.message
    assert queue_counts(endpoint.url, QUEUE) == (0, 0)


def test_a_queue_that_does_not_exist_stops_the_celery_worker_at_start_saying_which(proj, redis_url, tmp_path):
    (tmp_path / "run_config.yaml").write_text((proj["home"] / "run_config.yaml").read_text())
    write_proj(tmp_path, redis_url, "nobody_made_this_queue", free_port())
    worker = CeleryWorker(tmp_path, "missing")
    try:
        assert worker.proc.wait(60) != 0
        assert "Unrecoverable error" in worker.log() and "nobody_made_this_queue" in worker.log()
        assert " ready." not in worker.log()  # Celery never started consuming its own tasks either
    finally:
        worker.close()
