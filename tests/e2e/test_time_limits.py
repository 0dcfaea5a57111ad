"""Per-step time limits on real workers: the soft limit interrupts the op (which may clean up), the
hard limit kills it, a RetryPolicy retries a step a limit stopped, and a bad limit tag fails the
run before anything is sent. The limits travel in the step's message, so the shared pool runs them."""

from __future__ import annotations

import logging

import pytest
from dagster import DagsterEventType, execute_job, reconstructable

from .. import time_limit_jobs as jobs
from ..helpers import pid_alive


def run(job_fn, instance, executor_config, mark_dir=None, op=None, **config_source):
    config = {**executor_config, "health_check_interval": 1}
    config["config_source"] = {**executor_config.get("config_source", {}), **config_source}
    run_config = {"execution": {"config": config}}
    if mark_dir is not None:
        run_config["ops"] = {op: {"config": {"mark_dir": str(mark_dir)}}}
    return execute_job(reconstructable(job_fn), instance=instance, run_config=run_config, raise_on_error=False)


def events_of(instance, run_id, event_type):
    return [r for r in instance.all_logs(run_id) if r.dagster_event and r.dagster_event.event_type == event_type]


def error_text(error) -> str:
    """An error's message and those of its causes."""
    parts = []
    while error is not None:
        parts.append(f"{error.cls_name}: {error.message}")
        error = error.cause
    return "\n".join(parts)


@pytest.mark.compat  # the soft limit rides on Dagster's private interrupt handling: every env runs it
def test_a_soft_limit_interrupts_the_op_which_cleans_up(workers, instance, executor_config, tmp_path):
    # Given an op tagged dagster-taskiq/soft_time_limit=1 that sleeps and cleans up when interrupted
    with run(jobs.soft_limited, instance, executor_config, tmp_path, "cleans_up") as result:
        assert not result.success

    # Then the op saw Dagster's interrupt, saying which limit, and its cleanup ran
    cleaned = (tmp_path / "cleaned_up").read_text()
    assert cleaned.startswith("SoftTimeLimitExceeded: Step cleans_up exceeded its soft time limit of 1 s, set by ")
    assert "op tag dagster-taskiq/soft_time_limit" in cleaned
    # and the step's failure in the run's event log is that one sentence
    [failure] = events_of(instance, result.run_id, DagsterEventType.STEP_FAILURE)
    text = error_text(failure.dagster_event.step_failure_data.error)
    assert "Step cleans_up exceeded its soft time limit of 1 s, set by op tag dagster-taskiq/soft_time_limit" in text


def test_a_hard_limit_kills_an_op_that_ignores_its_soft_limit(workers, instance, executor_config, tmp_path):
    # Given an op with a 1 s soft and a 2 s hard limit that swallows the interrupt and sleeps on
    with run(jobs.hard_limited, instance, executor_config, tmp_path, "ignores_interrupts") as result:
        assert not result.success

    # Then it was interrupted at the soft limit first, and ignored it
    assert "exceeded its soft time limit of 1 s" in (tmp_path / "ignored").read_text()
    # and its process was killed at the hard limit: the step fails with a sentence naming it
    assert not pid_alive(int((tmp_path / "pid").read_text()))
    [failure] = events_of(instance, result.run_id, DagsterEventType.STEP_FAILURE)
    text = error_text(failure.dagster_event.step_failure_data.error)
    assert "killed: exceeded its hard time limit of 2 s, set by op tag dagster-taskiq/time_limit" in text


def test_a_retry_policy_retries_a_step_its_time_limit_stopped(workers, instance, executor_config):
    # Given an op with RetryPolicy(max_retries=1) that is slow only on its first attempt, and a run-wide
    # task_soft_time_limit (the run's config, no tag)
    with run(jobs.retried_after_time_limit, instance, executor_config, task_soft_time_limit=2) as result:
        # Then the first attempt was interrupted and retried, and the second one ran to its end
        assert result.success
        assert result.output_for_node("slow_the_first_time") == 1

    [retry] = events_of(instance, result.run_id, DagsterEventType.STEP_UP_FOR_RETRY)
    text = error_text(retry.dagster_event.event_specific_data.error)
    assert (
        "Step slow_the_first_time exceeded its soft time limit of 2 s, set by task_soft_time_limit in the run's config"
        in text
    )
    assert len(events_of(instance, result.run_id, DagsterEventType.STEP_START)) == 1
    assert len(events_of(instance, result.run_id, DagsterEventType.STEP_RESTARTED)) == 1  # attempt 2


