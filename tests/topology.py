"""Pieces of the production topology that tests/e2e/test_topology.py starts: server processes that stop
by themselves, the webserver's GraphQL API, and the instance's dagster.yaml.

Every process gets its own process group and SIGKILL when the thread that started it ends
(PR_SET_PDEATHSIG, as in benchmarks/services.py), so a killed test session leaves nothing behind;
a normal teardown SIGTERMs each group (the webserver's and the daemon's code servers with them).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .postgres import _die_with_parent

die_with_parent = _die_with_parent  # os.setsid() + PR_SET_PDEATHSIG(SIGKILL), for Popen's preexec_fn


class Service:
    """One server process (its own process group) and its log file."""

    def __init__(self, name: str, command: Sequence[str], log_dir: Path, env: Mapping[str, str], cwd: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        with open(self.log_path, "wb") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [str(c) for c in command],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=dict(env),
                cwd=cwd,
                preexec_fn=die_with_parent,
            )

    def log(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def wait_until(self, check: Callable[[], Any], what: str, timeout: float = 90.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = check()
            if value:
                return value
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited (code {self.proc.returncode}) before {what}:\n{self.log()}")
            time.sleep(0.2)
        raise AssertionError(f"{self.name}: timed out after {timeout:g} s waiting for {what}:\n{self.log()}")

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM to the group, SIGKILL to the group after ``timeout``; the leader's exit code."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # stragglers of the group (code servers)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        return self.proc.returncode


class GraphQLError(AssertionError):
    pass


class GraphQL:
    """The webserver's GraphQL API, as a script or the UI calls it (POST /graphql)."""

    LAUNCH = """
    mutation Launch($executionParams: ExecutionParams!) {
      launchRun(executionParams: $executionParams) {
        __typename
        ... on LaunchRunSuccess { run { runId status } }
        ... on RunConfigValidationInvalid { errors { message } }
        ... on Error { message }
      }
    }"""
    TERMINATE = """
    mutation Terminate($runId: String!) {
      terminateRun(runId: $runId) {
        __typename
        ... on TerminateRunSuccess { run { runId status } }
        ... on Error { message }
      }
    }"""
    RUN = """
    query Run($runId: ID!) {
      runOrError(runId: $runId) {
        __typename
        ... on Run { status stepStats { stepKey status } }
        ... on Error { message }
      }
    }"""
    LOCATIONS = """
    query Locations {
      workspaceOrError {
        __typename
        ... on Workspace { locationEntries { name loadStatus locationOrLoadError { __typename
          ... on PythonError { message } } } }
      }
    }"""
    DAEMONS = """
    query Daemons {
      instance { daemonHealth { allDaemonStatuses { daemonType required healthy } } }
    }"""
    CAPTURED_LOGS = """
    query Logs($logKey: [String!]!) {
      capturedLogs(logKey: $logKey) { stdout stderr }
    }"""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/graphql"
        # No proxy from the environment: the webserver is on loopback.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def __call__(self, query: str, **variables: Any) -> dict:
        request = urllib.request.Request(
            self.url,
            data=json.dumps({"query": query, "variables": variables}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with self._opener.open(request, timeout=60) as response:
            body = json.loads(response.read())
        if body.get("errors"):
            raise GraphQLError(f"GraphQL errors: {body['errors']}")
        return body["data"]

    def ping(self) -> bool:
        try:
            with self._opener.open(self.url.replace("/graphql", "/server_info"), timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def location_loaded(self, name: str) -> bool:
        entries = self(self.LOCATIONS)["workspaceOrError"]["locationEntries"]
        for entry in entries:
            if entry["name"] == name and entry["loadStatus"] == "LOADED":
                loaded = entry["locationOrLoadError"]
                if loaded["__typename"] != "RepositoryLocation":
                    raise GraphQLError(f"code location {name} failed to load: {loaded}")
                return True
        return False

    def launch_run(
        self, location: str, job: str, run_config: Mapping[str, Any], repository: str = "__repository__"
    ) -> tuple[str, str]:
        """launchRun; returns (run id, status right after the call)."""
        params = {
            "selector": {"repositoryLocationName": location, "repositoryName": repository, "jobName": job},
            "runConfigData": run_config,
        }
        result = self(self.LAUNCH, executionParams=params)["launchRun"]
        if result["__typename"] != "LaunchRunSuccess":
            raise GraphQLError(f"launchRun answered {result}")
        return result["run"]["runId"], result["run"]["status"]

    def terminate_run(self, run_id: str) -> None:
        """terminateRun: succeeds when the run coordinator (so the run launcher) accepted to stop
        the run. (Its ``run`` is read before the call: its status is the one before termination.)"""
        result = self(self.TERMINATE, runId=run_id)["terminateRun"]
        if result["__typename"] != "TerminateRunSuccess":
            raise GraphQLError(f"terminateRun answered {result}")

    def run(self, run_id: str) -> dict:
        result = self(self.RUN, runId=run_id)["runOrError"]
        if result["__typename"] != "Run":
            raise GraphQLError(f"runOrError answered {result}")
        return result

    def wait_finished(self, run_id: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.run(run_id)
            if run["status"] in ("SUCCESS", "FAILURE", "CANCELED"):
                return run
            time.sleep(0.5)
        raise AssertionError(f"run {run_id} not finished after {timeout:g} s: {self.run(run_id)}")

    def daemons(self) -> dict[str, dict]:
        statuses = self(self.DAEMONS)["instance"]["daemonHealth"]["allDaemonStatuses"]
        return {s["daemonType"]: s for s in statuses}

    def captured_logs(self, log_key: Sequence[str]) -> dict:
        return self(self.CAPTURED_LOGS, logKey=list(log_key))["capturedLogs"]


def instance_yaml(
    db_settings: Mapping[str, Any], *, run_queue: str, bucket: str, log_prefix: str, worker_lost_timeout: float
) -> dict:
    """The dagster.yaml of every process of the deployment: webserver, daemon and each worker."""
    return {
        # PostgreSQL through psycopg2: SQLAlchemy 2.1 maps plain postgresql:// to psycopg 3.
        "storage": {"postgres": {"postgres_db": dict(db_settings)}},
        "run_coordinator": {
            "module": "dagster.core.run_coordinator",
            "class": "QueuedRunCoordinator",
            "config": {"dequeue_interval_seconds": 1},
        },
        "run_launcher": {
            "module": "dagster_taskiq_sync",
            "class": "TaskiqRunLauncher",
            "config": {
                "broker": "sqs://",  # boto's resolution: AWS_ENDPOINT_URL here, AWS itself in production
                "default_queue": run_queue,
                "config_source": {"broker_transport_options": {"region": "us-east-1", "wait_time_seconds": 1}},
                "worker_lost_timeout": worker_lost_timeout,
            },
        },
        "run_monitoring": {"enabled": True, "poll_interval_seconds": 1, "max_resume_run_attempts": 1},
        "compute_logs": {
            "module": "dagster_aws.s3.compute_log_manager",
            "class": "S3ComputeLogManager",
            "config": {
                "bucket": bucket,
                "prefix": log_prefix,
                # Where logs are staged before upload (default /tmp): each process its own.
                "local_dir": {"env": "TMPDIR"},
            },
        },
        "telemetry": {"enabled": False},
    }


@contextlib.contextmanager
def environ(**values: str) -> Iterator[None]:
    """Set environment variables of this process (inherited by what it starts) for the block."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def listening_sockets(pgids: set[int]) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket listening in a process of the given process groups,
    from /proc (Linux)."""
    inodes: set[str] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            # the fields after the command's closing parenthesis: state, ppid, pgrp, ...
            pgrp = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[2])
            if pgrp not in pgids:
                continue
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:  # the process ended meanwhile
            continue
    found = set()
    for table in ("tcp", "tcp6"):
        lines = Path(f"/proc/net/{table}").read_text().splitlines()[1:]
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A: LISTEN
                continue
            hex_addr, hex_port = local.split(":")
            raw = bytes.fromhex(hex_addr)
            # the kernel prints each 32-bit word of the address in host (little-endian) order
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            address = ipaddress.ip_address(raw)
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
                address = address.ipv4_mapped
            found.add((str(address), int(hex_port, 16)))
    return found
