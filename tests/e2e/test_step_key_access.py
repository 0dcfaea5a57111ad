"""A step's own code cannot get its worker's signing key (issue 19, row 1).

One job (``tests/key_hunt_jobs.py``) whose op tries every route to the keys: its environment, its own
memory, the fork server's and the worker's environment and memory, the files the worker's command
line names (``-y``, ``--signing-key-file``), every other process's environment. It runs on two
workers that require signed messages, each holding a current key from an environment variable and a
previous one from a root-only (0600) key file:

- worker A runs as root with ``--step-user nobody``; it also serves the launched runs, whose run
  children (as nobody) get the keys on their pipe and sign their steps' messages;
- worker B runs as root without ``CAP_SYS_PTRACE`` (what root is in a default Docker container) and
  without a step user: the same uid as its step children, which the non-dumpable worker keeps out.
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
from ..helpers import CLI, WorkerProcess, wait_for

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
        pytest.skip("runs workers as root with step children as nobody (CI runs as root)")
    unreadable = _unreadable_by_nobody()
    if unreadable:
        pytest.skip(f"user {NOBODY} cannot read {unreadable[0]}, which its step children import")
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


def _launch(instance, endpoint, queue: str) -> str:
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


def test_a_steps_code_finds_no_signing_key_by_any_route(endpoint, hunt_home, tmp_path):
    home, instance = hunt_home
    config = tmp_path / "hunt.yaml"
    config.write_text(yaml.safe_dump({"execution": {"config": _executor_config(endpoint, "hunt-a")}}))
    out = subprocess.run(
        [CLI, "queues", "create", "-y", str(config), "-q", "hunt-runs", "-q", "hunt-a", "-q", "hunt-b"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    key_dir = Path(tempfile.mkdtemp(prefix="keyhunt-keys-", dir=tmp_path))
    key_dir.chmod(0o755)
    key_file = key_dir / "previous.key"
    key_file.write_text(f"{OLD_KEY}\n")
    key_file.chmod(0o600)  # root's
    env = os.environ | {"DAGSTER_HOME": str(home), KEY_VAR: KEY}
    # -i: the fork server imports them, so a step child need not (the job's module; and where the
    # interpreter's standard library is unreadable by nobody, as under /root here, what the children
    # import on first use: the instance's schema files are read through importlib.readers)
    preload = "tests.key_hunt_jobs,importlib.readers,importlib.resources.readers,importlib.resources._itertools"
    common = ["--signing-key-file", str(key_file), "-i", preload]
    # Given worker A (root, steps and runs as nobody) and worker B (root without CAP_SYS_PTRACE, no step user)
    worker_a = WorkerProcess(
        config,
        "hunt-a",
        tmp_path,
        ["-q", "hunt-runs", "-q", "hunt-a", "-c", "3", "--step-user", NOBODY, *common],
        env=env,
    )
    worker_b = WorkerProcess(
        config, "hunt-b", tmp_path, ["-q", "hunt-b", "-c", "1", *common], env=env, preexec_fn=_without_ptrace_capability
    )
    try:
        worker_a.wait_ready()
        worker_b.wait_ready()
        # When a launched run's step hunts for the keys on each worker
        run_a, run_b = _launch(instance, endpoint, "hunt-a"), _launch(instance, endpoint, "hunt-b")
        found_a, found_b = _report(instance, run_a), _report(instance, run_b)
    finally:
        codes = [worker_a.stop(), worker_b.stop()]
    assert codes == [0, 0], worker_a.log() + worker_b.log()
    # Then the run children (as nobody) signed their steps' messages: both runs succeeded on workers
    # that require signatures; and each op hunted where it should (its worker, the key file)
    for found, worker in ((found_a, worker_a), (found_b, worker_b)):
        assert found["worker_pid"] == worker.pid
        assert str(key_file) in found["files"] and str(config) in found["files"]
    # and A's children, the run child orchestrating run A among them, run as nobody
    assert found_a["uid"] == pwd.getpwnam(NOBODY).pw_uid
    assert set(found_a["sibling_uids"]) == {found_a["uid"]}, found_a
    assert found_b["uid"] == 0 and not found_b["cap_sys_ptrace"]
    # and on A (another user) every route is closed or clean
    routes_a = found_a["routes"]
    assert not [route for route, what in routes_a.items() if what.startswith("found")], routes_a
    assert routes_a["os.environ"] == routes_a["own memory"] == "clean", routes_a
    assert routes_a["worker environ"].startswith("denied") and routes_a["worker memory"].startswith("denied")
    assert routes_a[f"file {key_file}"].startswith("denied"), routes_a
    # and on B (the same uid) the key is in no environment or memory; only the key file root may
    # read is readable, as the README's Security model says (use --step-user, or give the key by variable)
    routes_b = found_b["routes"]
    assert {route for route, what in routes_b.items() if what.startswith("found")} == {f"file {key_file}"}, routes_b
    assert routes_b["os.environ"] == routes_b["own memory"] == routes_b["fork server environ"] == "clean", routes_b
    assert routes_b["worker memory"].startswith("denied"), routes_b  # not dumpable
    # (Linux lets root without CAP_SYS_PTRACE read a non-dumpable root process's environ: the worker
    # overwrote the key's value there, so the route is open and clean)
    assert routes_b["worker environ"] == "clean", routes_b
    # and B said so when it started; A, whose steps run as another user, did not
    warning = "runs as root without --step-user, so a step's code can read its signing key"
    assert warning in worker_b.log() and warning not in worker_a.log()
