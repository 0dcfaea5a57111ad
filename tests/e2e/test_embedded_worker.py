"""The worker as a library: built from the same config the CLI takes, started and stopped by the
process that embeds it, with no signal handlers and no sys.exit; and embedded in hosts whose main
module must never run again in a step child (a plain script, a console-script host)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from dagster import execute_job, reconstructable

from dagster_taskiq_sync import Worker, WorkerConfig
from dagster_taskiq_sync.storage.run_report import step_reports

from .. import jobs
from ..helpers import BackgroundRun, run_cli

ROOT = Path(__file__).resolve().parents[2]
# what pip (distlib) writes for a console_scripts entry point such as `celery` or `gunicorn`
CONSOLE_SCRIPT = """# -*- coding: utf-8 -*-
import re
import sys
from tests.embed_host import main
if __name__ == '__main__':
    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])
    sys.exit(main())
"""


def queue_config(endpoint, path: Path, queue: str) -> dict:
    config = {
        "broker": endpoint.broker_url,
        "config_source": {"task_default_queue": queue, "broker_transport_options": {"wait_time_seconds": 1}},
    }
    path.write_text(yaml.safe_dump({"execution": {"config": config}}))
    out = run_cli("queues", "create", "-y", str(path))
    assert out.returncode == 0, out.stderr
    return config


def exit_status(pid: int, timeout: float) -> int:
    """The wait status of child ``pid``; a child still running after ``timeout`` is killed and fails the test."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"child {pid} did not exit within {timeout} s")


def descendants(pid: int) -> set[int]:
    """Every live process under ``pid`` (from /proc)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parents[int(stat.parent.name)] = int(fields[1])
    found, todo = set(), [pid]
    while todo:
        parent = todo.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in found:
                found.add(child)
                todo.append(child)
    return found


def readme_snippet() -> str:
    """The README's "Embedding a worker" code block, as a user would paste it."""
    section = (ROOT / "README.md").read_text().split("### Embedding a worker", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_a_worker_embedded_in_a_host_that_forks_and_ignores_sigchld_runs_a_job(endpoint, instance, tmp_path):
    config = queue_config(endpoint, tmp_path / "embedded.yaml", "embedded")
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    worker_config = WorkerConfig.from_yaml(
        str(tmp_path / "embedded.yaml"), queues=["embedded"], name="embedded", concurrency=2
    )
    # a host that ignores SIGCHLD (SIG_IGN is inherited through exec and fork)
    host_sigchld = signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    try:
        with Worker(worker_config, instance=instance) as worker:
            assert worker.ready() == (True, "ok") and worker.live() == (True, "ok")
            assert {sig: signal.getsignal(sig) for sig in handlers} == handlers  # none installed
            # a fork of the host that stops its copy of the worker leaves the worker and its step children alone
            children = descendants(os.getpid())
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # to wait for the fork ourselves
            fork = os.fork()
            if fork == 0:
                try:
                    worker.kill_running("a fork")
                    worker.stop(timeout=1)
                finally:
                    os._exit(0)
            assert exit_status(fork, timeout=20) == 0
            signal.signal(signal.SIGCHLD, signal.SIG_IGN)
            assert descendants(os.getpid()) == children and worker.ready() == (True, "ok")
            with execute_job(
                reconstructable(jobs.diamond), instance=instance, run_config={"execution": {"config": config}}
            ) as result:
                assert result.success
            # a step still sees its subprocesses' exit codes (the kernel would reap them under SIG_IGN)
            with execute_job(
                reconstructable(jobs.runs_a_subprocess), instance=instance, run_config={"execution": {"config": config}}
            ) as seen:
                assert seen.success and seen.output_for_node("exit_code_of_a_subprocess") == 3
    finally:
        signal.signal(signal.SIGCHLD, host_sigchld)
    # leaving the block stopped it in order (no sys.exit: we are still here)
    assert worker.steps_done == 5 and worker.ready() == (False, "draining")
    assert {r.worker for r in step_reports(instance, result.run_id).values()} == {worker.name}


@pytest.mark.parametrize("host", ["plain script", "console script"])
def test_step_children_never_rerun_the_hosts_main_module(endpoint, instance, tmp_path, host):
    # Given a host process with a worker embedded, whose main module marks every time it runs
    queue = "embed_script" if host == "plain script" else "embed_console"
    config = queue_config(endpoint, tmp_path / "run_config.yaml", queue)
    marks = tmp_path / "marks"
    if host == "plain script":  # the README's snippet pasted into a script, no __main__ guard
        script = readme_snippet().replace('queues=["dagster"]', f'queues=["{queue}"]')
        assert f'queues=["{queue}"]' in script
        script = 'import os\nopen(os.environ["HOST_MARKS"], "a").write(f"imported {os.getpid()}\\n")\n' + script
        (tmp_path / "host.py").write_text(script)
        argv = [sys.executable, str(tmp_path / "host.py")]
        name, expected = "embedded", ["imported"]
    else:
        (tmp_path / "dagster-host").write_text(CONSOLE_SCRIPT)
        argv = [sys.executable, str(tmp_path / "dagster-host"), str(tmp_path / "run_config.yaml"), queue]
        name, expected = "console-host", ["imported", "main"]
    env = {**os.environ, "HOST_MARKS": str(marks), "PYTHONPATH": str(ROOT)}
    log = (tmp_path / "host.log").open("w")
    host_proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        # When a real job runs on it
        result = BackgroundRun(jobs.diamond, instance, {"execution": {"config": config}}).wait(120)
        assert result.success, (tmp_path / "host.log").read_text()
        reports = step_reports(instance, result.run_id)
        assert len(reports) == 4 and all(r.worker.startswith(name) for r in reports.values())
    finally:
        host_proc.send_signal(signal.SIGINT)
        code = host_proc.wait(60)
        log.close()
    # Then the host stopped in order, and its main module ran once, in the host: no step child
    # (nor the fork server) imported or ran it
    assert code == 0, (tmp_path / "host.log").read_text()
    assert marks.read_text().split("\n")[:-1] == [f"{what} {host_proc.pid}" for what in expected]
