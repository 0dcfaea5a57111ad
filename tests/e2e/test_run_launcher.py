"""TaskiqRunLauncher with a real instance (temp DAGSTER_HOME), real workers, and runs launched the
way the webserver and daemon launch them (`dagster job launch`, run monitoring)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus, reconstructable

from dagster_taskiq_sync import TaskiqRunLauncher
from dagster_taskiq_sync.errors import ConfigError
from dagster_taskiq_sync.orchestrator.launcher import TASK_ID_TAG
from dagster_taskiq_sync.storage.run_report import step_reports
from dagster_taskiq_sync.wire.time_limits import HARD_TAG, SOFT_TAG

from .. import jobs
from ..helpers import CLI, WorkerProcess, marker_lines, pid_alive, queue_counts, run_cli, wait_for

ROOT = Path(__file__).resolve().parents[2]
JOBS = str(ROOT / "tests" / "jobs.py")
BIN = Path(CLI).parent


@pytest.fixture(scope="module")
def launcher_home(endpoint, tmp_path_factory):
    """A DAGSTER_HOME whose dagster.yaml launches runs on queue `runs` and monitors them."""
    home = tmp_path_factory.mktemp("launcher_home")
    (home / "dagster.yaml").write_text(
        yaml.safe_dump(
            {
                "telemetry": {"enabled": False},
                "run_launcher": {
                    "module": "dagster_taskiq_sync",
                    "class": "TaskiqRunLauncher",
                    "config": {
                        "broker": endpoint.broker_url,
                        "default_queue": "runs",
                        "config_source": {"broker_transport_options": {"region": "us-east-1", "wait_time_seconds": 1}},
                        "worker_lost_timeout": 5,
                    },
                },
                "run_monitoring": {"enabled": True, "max_resume_run_attempts": 1, "poll_interval_seconds": 1},
                # Launch on submit (the daemon's queued coordinator would call the launcher the same way).
                "run_coordinator": {"module": "dagster.core.run_coordinator", "class": "DefaultRunCoordinator"},
            }
        )
    )
    cfg = home / "runs.yaml"
    # A short visibility timeout: a killed worker's message reappears (and is dropped) quickly.
    cfg.write_text(
        yaml.safe_dump(
            {
                "execution": {
                    "config": {
                        "broker": endpoint.broker_url,
                        "config_source": {
                            "task_default_queue": "runs",
                            "broker_transport_options": {"wait_time_seconds": 1, "visibility_timeout": 2},
                        },
                    }
                }
            }
        )
    )
    out = run_cli("queues", "create", "-y", str(cfg), "-q", "launched-steps")
    assert out.returncode == 0, out.stderr
    return home


@pytest.fixture
def step_worker(launcher_home, tmp_path):
    """A worker for the steps of launched runs (queue launched-steps), on the launcher's instance:
    workers only run steps of runs in their own DAGSTER_HOME."""
    worker = WorkerProcess(
        launcher_home / "runs.yaml",
        "steps",
        tmp_path,
        ["-q", "launched-steps", "-c", "2"],
        env=os.environ | {"DAGSTER_HOME": str(launcher_home)},
    ).wait_ready()
    yield worker
    assert worker.stop() == 0


def steps_config(executor_config):
    """The executor config of a launched run whose steps go to the step worker's queue."""
    source = executor_config.get("config_source") or {}
    return {**executor_config, "config_source": {**source, "task_default_queue": "launched-steps"}}


@pytest.fixture(scope="module")
def launcher_instance(launcher_home):
    with DagsterInstance.from_config(str(launcher_home)) as instance:
        assert isinstance(instance.run_launcher, TaskiqRunLauncher)
        yield instance


