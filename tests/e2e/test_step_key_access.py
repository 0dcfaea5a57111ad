"""A step's own code cannot get its worker's signing key (issue 19, row 1).

One job (``tests/key_hunt_jobs.py``), launched once per worker, whose op tries every route to the keys: its environment, its own
memory, the fork server's and the worker's environment and memory, the files the worker's command
line names (``-y``, ``--signing-key-file``), every other process's environment. It runs on two
workers that require signed messages, each holding a current key from an environment variable and a
previous one from a root-only (0600) key file:

- worker A runs as root with ``--step-user nobody``; it also serves its launched run, whose run
  child (as nobody) gets the keys on its pipe and signs its steps' messages (this test needs the
  checkout readable by nobody, and says so when it is not);
- worker B runs as root without ``CAP_SYS_PTRACE`` (what root is in a default Docker container) and
  without a step user: the same uid as its step children, which the non-dumpable worker keeps out
  of its memory and environment; it runs wherever the suite runs as root.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

import dagster
import pytest
import yaml
from dagster import DagsterInstance, reconstructable

import dagster_taskiq_sync

from .. import key_hunt_jobs
from ..helpers import WorkerProcess, run_cli, wait_for

PREFIX = "dts-keyhunt-"
KEY = PREFIX + secrets.token_hex(24)
OLD_KEY = PREFIX + secrets.token_hex(24)
KEY_VAR = "KEYHUNT_SIGNING_KEY"
NOBODY = "nobody"


def _without_ptrace_capability() -> None:
    """In the worker's process before it execs: root, but without CAP_SYS_PTRACE (as in Docker)."""
    if ctypes.CDLL(None, use_errno=True).prctl(24, 19, 0, 0, 0) != 0:  # PR_CAPBSET_DROP, CAP_SYS_PTRACE
        raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP, CAP_SYS_PTRACE) failed")


def _unreadable_by_nobody() -> list[str]:
    """What the step children, running as nobody, would need to read and cannot."""
    needed = [Path(dagster.__file__).parent, Path(dagster_taskiq_sync.__file__).parent, Path(key_hunt_jobs.__file__)]
    check = [
        "setpriv",
        f"--reuid={NOBODY}",
        f"--regid={pwd.getpwnam(NOBODY).pw_gid}",
        "--clear-groups",
        "sh",
        "-c",
        'for p; do test -r "$p" || echo "$p"; done',
        "sh",
        *map(str, needed),
    ]
    return subprocess.run(check, capture_output=True, text=True, timeout=30).stdout.split()


@pytest.fixture
def hunt_home(endpoint, monkeypatch):
    """A DAGSTER_HOME the step user can write (sqlite, one event log file), launching runs on hunt-runs."""
    if os.geteuid() != 0:
        pytest.skip("runs workers as root, with step children as nobody or without CAP_SYS_PTRACE (CI runs as root)")
    monkeypatch.setenv(KEY_VAR, KEY)  # this process launches the runs, signed
    home = Path(tempfile.mkdtemp(prefix="keyhunt-home-"))
    transport = {"region": "us-east-1", "wait_time_seconds": 1}
    (home / "dagster.yaml").write_text(
        yaml.safe_dump(
            {
                "telemetry": {"enabled": False},
                "event_log_storage": {
                    "module": "dagster._core.storage.event_log",
                    "class": "ConsolidatedSqliteEventLogStorage",
                    "config": {"base_dir": str(home / "history")},
                },
                "run_launcher": {
                    "module": "dagster_taskiq_sync",
                    "class": "TaskiqRunLauncher",
                    "config": {
                        "broker": endpoint.broker_url,
                        "default_queue": "hunt-runs",
                        "config_source": {"broker_transport_options": transport},
                        "signing_key": {"env": KEY_VAR},
                    },
                },
            }
        )
    )
    try:
        with DagsterInstance.from_config(str(home)) as instance:
            instance.get_runs(limit=1)
            instance.all_logs("none")
            shutil.chown(home, NOBODY)  # every database exists now: nobody owns them, root writes them too
            for path in home.rglob("*"):
                shutil.chown(path, NOBODY)
            yield home, instance
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _executor_config(endpoint, queue: str) -> dict:
    return {
        "broker": endpoint.broker_url,
        "signing_key": {"env": KEY_VAR},
        "config_source": {
            "task_default_queue": queue,
            "broker_transport_options": {"region": "us-east-1", "wait_time_seconds": 1},
        },
    }


def _launch(instance, endpoint, queue: str, run_queue: str) -> str:
    hunt = {
        "prefix": PREFIX,
        "length": len(KEY),
        "digests": [hashlib.sha256(k.encode()).hexdigest() for k in (KEY, OLD_KEY)],
    }
    recon = reconstructable(key_hunt_jobs.key_hunt)
    run = instance.create_run_for_job(
        job_def=recon.get_definition(),
        run_config={"execution": {"config": _executor_config(endpoint, queue)}, "ops": {"hunt": {"config": hunt}}},
        job_code_origin=recon.get_python_origin(),
        tags={"dagster-celery/queue": run_queue},
    )
    instance.launch_run(run.run_id, workspace=None)
    return run.run_id


