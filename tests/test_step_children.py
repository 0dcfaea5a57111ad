"""Step children: reused across steps (as Celery's prefork pool), recycled on request, and the
per-child execution-plan cache gives exactly the plan Dagster builds itself."""

from __future__ import annotations

import subprocess
from collections import Counter

import pytest
import yaml
from dagster import execute_job, reconstructable
from dagster._core.execution.api import create_execution_plan
from dagster._core.execution.plan.outputs import StepOutputHandle
from dagster._core.execution.plan.state import KnownExecutionState

from dagster_taskiq_sync._dagster_private import _PLAN_CACHE, cached_create_execution_plan
from dagster_taskiq_sync.run_report import step_reports

from . import jobs
from .helpers import CLI, WorkerProcess


def _plan_facts(plan):
    return {
        "to_execute": list(plan.step_keys_to_execute),
        "executable": sorted(plan.executable_map),
        "known_state": plan.known_state,
        "artifacts_persisted": plan.artifacts_persisted,
        "steps": [plan.get_step_by_key(k) for k in plan.step_keys_to_execute],
    }


@pytest.mark.parametrize("job_fn", [jobs.diamond, jobs.fan_out_fan_in, jobs.retries], ids=lambda j: j.name)
def test_cached_step_plan_equals_the_plan_dagster_builds(job_fn):
    recon = reconstructable(job_fn)
    run_config = {"execution": {"config": {"broker": "sqs://127.0.0.1:1"}}}
    if job_fn is jobs.retries:
        run_config["ops"] = {"flaky": {"config": {"counter_file": "/nonexistent/counter"}}}
    plan = create_execution_plan(recon, run_config)
    first = plan.step_keys_to_execute[0]
    # a retried attempt (retry state) and outputs already produced upstream (ready outputs)
    retried = KnownExecutionState(previous_retry_attempts={first: 1},
                                  ready_outputs={StepOutputHandle(first, o.name) for o in plan.get_step_by_key(first).step_outputs})
    for known_state in (None, retried):
        for step_key in plan.step_keys_to_execute:
            ours = cached_create_execution_plan(recon, run_config, [step_key], known_state)
            theirs = create_execution_plan(recon, run_config, [step_key], known_state)
            assert _plan_facts(ours) == _plan_facts(theirs), step_key
    assert any(entry is not None for entry in _PLAN_CACHE.values())  # the cache was used, not bypassed


def _run_pids(instance, config: dict) -> list[int]:
    result = execute_job(reconstructable(jobs.diamond), instance=instance, run_config={"execution": {"config": config}},
                         raise_on_error=False)
    assert result.success
    reports = step_reports(instance, result.run_id)
    assert len(reports) == 4
    return [rep.pid for rep in sorted(reports.values(), key=lambda r: r.started)]


@pytest.mark.parametrize("recycle_args, expected", [
    ([], [4]),  # one step child runs every step
    (["--max-tasks-per-child", "2"], [2, 2]),
    (["--", "--max-tasks-per-child", "1"], [1, 1, 1, 1]),  # dagster-celery scripts pass Celery flags after --
], ids=["reused", "recycled-after-2", "celery-passthrough-1"])
def test_step_children_are_reused_and_recycled(endpoint, instance, executor_config, tmp_path, recycle_args, expected):
    config = {**executor_config, "config_source": {**executor_config["config_source"], "task_default_queue": "children"}}
    path = tmp_path / "children.yaml"
    path.write_text(yaml.safe_dump({"execution": {"config": config}}))
    out = subprocess.run([CLI, "queues", "create", "-y", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    # -c 1: one worker thread, so one step child at a time
    if recycle_args[:1] == ["--"]:
        args = ["-q", "children", "--", "-c", "1", *recycle_args[1:]]
    else:
        args = ["-q", "children", "-c", "1", *recycle_args]
    worker = WorkerProcess(path, "children", tmp_path, args).wait_ready()
    try:
        pids = _run_pids(instance, config)
    finally:
        assert worker.stop() == 0
    assert sorted(Counter(pids).values(), reverse=True) == expected, pids