class SharedRunner:
    """The module's run worker (queue runs) for the tests that do not kill it: started once, and
    stopped before a test starts run workers of its own, so that those are the only ones on the
    queue."""

    def __init__(self, launcher_home: Path, log_dir: Path) -> None:
        self.home, self.log_dir, self.worker = launcher_home, log_dir, None

    def get(self) -> WorkerProcess:
        if self.worker is None:
            self.worker = WorkerProcess(
                self.home / "runs.yaml",
                "runner",
                self.log_dir,
                ["-q", "runs", "-c", "2", "--heartbeat-interval", "0.5"],
                env=os.environ | {"DAGSTER_HOME": str(self.home)},
            ).wait_ready()
        return self.worker

    def stop(self) -> None:
        worker, self.worker = self.worker, None
        if worker is not None:
            assert worker.stop() == 0, worker.log()


@pytest.fixture(scope="module")
def shared_runner(launcher_home, tmp_path_factory):
    shared = SharedRunner(launcher_home, tmp_path_factory.mktemp("runner"))
    yield shared
    shared.stop()


@pytest.fixture
def runner(shared_runner) -> WorkerProcess:
    return shared_runner.get()


@pytest.fixture
def run_worker(launcher_home, tmp_path, shared_runner):
    shared_runner.stop()  # the test's own run workers are the only ones on queue runs
    started = []

    def start(name: str) -> WorkerProcess:
        worker = WorkerProcess(
            launcher_home / "runs.yaml",
            name,
            tmp_path,
            ["-q", "runs", "-c", "2", "--heartbeat-interval", "0.5"],
            env=os.environ | {"DAGSTER_HOME": str(launcher_home)},
        )
        started.append(worker.wait_ready())
        return worker

    yield start
    for worker in started:
        if worker.proc.poll() is None:
            worker.stop()


def launch(launcher_home, instance, job_name: str, run_config: dict | None = None, tmp_path: Path | None = None):
    """`dagster job launch`, as a user or the webserver would; returns the new run's id."""
    before = {r.run_id for r in instance.get_runs()}
    cmd = [str(BIN / "dagster"), "job", "launch", "-f", JOBS, "-j", job_name]
    if run_config:
        cfg = (tmp_path or launcher_home) / f"{job_name}-config.yaml"
        cfg.write_text(yaml.safe_dump(run_config))
        cmd += ["-c", str(cfg)]
    out = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=os.environ | {"DAGSTER_HOME": str(launcher_home)},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    [run_id] = [r.run_id for r in instance.get_runs() if r.run_id not in before]
    return run_id


def wait_finished(instance, run_id, timeout=60):
    return wait_for(
        lambda: (r := instance.get_run_by_id(run_id)) and r.is_finished and r,
        timeout=timeout,
        what=f"run {run_id} to finish",
    )


def monitor_until_finished(instance, run_id, timeout):
    """Run the daemon's run-monitoring check on the run (as `dagster-daemon` does every poll)
    until the run is finished."""
    from dagster._daemon.monitoring.run_monitoring import monitor_started_run

    def step():
        for record in instance.get_run_records():
            if record.dagster_run.run_id == run_id and record.dagster_run.status == DagsterRunStatus.STARTED:
                monitor_started_run(instance, None, record, logging.getLogger("run-monitoring"))
        run = instance.get_run_by_id(run_id)
        return run.is_finished and run

    return wait_for(step, timeout=timeout, interval=0.5, what=f"run monitoring to finish run {run_id}")


def messages(instance, run_id) -> str:
    return "\n".join(
        (r.dagster_event.message if r.dagster_event else r.user_message) or "" for r in instance.all_logs(run_id)
    )