@pytest.mark.parametrize("eager", [False, True], ids=["workers", "eager"])
@pytest.mark.parametrize(
    "job_fn, expected",
    [
        (jobs.bad_limit_tag, "tag dagster-taskiq/time_limit='soon' on op badly_limited must be a positive number"),
        (jobs.bad_limit_asset, "tag dagster-taskiq/soft_time_limit='-5' on op badly_limited_asset must be a positive"),
    ],
    ids=["op", "asset"],
)
def test_a_bad_limit_tag_fails_the_run_before_any_step_is_sent(instance, executor_config, job_fn, expected, eager):
    # Given an op (or an asset's op_tags) with a limit tag that is not a positive number of seconds
    # (in eager mode too, where limits do not apply: the same job on workers would fail)
    result = run(job_fn, instance, executor_config, **({"task_always_eager": True} if eager else {}))

    # Then the run fails with one sentence naming the tag and the op, and no step was sent or run
    assert not result.success
    errors = [r.user_message for r in instance.all_logs(result.run_id) if r.level >= 40]
    assert any(expected in e for e in errors), errors
    assert not events_of(instance, result.run_id, DagsterEventType.STEP_WORKER_STARTING)
    assert not events_of(instance, result.run_id, DagsterEventType.STEP_START)


def test_eager_mode_warns_in_the_runs_log_which_steps_hard_limits_do_not_apply(instance, executor_config):
    # Given a job with one op tagged with both limits and one without, run in eager mode
    with run(jobs.eager_limited, instance, executor_config, task_always_eager=True) as result:
        # Then it runs in the run's own process, as before
        assert result.success and result.output_for_node("quick_unlimited") == 2

    # and the run's log warns, once, that the tagged op's hard limit does not apply there, and why
    warnings = [r.user_message for r in instance.all_logs(result.run_id) if r.level == logging.WARNING]
    [warning] = [w for w in warnings if "time limit" in w.lower()]
    assert warning.startswith(
        "Hard time limits do not apply in eager mode (task_always_eager: true): step quick_but_limited asks for one "
        f"(op tag {jobs.HARD}), but steps run one by one in the run's own process"
    )


@pytest.mark.compat  # in-process too, the soft limit rides on Dagster's private interrupt handling
def test_in_eager_mode_a_soft_limit_interrupts_the_op_and_a_retry_policy_retries_it(instance, executor_config):
    # Given an op with RetryPolicy(max_retries=1), slow only on its first attempt, under a run-wide
    # task_soft_time_limit, run in eager mode
    with run(
        jobs.retried_after_time_limit, instance, executor_config, task_soft_time_limit=1, task_always_eager=True
    ) as result:
        # Then the first attempt was interrupted at its limit and retried in the same process
        assert result.success
        assert result.output_for_node("slow_the_first_time") == 1

    [retry] = events_of(instance, result.run_id, DagsterEventType.STEP_UP_FOR_RETRY)
    text = error_text(retry.dagster_event.event_specific_data.error)
    assert (
        "Step slow_the_first_time exceeded its soft time limit of 1 s, set by task_soft_time_limit in the run's config"
        in text
    )


def test_in_eager_mode_a_soft_limit_interrupts_the_op_which_cleans_up(instance, executor_config, tmp_path):
    # Given an op tagged dagster-taskiq/soft_time_limit=1 that sleeps and cleans up, run in eager mode
    with run(jobs.soft_limited, instance, executor_config, tmp_path, "cleans_up", task_always_eager=True) as result:
        assert not result.success

    # Then the op saw Dagster's interrupt, saying which limit, and its cleanup ran; its step's failure says it
    cleaned = (tmp_path / "cleaned_up").read_text()
    assert cleaned.startswith("SoftTimeLimitExceeded: Step cleans_up exceeded its soft time limit of 1 s, set by ")
    [failure] = events_of(instance, result.run_id, DagsterEventType.STEP_FAILURE)
    text = error_text(failure.dagster_event.step_failure_data.error)
    assert "Step cleans_up exceeded its soft time limit of 1 s, set by op tag dagster-taskiq/soft_time_limit" in text
