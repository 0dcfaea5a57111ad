"""Session fixtures: one local SQS/S3 endpoint, one Dagster instance, two reused workers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from dagster import DagsterInstance

from dagster_taskiq_sync.ops.local_endpoint import LocalEndpoint

from .helpers import WorkerProcess, run_cli

ROOT = Path(__file__).resolve().parent.parent

pytest_plugins = ["tests.conftest_pg"]  # the session's throwaway PostgreSQL (fixture `postgres`)

# Each test's tier is its directory, and the marker of the same name selects it (`-m unit`):
# unit starts no process and no endpoint; e2e runs real CLI-started workers on the local endpoint;
# faults kills workers or step children, stops endpoints or PostgreSQL.
TIERS = ("unit", "e2e", "faults")
# Session fixtures that start servers or workers, which a unit test may not ask for.
PROCESS_FIXTURES = frozenset({"endpoint", "queues_created", "workers", "start_worker", "postgres", "pg_instance"})


def pytest_collection_modifyitems(config, items):
    for item in items:
        tier = Path(str(item.fspath)).parent.name
        if tier not in TIERS:
            raise pytest.UsageError(f"{item.nodeid}: every test lives in tests/unit, tests/e2e or tests/faults")
        item.add_marker(tier)
        if tier == "unit" and PROCESS_FIXTURES & set(getattr(item, "fixturenames", ())):
            used = ", ".join(sorted(PROCESS_FIXTURES & set(item.fixturenames)))
            raise pytest.UsageError(f"{item.nodeid} is a unit test but uses {used}: move it to tests/e2e")


@pytest.fixture(scope="session", autouse=True)
def aws_credentials():
    """Dummy credentials for the local endpoint, seen by this process and every worker."""
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    for key in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_SQS", "AWS_PROFILE"):
        os.environ.pop(key, None)
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def endpoint(tmp_path_factory):
    with LocalEndpoint(log_path=str(tmp_path_factory.mktemp("endpoint") / "moto.log")) as ep:
        yield ep


@pytest.fixture(scope="session", autouse=True)
def dagster_home(tmp_path_factory) -> Path:
    """The session's instance directory, exported as DAGSTER_HOME: workers started by tests use
    their own DAGSTER_HOME (never an instance named by a message), so it must be the tests'."""
    home = tmp_path_factory.mktemp("dagster_home")
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    saved = os.environ.get("DAGSTER_HOME")
    os.environ["DAGSTER_HOME"] = str(home)
    yield home
    if saved is None:
        os.environ.pop("DAGSTER_HOME", None)
    else:
        os.environ["DAGSTER_HOME"] = saved


@pytest.fixture(scope="session")
def instance(dagster_home):
    with DagsterInstance.from_config(str(dagster_home)) as inst:
        yield inst


@pytest.fixture(scope="session")
def executor_config(endpoint) -> dict:
    """A dagster-celery style executor block pointing at the local endpoint."""
    return {
        "broker": endpoint.broker_url,
        "config_source": {"broker_transport_options": {"region": "us-east-1", "wait_time_seconds": 1}},
    }


@pytest.fixture(scope="session")
def run_config_file(executor_config, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "run_config.yaml"
    path.write_text(yaml.safe_dump({"execution": {"config": executor_config}}))
    return path


@pytest.fixture(scope="session")
def queues_created(endpoint, run_config_file) -> str:
    out = run_cli("queues", "create", "-y", run_config_file)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.fixture(scope="session")
def workers(queues_created, run_config_file, tmp_path_factory):
    """Two workers with two threads each, shared by every test that needs them."""
    log_dir = tmp_path_factory.mktemp("workers")
    procs = [WorkerProcess(run_config_file, f"w{i}", log_dir, ["-c", "2"]) for i in (1, 2)]
    try:
        for proc in procs:
            proc.wait_ready()
        yield procs
    finally:
        codes = [proc.stop() for proc in procs]
    assert codes == [0, 0], [p.log() for p in procs]