@pytest.mark.compat
def test_launched_run_succeeds_on_a_worker(launcher_home, launcher_instance, runner):
    worker = runner
    run_id = launch(launcher_home, launcher_instance, "launched_ok")
    run = wait_finished(launcher_instance, run_id)

    assert run.status == DagsterRunStatus.SUCCESS
    text = messages(launcher_instance, run_id)
    assert "Sent run to SQS queue 'runs' (launch)" in text
    assert f"Run picked up by worker {worker.full_name}" in text
    launcher = launcher_instance.run_launcher
    wait_for(
        lambda: launcher.check_run_worker_health(launcher_instance.get_run_by_id(run_id)).status.value == "SUCCESS",
        what="the worker to record the run process's exit",
    )
    info = launcher.get_run_worker_debug_info(launcher_instance.get_run_by_id(run_id))
    assert worker.full_name in info and "queue runs" in info and "exit code 0" in info
    assert run.tags[TASK_ID_TAG]


def test_launched_run_that_raises_fails_with_the_error(launcher_home, launcher_instance, runner):
    run_id = launch(launcher_home, launcher_instance, "launched_raises")
    run = wait_finished(launcher_instance, run_id)
    assert run.status == DagsterRunStatus.FAILURE
    failures = [
        r
        for r in launcher_instance.all_logs(run_id)
        if r.dagster_event and r.dagster_event.event_type_value == "STEP_FAILURE"
    ]
    assert "run went wrong 7" in failures[0].dagster_event.step_failure_data.error.cause.message


@pytest.mark.slow
def test_run_process_exiting_hard_is_failed_by_run_monitoring(launcher_home, launcher_instance, runner):
    run_id = launch(launcher_home, launcher_instance, "launched_exits_hard")
    launcher = launcher_instance.run_launcher
    wait_for(
        lambda: launcher.check_run_worker_health(launcher_instance.get_run_by_id(run_id)).status.value == "FAILED",
        what="the hard exit to show in the worker's health",
    )
    health = launcher.check_run_worker_health(launcher_instance.get_run_by_id(run_id))
    assert "exit code 3" in health.msg

    # Dagster's run monitoring (the daemon's own function) resumes it once, then fails it.
    run = monitor_until_finished(launcher_instance, run_id, timeout=60)
    assert run.status == DagsterRunStatus.FAILURE
    assert "exit code 3" in messages(launcher_instance, run_id)


def test_terminate_stops_the_run_process_and_the_run_ends_canceled(launcher_home, launcher_instance, runner, tmp_path):
    worker = runner
    markers = tmp_path / "m"
    markers.mkdir()
    run_id = launch(
        launcher_home,
        launcher_instance,
        "launched_long",
        {"ops": {"run_long": {"config": {"marker_dir": str(markers), "sleep": 60}}}},
        tmp_path,
    )
    wait_for(lambda: marker_lines(markers, "run_long"), what="the op to start")
    pid = int(marker_lines(markers, "run_long")[0].split()[1])

    asked = time.monotonic()
    assert launcher_instance.run_launcher.terminate(run_id)
    run = wait_finished(launcher_instance, run_id, timeout=30)

    assert run.status == DagsterRunStatus.CANCELED
    assert time.monotonic() - asked < 10
    # The run process marks its run CANCELED itself, then exits
    wait_for(lambda: not pid_alive(pid), timeout=10, what="the run process to exit")
    assert marker_lines(markers, "run_long") == [f"start {pid}"]
    assert worker.proc.poll() is None and "cancel requested: the run was terminated" in worker.log()


def launch_in_process(instance, job_def, run_config: dict, tags: dict) -> str:
    """Launch a run of ``job_def`` (tests/jobs.py) with ``tags`` from this process, as the
    webserver does through the instance (no `dagster job launch` interpreter)."""
    run = instance.create_run_for_job(
        job_def=job_def,
        run_config=run_config,
        tags=tags,
        job_code_origin=reconstructable(job_def).get_python_origin(),
    )
    instance.launch_run(run.run_id, workspace=None)
    return run.run_id


