"""The rules of per-step time limits: what a tag may say, which limit wins, what a message carries,
and what the worker's supervision does with them (injected clock, no processes)."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from dagster_taskiq_sync._dagster.names import KnownExecutionState, serialize_value
from dagster_taskiq_sync.config.celery_compat import settings_from_executor_config
from dagster_taskiq_sync.errors import ConfigError
from dagster_taskiq_sync.ops.metrics import WorkerMetrics
from dagster_taskiq_sync.wire.messages import MalformedMessage, StepMessage, decode, encode
from dagster_taskiq_sync.wire.time_limits import (
    HARD,
    HARD_TAG,
    SOFT,
    SOFT_TAG,
    Limit,
    Source,
    StepLimits,
    limits_for_step,
)
from tests.supervision import Clock, StubbornChild, supervising_request

pytestmark = pytest.mark.compat  # the soft limit rides on Dagster's private interrupt handling

RUN_ID = "0b6f9c7e-6a43-4c1e-9d55-3c2f9a1d2b10"
STATE = serialize_value(KnownExecutionState())

# --- tags -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, seconds", [("300", 300.0), ("1.5", 1.5), (" 2 ", 2.0), ("1e3", 1000.0)])
def test_a_limit_tag_is_a_positive_number_of_seconds(raw, seconds):
    limits = limits_for_step("slow", {HARD_TAG: raw}, None, None)
    assert limits == StepLimits(Limit(HARD, seconds, Source.TAG), None)


@pytest.mark.parametrize("tag", [HARD_TAG, SOFT_TAG])
@pytest.mark.parametrize("raw", ["soon", "", "-1", "0", "inf", "nan", "1e999", "5s", "[1]"])
def test_garbage_in_a_limit_tag_is_one_sentence_naming_the_tag_and_the_op(tag, raw):
    with pytest.raises(ConfigError) as info:
        limits_for_step("graph.slow", {tag: raw}, None, None)
    assert str(info.value) == (
        f"tag {tag}={raw!r} on op graph.slow must be a positive number of seconds (for example '300' or '1.5'); "
        "fix the tag."
    )


@pytest.mark.parametrize(
    "tags, run_hard, origin",
    [
        ({SOFT_TAG: "10", HARD_TAG: "10"}, None, "10 s, set by op tag dagster-taskiq/time_limit"),
        ({SOFT_TAG: "20", HARD_TAG: "10"}, None, "10 s, set by op tag dagster-taskiq/time_limit"),
        ({SOFT_TAG: "90"}, 60.0, "60 s, set by task_time_limit in the run's config"),
    ],
)
def test_a_soft_limit_tag_at_or_above_the_hard_limit_is_refused(tags, run_hard, origin):
    with pytest.raises(ConfigError) as info:
        limits_for_step("slow", tags, run_hard, None)
    assert str(info.value) == (
        f"tag {SOFT_TAG}={tags[SOFT_TAG]!r} on op slow must be below the op's hard time limit of {origin}, or the soft "
        f"limit never fires; lower it or raise {HARD_TAG}."
    )


def test_tags_override_the_runs_limits_and_the_runs_apply_to_untagged_steps():
    assert limits_for_step("a", {HARD_TAG: "30", SOFT_TAG: "20"}, 600.0, 300.0) == StepLimits(
        Limit(HARD, 30.0, Source.TAG), Limit(SOFT, 20.0, Source.TAG)
    )
    assert limits_for_step("b", {}, 600.0, 300.0) == StepLimits(
        Limit(HARD, 600.0, Source.RUN), Limit(SOFT, 300.0, Source.RUN)
    )
    assert limits_for_step("c", {SOFT_TAG: "5"}, 600.0, None).soft == Limit(SOFT, 5.0, Source.TAG)
    assert limits_for_step("d", {}, None, None) == StepLimits()


def test_the_runs_soft_default_does_not_apply_to_a_step_whose_own_hard_limit_is_shorter():
    assert limits_for_step("quick", {HARD_TAG: "10"}, 600.0, 300.0) == StepLimits(Limit(HARD, 10.0, Source.TAG), None)


def test_each_limit_says_where_it_was_set():
    assert Limit(SOFT, 1.0, Source.TAG).interrupted("cleans_up") == (
        "Step cleans_up exceeded its soft time limit of 1 s, set by op tag dagster-taskiq/soft_time_limit, "
        "and was interrupted."
    )
    assert Limit(HARD, 2.5, Source.RUN).killed() == (
        "exceeded its hard time limit of 2.5 s, set by task_time_limit in the run's config"
    )
    assert Limit(SOFT, 3.0, Source.WORKER).describe() == (
        "soft time limit of 3 s, set by task_soft_time_limit in the worker's config"
    )


# --- run config ------------------------------------------------------------------------------------------


def test_task_soft_time_limit_is_the_runs_soft_default_and_must_be_below_task_time_limit():
    settings = settings_from_executor_config({"config_source": {"task_time_limit": 60, "task_soft_time_limit": 50}})
    assert (settings.task_time_limit, settings.task_soft_time_limit) == (60.0, 50.0)
    assert not [n for n in settings.notes if "task_soft_time_limit" in n]  # mapped, not "no effect"
    with pytest.raises(ConfigError) as info:
        settings_from_executor_config({"config_source": {"task_time_limit": 60, "task_soft_time_limit": 60}})
    assert str(info.value) == (
        "execution.config.config_source.task_soft_time_limit (60 s) must be below "
        "execution.config.config_source.task_time_limit (60 s), or the soft limit never fires; lower it or remove it."
    )
    with pytest.raises(ConfigError, match="task_soft_time_limit must be a positive number of seconds"):
        settings_from_executor_config({"config_source": {"task_soft_time_limit": 0}})


# --- the message -------------------------------------------------------------------------------------------


def test_a_steps_limits_travel_in_its_message_and_a_step_without_limits_reads_as_before():
    limits = StepLimits(Limit(HARD, 2.0, Source.TAG), Limit(SOFT, 1.5, Source.RUN))
    step = StepMessage(RUN_ID, "slow", 1, STATE, limits)
    body = json.loads(encode(step, "dagster"))
    assert body["kwargs"]["time_limit"] == {"seconds": 2.0, "from": "tag"}
    assert body["kwargs"]["soft_time_limit"] == {"seconds": 1.5, "from": "run"}
    assert decode(encode(step, "dagster")) == step
    plain = json.loads(encode(StepMessage(RUN_ID, "slow", 1, STATE), "dagster"))
    assert set(plain["kwargs"]) == {"version", "run_id", "step_key", "attempt", "known_state"}


@pytest.mark.parametrize(
    "field, value, reason",
    [
        ("time_limit", 5, "time_limit is not a {seconds, from} object"),
        ("time_limit", {"seconds": 5}, "time_limit is not a {seconds, from} object"),
        ("time_limit", {"seconds": 5, "from": "tag", "x": 1}, "time_limit is not a {seconds, from} object"),
        ("time_limit", {"seconds": -1, "from": "tag"}, "time_limit is not a positive number of seconds"),
        ("time_limit", {"seconds": True, "from": "tag"}, "time_limit is not a positive number of seconds"),
        ("time_limit", {"seconds": "5", "from": "tag"}, "time_limit is not a positive number of seconds"),
        ("soft_time_limit", {"seconds": 1, "from": "worker"}, "soft_time_limit is not a positive number"),
        ("soft_time_limit", {"seconds": 1, "from": "/etc/passwd"}, "soft_time_limit is not a positive number"),
    ],
)
def test_a_malformed_limit_in_a_message_makes_it_malformed(field, value, reason):
    body = json.loads(encode(StepMessage(RUN_ID, "slow", 1, STATE), "dagster"))
    body["kwargs"][field] = value
    with pytest.raises(MalformedMessage) as info:
        decode(json.dumps(body).encode())
    assert reason in info.value.reason


def test_a_message_whose_soft_limit_is_not_below_its_hard_limit_is_malformed():
    limits = StepLimits(Limit(HARD, 2.0, Source.TAG), Limit(SOFT, 2.0, Source.TAG))
    with pytest.raises(MalformedMessage, match="soft_time_limit is not below its time_limit"):
        decode(encode(StepMessage(RUN_ID, "slow", 1, STATE, limits), "dagster"))


def test_the_workers_own_limits_apply_where_the_message_carries_none():
    from_run = StepLimits(Limit(HARD, 60.0, Source.RUN), None)
    assert from_run.with_defaults(10.0, 5.0) == StepLimits(
        Limit(HARD, 60.0, Source.RUN), Limit(SOFT, 5.0, Source.WORKER)
    )
    assert StepLimits().with_defaults(10.0, None) == StepLimits(Limit(HARD, 10.0, Source.WORKER), None)
    short = StepLimits(Limit(HARD, 3.0, Source.TAG), None)
    assert short.with_defaults(None, 5.0) == short  # a worker default that could never fire is left out


# --- supervision ---------------------------------------------------------------------------------------------


def supervised(limits: StepLimits, **settings):
    clock, metrics = Clock(), WorkerMetrics(process_metrics=False)
    message = StepMessage(RUN_ID, "slow", 1, STATE)
    request = supervising_request("q", message, StubbornChild(clock), clock, metrics, **settings)
    request.limits = limits.with_defaults(
        request.worker.settings.task_time_limit, request.worker.settings.task_soft_time_limit
    )
    return request, metrics


def counted(metrics, limit):
    return metrics.registry.get_sample_value(
        "dagster_taskiq_worker_steps_time_limited_total", {"queue": "q", "limit": limit}
    )


def test_the_soft_limit_interrupts_once_and_the_hard_limit_kills():
    request, metrics = supervised(StepLimits(Limit(HARD, 2.0, Source.TAG), Limit(SOFT, 1.0, Source.TAG)))
    assert request._supervise() == -9
    child = request.child
    assert (
        1.0 <= child.interrupted_at - 1000.0 <= 1.05 and 2.0 <= child.killed_at - 1000.0 <= 2.05
    )  # on time, not a tick late
    assert request.kill_reason == "exceeded its hard time limit of 2 s, set by op tag dagster-taskiq/time_limit"
    assert (counted(metrics, SOFT), counted(metrics, HARD)) == (1.0, 1.0)


def test_a_step_without_limits_uses_the_workers_task_time_limit():
    request, metrics = supervised(StepLimits(), task_time_limit=3.0)
    assert request._supervise() == -9
    assert request.kill_reason == "exceeded its hard time limit of 3 s, set by task_time_limit in the worker's config"
    assert request.child.interrupted_at is None and counted(metrics, SOFT) is None and counted(metrics, HARD) == 1.0


# --- the step child's side: the soft-limit signal becomes Dagster's interrupt ---------------------------------


@pytest.fixture
def soft_limit_signal():
    """This process as a step child: the soft-limit handler installed, the old one back afterwards."""
    import signal

    from dagster_taskiq_sync._dagster.child import install_soft_time_limit
    from dagster_taskiq_sync.worker.child_pipe import SOFT_LIMIT_SIGNAL

    previous = signal.getsignal(SOFT_LIMIT_SIGNAL)
    install_soft_time_limit(SOFT_LIMIT_SIGNAL)
    yield lambda: os.kill(os.getpid(), SOFT_LIMIT_SIGNAL)
    signal.signal(SOFT_LIMIT_SIGNAL, previous)


SENTENCE = (
    "Step slow exceeded its soft time limit of 1 s, set by op tag dagster-taskiq/soft_time_limit, and was interrupted."
)


def test_in_an_op_the_soft_limit_is_dagsters_interrupt_saying_which_limit(soft_limit_signal):
    from dagster import DagsterExecutionInterruptedError, raise_execution_interrupts

    from dagster_taskiq_sync._dagster.child import soft_time_limit
    from dagster_taskiq_sync._dagster.names import capture_interrupts

    with soft_time_limit(SENTENCE), capture_interrupts():
        with pytest.raises(DagsterExecutionInterruptedError) as info:
            with raise_execution_interrupts():  # what Dagster enters around an op's body
                soft_limit_signal()
                time.sleep(5)
    assert type(info.value).__name__ == "SoftTimeLimitExceeded" and str(info.value) == SENTENCE


def test_between_dagsters_checkpoints_the_interrupt_waits_for_the_next_one(soft_limit_signal):
    from dagster import DagsterExecutionInterruptedError, raise_execution_interrupts

    from dagster_taskiq_sync._dagster.child import soft_time_limit
    from dagster_taskiq_sync._dagster.names import capture_interrupts

    with soft_time_limit(SENTENCE), capture_interrupts():
        soft_limit_signal()  # Dagster's framework code runs here: nothing is raised ...
        with pytest.raises(DagsterExecutionInterruptedError) as info:
            with raise_execution_interrupts():  # ... until the op runs, and then with the sentence
                time.sleep(5)
    assert str(info.value) == SENTENCE


def test_a_signal_with_no_step_running_is_ignored(soft_limit_signal):
    from dagster_taskiq_sync._dagster.child import soft_time_limit

    threads = threading.active_count()
    with soft_time_limit(None):  # a step without a soft limit
        soft_limit_signal()
    soft_limit_signal()  # between steps (a late signal)
    assert threading.active_count() == threads  # nothing raised, and no retry scheduled for later
