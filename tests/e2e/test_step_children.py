"""Step children: reused across steps (as Celery's prefork pool), recycled on request, and the
per-child execution-plan cache gives exactly the plan Dagster builds itself."""

from __future__ import annotations

from collections import Counter

import pytest
import yaml
from dagster import DynamicOut, DynamicOutput, In, Nothing, execute_job, job, op, reconstructable
from dagster._core.execution.api import create_execution_plan
from dagster._core.execution.plan.outputs import StepOutputHandle
from dagster._core.execution.plan.state import KnownExecutionState
from dagster._core.execution.retries import RetryMode

from dagster_taskiq_sync import taskiq_executor
from dagster_taskiq_sync._dagster.child import (
    _PLAN_CACHE,
    _original_resolved_build,
    cached_create_execution_plan,
    cached_resolved_run_config,
)
from dagster_taskiq_sync._dagster.execution import _TaskiqActiveExecution
from dagster_taskiq_sync.storage.run_report import step_reports

from .. import jobs
from ..helpers import WorkerProcess, run_cli, wait_for


def _plan_facts(plan):
    return {
        "to_execute": list(plan.step_keys_to_execute),
        "executable": sorted(plan.executable_map),
        "known_state": plan.known_state,
        "artifacts_persisted": plan.artifacts_persisted,
        "steps": [plan.get_step_by_key(k) for k in plan.step_keys_to_execute],
    }


@pytest.mark.compat
@pytest.mark.parametrize("job_fn", [jobs.diamond, jobs.fan_out_fan_in, jobs.retries], ids=lambda j: j.name)
def test_cached_step_plan_equals_the_plan_dagster_builds(job_fn):
    recon = reconstructable(job_fn)
    run_config = {"execution": {"config": {"broker": "sqs://127.0.0.1:1"}}}
    if job_fn is jobs.retries:
        run_config["ops"] = {"flaky": {"config": {"counter_file": "/nonexistent/counter"}}}
    plan = create_execution_plan(recon, run_config)
    first = plan.step_keys_to_execute[0]
    # a retried attempt (retry state) and outputs already produced upstream (ready outputs)
    retried = KnownExecutionState(
        previous_retry_attempts={first: 1},
        ready_outputs={StepOutputHandle(first, o.name) for o in plan.get_step_by_key(first).step_outputs},
    )
    for known_state in (None, retried):
        for step_key in plan.step_keys_to_execute:
            ours = cached_create_execution_plan(recon, run_config, [step_key], known_state)
            theirs = create_execution_plan(recon, run_config, [step_key], known_state)
            assert _plan_facts(ours) == _plan_facts(theirs), step_key
    assert any(entry is not None for entry in _PLAN_CACHE.values())  # the cache was used, not bypassed


@pytest.mark.compat
def test_a_step_child_validates_a_runs_config_once_and_gets_what_dagster_gets():
    from dagster import DagsterInvalidConfigError

    job_def = jobs.retries
    config = {
        "execution": {"config": {"broker": "sqs://127.0.0.1:1"}},
        "ops": {"flaky": {"config": {"counter_file": "/a"}}},
    }
    first = cached_resolved_run_config(job_def, config)
    assert first == _original_resolved_build(job_def, config)
    assert cached_resolved_run_config(job_def, {**config}) is first  # the same run's next step
    other = {**config, "ops": {"flaky": {"config": {"counter_file": "/b"}}}}
    assert cached_resolved_run_config(job_def, other) == _original_resolved_build(job_def, other) != first
    with pytest.raises(DagsterInvalidConfigError):
        cached_resolved_run_config(job_def, {"ops": {"flaky": {"config": {"nope": 1}}}})


@op(out=DynamicOut(int))
def _fan(context):
    for i in range(3):
        yield DynamicOutput(i, mapping_key=f"k{i}")


@op(out=DynamicOut(int))
def _other_fan():
    for i in range(2):
        yield DynamicOutput(i, mapping_key=f"o{i}")


@op
def _double(x: int) -> int:
    return 2 * x


@op
def _gather(xs: list[int]) -> int:
    return sum(xs)


@op(ins={"after": In(Nothing)})
def _last(x: int) -> int:
    return x


@job(executor_def=taskiq_executor)
def two_dynamic_fans():
    # Two independent dynamic fan-outs, a map of a map, collects, and a fan-in over both.
    total = _gather(_fan().map(_double).map(_double).collect())
    other = _gather.alias("other_gather")(_other_fan().map(_double).collect())
    _last(total, after=other)


def _static_fan_in():
    from .. import jobs

    return jobs.fan_out_fan_in


def _walk_the_run(recon, run_config, plan):
    """Drive taskiq's ActiveExecution through a whole run as the orchestrator would (every step
    succeeds and yields each output, the first one after a retry), and give each step with the
    state the orchestrator knows when it is launched and the trimmed state its message carries."""
    with _TaskiqActiveExecution(plan, RetryMode.ENABLED) as active:
        first, *others = active.get_steps_to_execute()
        active.mark_up_for_retry(first.key)  # its second attempt: retry count 1 in the state
        while True:
            steps = others + list(active.get_steps_to_execute())
            others = []
            if not steps:
                assert active.is_complete, "the walk is stuck"
                return
            for step in steps:
                yield step, active.get_known_state(), active.known_state_for(step)
            for step in steps:
                for output in step.step_outputs:
                    if output.is_dynamic:
                        mapping_keys = ["k0", "k1", "k2"] if "other" not in step.key else ["o0", "o1"]
                        for mapping_key in mapping_keys:
                            active.mark_step_produced_output(StepOutputHandle(step.key, output.name, mapping_key))
                            active._gathering_dynamic_outputs[step.key][output.name].append(mapping_key)
                    else:
                        active.mark_step_produced_output(StepOutputHandle(step.key, output.name))
                active.mark_success(step.key)