def test_a_launched_runs_time_limits_interrupt_it_then_kill_it_naming_the_limit(launcher_instance, runner, tmp_path):
    # Given two runs launched at once on one worker, with time limits as run tags: one with a 3 s
    # soft limit whose op cleans up when interrupted, one with 3 s soft and 5 s hard whose op ignores it
    soft_dir, hard_dir = tmp_path / "soft", tmp_path / "hard"
    soft_dir.mkdir()
    hard_dir.mkdir()
    soft_id = launch_in_process(
        launcher_instance,
        jobs.launched_cleans_up,
        {"ops": {"run_cleans_up": {"config": {"marker_dir": str(soft_dir), "sleep": 60}}}},
        {SOFT_TAG: "3"},
    )
    hard_id = launch_in_process(
        launcher_instance,
        jobs.launched_ignores_interrupts,
        {"ops": {"run_ignores_interrupts": {"config": {"marker_dir": str(hard_dir), "sleep": 60}}}},
        {SOFT_TAG: "3", HARD_TAG: "5"},
    )

    # Then the first run failed at its soft limit, saying which, and its op was interrupted and cleaned up
    soft_said = f"Run {soft_id} exceeded its soft time limit of 3 s, set by run tag {SOFT_TAG}, and was interrupted."
    wait_for(lambda: "cleaned up" in marker_lines(soft_dir, "run_cleans_up"), timeout=30, what="the op's cleanup")
    run = wait_finished(launcher_instance, soft_id)
    assert run.status == DagsterRunStatus.FAILURE
    [failure] = launcher_instance.all_logs(soft_id, of_type=DagsterEventType.RUN_FAILURE)
    assert failure.dagster_event.message == soft_said
    # and the second one failed at its soft limit too, which its op ignored, and its process was killed
    # at the hard limit, which its log names
    hard_said = (
        f"Run {hard_id} exceeded its hard time limit of 5 s, set by run tag {HARD_TAG}, and its process was killed."
    )
    wait_for(lambda: hard_said in messages(launcher_instance, hard_id), timeout=30, what="the hard limit's kill")
    start, ignored = marker_lines(hard_dir, "run_ignores_interrupts")
    assert ignored == "ignored"
    wait_for(lambda: not pid_alive(int(start.split()[1])), timeout=10, what="the run process to be gone")
    assert launcher_instance.get_run_by_id(hard_id).status == DagsterRunStatus.FAILURE
    assert f"Run {hard_id} exceeded its soft time limit of 3 s" in messages(launcher_instance, hard_id)
    assert "exceeded its hard time limit of 5 s, set by run tag" in runner.log()


def test_a_bad_run_limit_tag_fails_the_launch_naming_the_tag_and_the_run(launcher_instance, tmp_path):
    # Given a run tagged dagster-taskiq/time_limit=soon
    with pytest.raises(ConfigError):
        launch_in_process(
            launcher_instance,
            jobs.launched_long,
            {"ops": {"run_long": {"config": {"marker_dir": str(tmp_path)}}}},
            {HARD_TAG: "soon"},
        )
    # Then its launch failed, and so did the run, with one sentence in its log naming the tag and the run
    [run] = launcher_instance.get_runs(limit=1)
    assert run.status == DagsterRunStatus.FAILURE and TASK_ID_TAG not in run.tags  # nothing was sent
    assert (
        f"tag {HARD_TAG}='soon' on run {run.run_id} must be a positive number of seconds (for example '300' or "
        "'1.5'); fix the tag." in messages(launcher_instance, run.run_id)
    )


@pytest.mark.slow
@pytest.mark.compat
def test_run_with_taskiq_executor_fans_its_steps_out_to_workers(
    launcher_home, launcher_instance, runner, step_worker, executor_config
):
    # The launched run orchestrates; its steps go to queue `launched-steps`, served by another worker.
    run_id = launch(
        launcher_home, launcher_instance, "diamond", {"execution": {"config": steps_config(executor_config)}}
    )
    run = wait_finished(launcher_instance, run_id)
    assert run.status == DagsterRunStatus.SUCCESS
    reports = step_reports(launcher_instance, run_id)
    assert {r.worker for r in reports.values()} == {step_worker.full_name}
    assert all(r.status == "SUCCESS" for r in reports.values()) and len(reports) == 4