def _report(instance, run_id: str) -> dict:
    run = wait_for(
        lambda: (r := instance.get_run_by_id(run_id)) and r.is_finished and r, timeout=90, what=f"run {run_id}"
    )
    lines = [(r.user_message or "") for r in instance.all_logs(run_id)]
    assert run.status == dagster.DagsterRunStatus.SUCCESS, "\n".join(lines)[-3000:]
    [report] = [json.loads(line.split("KEYHUNT ", 1)[1]) for line in lines if "KEYHUNT " in line]
    print(run_id, json.dumps(report, indent=1))  # pytest shows it when the test fails
    return report


@pytest.fixture
def hunt(endpoint, hunt_home, tmp_path):
    """The queues, a root-only key file, and what both workers are started with."""
    instance = hunt_home[1]
    config = tmp_path / "hunt.yaml"
    config.write_text(yaml.safe_dump({"execution": {"config": _executor_config(endpoint, "hunt-a")}}))
    queues = ["hunt-runs", "hunt-runs-b", "hunt-a", "hunt-b"]
    out = run_cli("queues", "create", "-y", config, *(a for q in queues for a in ("-q", q)))
    assert out.returncode == 0, out.stderr
    key_dir = Path(tempfile.mkdtemp(prefix="keyhunt-keys-", dir=tmp_path))
    key_dir.chmod(0o755)
    key_file = key_dir / "previous.key"
    key_file.write_text(f"{OLD_KEY}\n")
    key_file.chmod(0o600)  # root's
    # PYTHONPATH: -i names this checkout's tests package, which is not installed
    root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    env = os.environ | {"DAGSTER_HOME": str(hunt_home[0]), KEY_VAR: KEY, "PYTHONPATH": path}
    # -i: the fork server imports them, so a step child need not (the job's module; and where the
    # interpreter's standard library is unreadable by nobody, as under /root here, what the children
    # import on first use: the instance's schema files are read through importlib.readers)
    preload = "tests.key_hunt_jobs,importlib.readers,importlib.resources.readers,importlib.resources._itertools"
    common = ["--signing-key-file", str(key_file), "-i", preload]
    return instance, config, key_file, env, common


def _hunted(endpoint, instance, worker: WorkerProcess, queue: str, run_queue: str) -> dict:
    try:
        worker.wait_ready()
        found = _report(instance, _launch(instance, endpoint, queue, run_queue))
    finally:
        code = worker.stop()
    assert code == 0, worker.log()
    # the run child signed its steps' messages (the run succeeded on a worker that requires
    # signatures), and the op hunted where it should (its worker, the key file, the YAML)
    assert found["worker_pid"] == worker.pid
    return found


def test_a_step_user_closes_every_route_to_the_signing_key(endpoint, hunt, tmp_path):
    instance, config, key_file, env, common = hunt
    unreadable = _unreadable_by_nobody()
    if unreadable:
        pytest.skip(f"user {NOBODY} cannot read {unreadable[0]}, which its step children import")
    # Given worker A: root, its step children and run children as nobody
    worker = WorkerProcess(
        config,
        "hunt-a",
        tmp_path,
        ["-q", "hunt-runs", "-q", "hunt-a", "-c", "3", "--step-user", NOBODY, *common],
        env=env,
    )
    # When a launched run's step hunts for the keys
    found = _hunted(endpoint, instance, worker, "hunt-a", "hunt-runs")
    assert str(key_file) in found["files"] and str(config) in found["files"]
    # Then its children, the run child orchestrating the run among them, run as nobody
    assert found["uid"] == pwd.getpwnam(NOBODY).pw_uid
    assert set(found["sibling_uids"]) == {found["uid"]}, found
    # and every route is closed or clean
    routes = found["routes"]
    assert not [route for route, what in routes.items() if what.startswith("found")], routes
    assert routes["os.environ"] == routes["own memory"] == "clean", routes
    assert routes["worker environ"].startswith("denied") and routes["worker memory"].startswith("denied")
    assert routes[f"file {key_file}"].startswith("denied"), routes
    # and the worker did not warn that its steps could read the key
    assert "runs as root without --step-user" not in worker.log()


def test_a_same_uid_step_finds_the_key_only_in_the_key_file(endpoint, hunt, tmp_path):
    instance, config, key_file, env, common = hunt
    # Given worker B: root without CAP_SYS_PTRACE (as in Docker), no step user: children share its uid
    worker = WorkerProcess(
        config,
        "hunt-b",
        tmp_path,
        ["-q", "hunt-runs-b", "-q", "hunt-b", "-c", "2", *common],
        env=env,
        preexec_fn=_without_ptrace_capability,
    )
    # When a launched run's step hunts for the keys
    found = _hunted(endpoint, instance, worker, "hunt-b", "hunt-runs-b")
    assert str(key_file) in found["files"] and str(config) in found["files"]
    assert found["uid"] == 0 and not found["cap_sys_ptrace"]
    # Then the key is in no environment or memory; only the key file root may read is readable, as
    # the README's Security model says (use --step-user, or give the key by variable)
    routes = found["routes"]
    assert {route for route, what in routes.items() if what.startswith("found")} == {f"file {key_file}"}, routes
    assert routes["os.environ"] == routes["own memory"] == routes["fork server environ"] == "clean", routes
    assert routes["worker memory"].startswith("denied"), routes  # not dumpable
    # (Linux lets root without CAP_SYS_PTRACE read a non-dumpable root process's environ: the worker
    # overwrote the key's value there, so the route is open and clean)
    assert routes["worker environ"] == "clean", routes
    # and the worker said so when it started
    assert "runs as root without --step-user, so a step's code can read its signing key" in worker.log()