@pytest.mark.compat
@pytest.mark.parametrize("job_name", ["fan_out_fan_in", "two_dynamic_fans"])
def test_a_step_message_carries_only_the_state_its_step_needs_and_builds_the_same_plan(job_name):
    # Given a run as the orchestrator sees it, step by step (ready outputs, retries, dynamic mappings)
    job_def = _static_fan_in() if job_name == "fan_out_fan_in" else two_dynamic_fans
    recon = reconstructable(job_def)
    run_config = {"execution": {"config": {"broker": "sqs://127.0.0.1:1"}}}
    plan = create_execution_plan(recon, run_config)
    walked = list(_walk_the_run(recon, run_config, plan))
    assert len(walked) == (8 if job_name == "fan_out_fan_in" else 2 + 3 + 3 + 2 + 1 + 1 + 1)
    for step, full, trimmed in walked:
        # Then its message's state holds its own retry count, its inputs' ready outputs only...
        upstream = {h for i in step.step_inputs for h in i.get_step_output_handle_dependencies()}
        assert trimmed.ready_outputs == full.ready_outputs & upstream, step.key
        assert trimmed.get_retry_state().get_attempt_count(step.key) == full.get_retry_state().get_attempt_count(
            step.key
        )
        assert set(trimmed.previous_retry_attempts) <= {step.key}
        assert set(trimmed.dynamic_mappings) <= set(full.dynamic_mappings)
        # ...and the step child builds exactly the plan Dagster builds from the run's whole state.
        ours = cached_create_execution_plan(recon, run_config, [step.key], trimmed)
        theirs = create_execution_plan(recon, run_config, [step.key], full)
        assert {**_plan_facts(ours), "known_state": None} == {**_plan_facts(theirs), "known_state": None}, step.key
    # The state stays small: the gather of a fan-out carries its own inputs, not the whole run's.
    by_key = {step.key: trimmed for step, _full, trimmed in walked}
    if job_name == "two_dynamic_fans":
        assert set(by_key["_double_2[k0]"].dynamic_mappings) == {"_fan"}
        assert set(by_key["other_gather"].dynamic_mappings) == {"_other_fan"}
        assert by_key["_last"].ready_outputs == {
            StepOutputHandle("_gather", "result"),
            StepOutputHandle("other_gather", "result"),
        }


def _run_pids(instance, config: dict) -> list[int]:
    result = execute_job(
        reconstructable(jobs.diamond),
        instance=instance,
        run_config={"execution": {"config": config}},
        raise_on_error=False,
    )
    assert result.success
    reports = step_reports(instance, result.run_id)
    assert len(reports) == 4
    return [rep.pid for rep in sorted(reports.values(), key=lambda r: r.started)]


@pytest.mark.parametrize(
    "recycle_args, expected",
    [
        pytest.param([], [4], marks=pytest.mark.compat),  # one step child runs every step
        (["--max-tasks-per-child", "2"], [2, 2]),
        (["--", "--max-tasks-per-child", "1"], [1, 1, 1, 1]),  # dagster-celery scripts pass Celery flags after --
    ],
    ids=["reused", "recycled-after-2", "celery-passthrough-1"],
)
def test_step_children_are_reused_and_recycled(endpoint, instance, executor_config, tmp_path, recycle_args, expected):
    config = {
        **executor_config,
        "config_source": {**executor_config["config_source"], "task_default_queue": "children"},
    }
    path = tmp_path / "children.yaml"
    path.write_text(yaml.safe_dump({"execution": {"config": config}}))
    out = run_cli("queues", "create", "-y", str(path))
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


def test_a_step_child_still_working_after_its_outcome_is_not_killed_when_its_run_ends(
    workers, instance, executor_config, tmp_path
):
    # A step's process goes on after its outcome is in the event log: the end of its compute-log
    # capture (S3ComputeLogManager uploads the step's logs there) and its resources' teardown. Its
    # run can end meanwhile, and the worker used to kill the child then ("run ... is SUCCESS"),
    # losing the logs. Here a resource's teardown waits for the run to end and goes on for 2 s,
    # longer than the workers' cancel_poll_interval (1 s): their liveness thread sees the run over
    # while the child still works.
    marker = tmp_path / "run-status-at-teardown"
    run_config = {
        "execution": {"config": executor_config},
        "resources": {"settles": {"config": {"marker": str(marker), "after_run_seconds": 2.0}}},
    }
    with execute_job(reconstructable(jobs.settles_late), instance=instance, run_config=run_config) as result:
        assert result.success
        run_id = result.run_id
    label = f"step settles_after_its_run (attempt 1) of run {run_id} finished in"
    ended = wait_for(
        lambda: [line for w in workers for line in w.log().splitlines() if label in line],
        timeout=30,
        what=f"the worker to say that {label} ...",
    )
    assert ended[0].endswith("(exit code 0)"), ended
    assert marker.read_text() == "SUCCESS"