@pytest.mark.slow
def test_run_is_resumed_on_another_worker_after_its_worker_is_killed(
    launcher_home, launcher_instance, run_worker, step_worker, executor_config, tmp_path, endpoint
):
    markers = tmp_path / "m"
    markers.mkdir()
    first = run_worker("first")
    ops = {
        name: {"config": {"marker_dir": str(markers), "sleep": sleep}}
        for name, sleep in (("first_part", 0.1), ("second_part", 4))
    }
    run_id = launch(
        launcher_home,
        launcher_instance,
        "resumable",
        {"execution": {"config": steps_config(executor_config)}, "ops": ops},
        tmp_path,
    )
    # When the worker running the run (its orchestrator) dies while a step runs elsewhere
    wait_for(lambda: marker_lines(markers, "second_part"), timeout=60, what="the second step to start")
    os.kill(first.pid, signal.SIGKILL)
    run_worker("second")

    # Then Dagster's run monitoring sees the lost worker and resumes the run on the other worker
    run = monitor_until_finished(launcher_instance, run_id, timeout=90)
    assert run.status == DagsterRunStatus.SUCCESS
    text = messages(launcher_instance, run_id)
    assert "Resuming run" in text and "Run resumed by worker second" in text
    # and no step's user code ran twice
    assert [line.split()[0] for line in marker_lines(markers, "first_part")] == ["start", "end"]
    assert [line.split()[0] for line in marker_lines(markers, "second_part")] == ["start", "end"]
    wait_for(lambda: queue_counts(endpoint.url, "runs") == (0, 0), timeout=20, what="queue runs to drain")


@pytest.mark.slow
def test_a_resumed_run_says_why_its_lost_step_is_not_run_again(
    launcher_home, launcher_instance, run_worker, executor_config, tmp_path, endpoint
):
    # Given a launched run whose second step runs on a step worker
    markers = tmp_path / "m"
    markers.mkdir()
    first = run_worker("orchestrating")
    env = os.environ | {"DAGSTER_HOME": str(launcher_home)}
    doomed = WorkerProcess(
        launcher_home / "runs.yaml",
        "doomed-steps",
        tmp_path,
        ["-q", "launched-steps", "-c", "1", "--heartbeat-interval", "0.5"],
        env=env,
    ).wait_ready()
    ops = {
        name: {"config": {"marker_dir": str(markers), "sleep": sleep}}
        for name, sleep in (("first_part", 0.1), ("second_part", 60))
    }
    config = {**steps_config(executor_config), "worker_lost_timeout": 5, "health_check_interval": 1}
    run_id = launch(
        launcher_home, launcher_instance, "resumable", {"execution": {"config": config}, "ops": ops}, tmp_path
    )
    wait_for(lambda: marker_lines(markers, "second_part"), timeout=60, what="the second step to start")
    # When both the run's worker and the step's worker die, and new workers come
    os.kill(doomed.pid, signal.SIGKILL)
    os.kill(first.pid, signal.SIGKILL)
    run_worker("resuming")
    replacement = WorkerProcess(
        launcher_home / "runs.yaml", "replacement-steps", tmp_path, ["-q", "launched-steps", "-c", "1"], env=env
    ).wait_ready()
    try:
        # Then run monitoring resumes the run, which re-sends the lost step attempt; the worker does not
        # run it again and says so in the run's own log, naming the step and why
        run = monitor_until_finished(launcher_instance, run_id, timeout=120)
        text = messages(launcher_instance, run_id)
        assert "Resuming run" in text
        assert "Step second_part is not run again" in text and "(lost)" in text
        assert run.status == DagsterRunStatus.FAILURE
        assert [line.split()[0] for line in marker_lines(markers, "second_part")] == ["start"]  # never twice
    finally:
        assert replacement.stop() == 0
