"""The rules of a launched run's time limits (TaskiqRunLauncher): where they come from, what its
message carries, what the worker's supervision does to the run child and tells the run's instance
(injected clock, an in-memory instance, no processes); and what eager mode says about limits it
cannot apply."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from dagster import DagsterEventType, DagsterInstance, DagsterRun, DagsterRunStatus

from dagster_taskiq_sync import TaskiqRunLauncher
from dagster_taskiq_sync.errors import ConfigError
from dagster_taskiq_sync.ops.metrics import WorkerMetrics
from dagster_taskiq_sync.orchestrator.eager import ignored_limits_warning
from dagster_taskiq_sync.wire.messages import MalformedMessage, RunMessage, TaskKind, decode, encode
from dagster_taskiq_sync.wire.time_limits import (
    HARD,
    HARD_TAG,
    SOFT,
    SOFT_TAG,
    Limit,
    Source,
    StepLimits,
    limits_for_run,
)
from tests.supervision import Clock, StubbornChild, supervising_request

RUN_ID = "0b6f9c7e-6a43-4c1e-9d55-3c2f9a1d2b10"

# --- where a run's limits come from ----------------------------------------------------------------------


def test_a_runs_tags_override_the_launchers_limits_which_apply_to_untagged_runs():
    assert limits_for_run(RUN_ID, {HARD_TAG: "30", SOFT_TAG: "20"}, 600.0, 300.0) == StepLimits(
        Limit(HARD, 30.0, Source.RUN_TAG), Limit(SOFT, 20.0, Source.RUN_TAG)
    )
    assert limits_for_run(RUN_ID, {}, 600.0, 300.0) == StepLimits(
        Limit(HARD, 600.0, Source.LAUNCHER), Limit(SOFT, 300.0, Source.LAUNCHER)
    )
    assert limits_for_run(RUN_ID, {"dagster/max_runtime": "10"}, None, None) == StepLimits()  # the daemon's
    # the launcher's soft default does not apply to a run whose own hard limit is shorter
    assert limits_for_run(RUN_ID, {HARD_TAG: "10"}, None, 300.0) == StepLimits(Limit(HARD, 10.0, Source.RUN_TAG))


@pytest.mark.parametrize("tag", [HARD_TAG, SOFT_TAG])
@pytest.mark.parametrize("raw", ["soon", "-1", "0", "inf", "5s"])
def test_garbage_in_a_run_limit_tag_is_one_sentence_naming_the_tag_and_the_run(tag, raw):
    with pytest.raises(ConfigError) as info:
        limits_for_run(RUN_ID, {tag: raw}, None, None)
    assert str(info.value) == (
        f"tag {tag}={raw!r} on run {RUN_ID} must be a positive number of seconds (for example '300' or '1.5'); "
        "fix the tag."
    )


def test_a_soft_limit_tag_at_or_above_the_runs_hard_limit_is_refused():
    with pytest.raises(ConfigError) as info:
        limits_for_run(RUN_ID, {SOFT_TAG: "90"}, 60.0, None)
    assert str(info.value) == (
        f"tag {SOFT_TAG}='90' on run {RUN_ID} must be below the run's hard time limit of 60 s, set by "
        f"task_time_limit in the run launcher's config, or the soft limit never fires; lower it or raise {HARD_TAG}."
    )


def test_a_runs_limits_say_where_they_were_set_and_what_they_did():
    assert Limit(SOFT, 3.0, Source.RUN_TAG).run_stopped(RUN_ID) == (
        f"Run {RUN_ID} exceeded its soft time limit of 3 s, set by run tag {SOFT_TAG}, and was interrupted."
    )
    assert Limit(HARD, 5.0, Source.LAUNCHER).run_stopped(RUN_ID) == (
        f"Run {RUN_ID} exceeded its hard time limit of 5 s, set by task_time_limit in the run launcher's config, "
        "and its process was killed."
    )


def test_the_launcher_resolves_a_runs_limits_from_its_tags_and_its_config_source():
    launcher = TaskiqRunLauncher(config_source={"task_time_limit": 3600, "task_soft_time_limit": 3000})
    run = DagsterRun(job_name="nightly", run_id=RUN_ID, tags={SOFT_TAG: "60"})
    assert launcher.limits(run) == StepLimits(Limit(HARD, 3600.0, Source.LAUNCHER), Limit(SOFT, 60.0, Source.RUN_TAG))
    with pytest.raises(ConfigError, match=f"tag {HARD_TAG}='never' on run {RUN_ID} must be a positive number"):
        launcher.limits(DagsterRun(job_name="nightly", run_id=RUN_ID, tags={HARD_TAG: "never"}))


def test_garbage_in_the_launchers_limits_names_the_launchers_setting():
    with pytest.raises(ConfigError) as info:
        TaskiqRunLauncher(config_source={"task_time_limit": "soon"})
    assert str(info.value) == (
        "run_launcher.config.config_source.task_time_limit must be a number of seconds, got 'soon'; fix the value."
    )
    with pytest.raises(ConfigError, match=r"^run_launcher.config.config_source.task_soft_time_limit \(9 s\) must be"):
        TaskiqRunLauncher(config_source={"task_time_limit": 9, "task_soft_time_limit": 9})


# --- the run's message ------------------------------------------------------------------------------------


def test_a_runs_limits_travel_in_its_message_and_a_launch_without_limits_reads_as_before():
    limits = StepLimits(Limit(HARD, 60.0, Source.LAUNCHER), Limit(SOFT, 30.0, Source.RUN_TAG))
    for message in (
        RunMessage(TaskKind.RUN, RUN_ID, "launch", limits),
        RunMessage(TaskKind.RESUME, RUN_ID, "resume-1"),
    ):
        assert decode(encode(message, "runs")) == message
    body = json.loads(encode(RunMessage(TaskKind.RUN, RUN_ID, "launch", limits), "runs"))
    assert body["kwargs"]["time_limit"] == {"seconds": 60.0, "from": "launcher"}
    plain = json.loads(encode(RunMessage(TaskKind.RUN, RUN_ID, "launch"), "runs"))
    assert set(plain["kwargs"]) == {"version", "run_id", "launch"}


@pytest.mark.parametrize("source", ["tag", "run", "worker", "nonsense"])
def test_a_run_message_whose_limit_names_a_steps_source_is_malformed(source):
    body = json.loads(encode(RunMessage(TaskKind.RUN, RUN_ID, "launch"), "runs"))
    body["kwargs"]["soft_time_limit"] = {"seconds": 5, "from": source}
    with pytest.raises(MalformedMessage) as info:
        decode(json.dumps(body).encode())
    assert info.value.reason == (
        "the message's soft_time_limit is not a positive number of seconds from 'launcher' or 'run_tag'"
    )


# --- the worker's supervision of a run child ------------------------------------------------------------------


@pytest.fixture
def instance():
    with DagsterInstance.ephemeral() as instance:
        instance.add_run(DagsterRun(job_name="nightly", run_id=RUN_ID, status=DagsterRunStatus.STARTED))
        yield instance


def supervised_run(instance, limits: StepLimits, **settings):
    clock, metrics = Clock(), WorkerMetrics(process_metrics=False)
    message = RunMessage(TaskKind.RUN, RUN_ID, "launch")
    request = supervising_request("runs", message, StubbornChild(clock), clock, metrics, instance, **settings)
    request.limits = limits
    return request, metrics


def counted(metrics, what, limit):
    return metrics.registry.get_sample_value(
        f"dagster_taskiq_worker_{what}_time_limited_total", {"queue": "runs", "limit": limit}
    )


def test_a_runs_soft_limit_fails_it_naming_the_limit_then_interrupts_it_and_its_hard_limit_kills_it(instance):
    limits = StepLimits(Limit(HARD, 5.0, Source.RUN_TAG), Limit(SOFT, 3.0, Source.RUN_TAG))
    request, metrics = supervised_run(instance, limits)
    assert request._supervise() == -9
    request._finish_run(-9, request.kill_reason)

    child = request.child
    assert 3.0 <= child.interrupted_at - 1000.0 <= 3.05 and 5.0 <= child.killed_at - 1000.0 <= 5.05
    run = instance.get_run_by_id(RUN_ID)
    assert run.status == DagsterRunStatus.FAILURE
    [failure] = instance.all_logs(RUN_ID, of_type=DagsterEventType.RUN_FAILURE)
    assert failure.dagster_event.message == limits.soft.run_stopped(RUN_ID)  # failed at the soft limit, naming it
    [killed] = instance.all_logs(RUN_ID, of_type=DagsterEventType.ENGINE_EVENT)
    assert killed.dagster_event.message == limits.hard.run_stopped(RUN_ID)  # and the kill is in its log
    assert (counted(metrics, "runs", SOFT), counted(metrics, "runs", HARD)) == (1.0, 1.0)
    assert counted(metrics, "steps", SOFT) is None and counted(metrics, "steps", HARD) is None


def test_a_run_killed_at_its_hard_limit_is_failed_naming_it(instance):
    limits = StepLimits(Limit(HARD, 2.0, Source.LAUNCHER), None)
    request, _metrics = supervised_run(instance, limits)
    assert request._supervise() == -9
    request._finish_run(-9, request.kill_reason)
    assert instance.get_run_by_id(RUN_ID).status == DagsterRunStatus.FAILURE
    [failure] = instance.all_logs(RUN_ID, of_type=DagsterEventType.RUN_FAILURE)
    assert failure.dagster_event.message == (
        f"Run {RUN_ID} exceeded its hard time limit of 2 s, set by task_time_limit in the run launcher's config, "
        "and its process was killed."
    )


@pytest.mark.parametrize(
    "carried", [StepLimits(), StepLimits(Limit(HARD, 60.0, Source.LAUNCHER), None)], ids=["none", "launcher"]
)
def test_a_run_child_gets_its_messages_limits_never_the_workers_own(instance, carried):
    # Given a worker whose own config (-y) sets limits of 1 s and 0.5 s for steps that carry none
    request, _metrics = supervised_run(instance, StepLimits(), task_time_limit=1.0, task_soft_time_limit=0.5)
    request.message = RunMessage(TaskKind.RUN, RUN_ID, "launch", carried)
    request.delivery.received_at, request.delivery.sent_at = 0.0, None
    worker = request.worker
    worker.host, worker.pid, worker.runner = "h", 1, SimpleNamespace(start_run=lambda *args: request.child)
    worker.store = SimpleNamespace(write=lambda task_id, record: None)
    # When it starts a launched run
    request._start()
    # Then the run child is supervised with the run's own limits (its tags, the launcher's), or none
    assert request.limits == carried


# --- eager mode -------------------------------------------------------------------------------------------------


def test_eager_mode_names_the_steps_whose_limits_it_cannot_apply():
    hard = Limit(HARD, 60.0, Source.TAG)
    soft = Limit(SOFT, 30.0, Source.RUN)
    assert ignored_limits_warning({}) is None
    assert ignored_limits_warning({"export": []}) is None  # its soft limit applies: nothing to say
    assert ignored_limits_warning({"export": [hard]}) == (
        "Hard time limits do not apply in eager mode (task_always_eager: true): step export asks for one (op tag "
        f"{HARD_TAG}), but steps run one by one in the run's own process, which no worker supervises; run them on "
        "workers (task_always_eager: false) to enforce the limits."
    )
    # a run executing outside the main thread cannot take the soft-limit signal either
    assert ignored_limits_warning({"export": [hard], "load": [soft]}).startswith(
        "Hard and soft time limits do not apply in eager mode (task_always_eager: true): steps export, load ask for "
        f"one (op tag {HARD_TAG}; task_soft_time_limit in the run's config), "
    )
    many = {f"s{i:02d}": [hard] for i in range(12)}
    assert "steps s00, s01, s02, s03, s04, s05, s06, s07, s08, s09 and 2 more ask for one" in ignored_limits_warning(
        many
    )
