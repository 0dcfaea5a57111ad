"""Fair sharing between runs on one queue: a run keeps at most ~2x the live worker slots of its
steps in flight per queue, so another run's step is not queued behind all of a big fan-out.

Assertions are on the order of events in the instance's event log, never on durations.
"""

from __future__ import annotations

import pytest
from dagster import DagsterEventType, RunsFilter, execute_job, reconstructable

from dagster_taskiq_sync.config.celery_compat import settings_from_executor_config
from dagster_taskiq_sync.errors import ConfigError
from dagster_taskiq_sync.orchestrator.fair_share import LaunchPolicy, live_slots
from dagster_taskiq_sync.storage.registry import WorkerRecord

from .. import fair_jobs, jobs
from ..helpers import BackgroundRun, WorkerProcess, make_config, wait_for

# --- the policy ---------------------------------------------------------------------------------


def _worker(name, queues, concurrency, state="running", age=0.0):
    import time

    return WorkerRecord(
        name=name,
        host="h",
        pid=1,
        queues=queues,
        concurrency=concurrency,
        state=state,
        heartbeat_interval=5.0,
        ts=time.time() - age,
    )


def test_live_slots_count_running_live_workers_per_queue():
    workers = [
        _worker("a", ["dagster"], 4),
        _worker("b", ["dagster", "other"], 2),  # serves both queues: its slots count for each
        _worker("c", ["dagster"], 8, state="stopping"),  # draining: takes no new work
        _worker("d", ["dagster"], 8, age=3600),  # lost (no heartbeat for an hour)
    ]
    assert live_slots(workers) == {"dagster": 6, "other": 2}


def test_caps_follow_the_live_slots_and_never_drop_below_the_floor():
    policy = LaunchPolicy("dagster", per_slot=2.0, floor=4)
    assert not policy.capped  # nothing read yet: no cap
    assert policy.refresh(["dagster", "other", "idle"], {"dagster": 6, "other": 1}) == {
        "dagster": 12,
        "other": 4,
        "idle": 4,
    }
    assert policy.refresh(["dagster"], {"dagster": 10}) == {"dagster": 20}  # workers were added
    assert LaunchPolicy("dagster", per_slot=None, floor=4).refresh(["dagster"], {"dagster": 6}) == {}


def test_past_the_live_slots_refills_wait_for_a_whole_batch():
    policy = LaunchPolicy("dagster", per_slot=2.0, floor=1)
    policy.refresh(["dagster"], {"dagster": 4})  # cap 8, refill batches of 4
    assert policy.room("dagster", 0) == 8
    assert policy.room("dagster", 4) == 4  # no more than the slots in flight: refill
    assert [policy.room("dagster", n) for n in (5, 6, 7, 8)] == [0, 0, 0, 0]  # a batch of 4 does not fit yet
    policy.refresh(["dagster"], {})  # no live worker: the floor, one at a time
    assert [policy.room("dagster", n) for n in (0, 1)] == [1, 0]


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("steps_in_flight_per_slot", "lots", "steps_in_flight_per_slot must be a number of at least 1"),
        ("steps_in_flight_per_slot", 0.5, "steps_in_flight_per_slot must be a number of at least 1"),
        ("steps_in_flight_per_slot", True, "steps_in_flight_per_slot must be a number of at least 1"),
        ("min_steps_in_flight", 0, "min_steps_in_flight must be a whole number between 1 and 100000"),
        ("min_steps_in_flight", "four", "min_steps_in_flight must be a whole number"),
    ],
)
def test_each_bad_value_is_one_sentence_naming_its_key(key, value, words):
    with pytest.raises(ConfigError) as raised:
        settings_from_executor_config({key: value})
    assert f"execution.config.{words}" in str(raised.value)


def test_none_turns_the_cap_off_and_the_defaults_are_two_per_slot_and_four():
    assert settings_from_executor_config({"steps_in_flight_per_slot": "none"}).steps_in_flight_per_slot is None
    assert settings_from_executor_config({"steps_in_flight_per_slot": "1.5"}).steps_in_flight_per_slot == 1.5
    defaults = settings_from_executor_config({})
    assert (defaults.steps_in_flight_per_slot, defaults.min_steps_in_flight) == (2.0, 4)


# --- on real workers ----------------------------------------------------------------------------


def _events(instance, run_id):
    return [(r.timestamp, r.dagster_event) for r in instance.all_logs(run_id) if r.dagster_event is not None]


def _most_in_flight(instance, run_id) -> int:
    """Most steps launched and not yet finished at any point of the run's event log."""
    in_flight = most = 0
    for _ts, event in _events(instance, run_id):
        if event.event_type == DagsterEventType.STEP_WORKER_STARTING:
            in_flight += 1
            most = max(most, in_flight)
        elif event.event_type in (DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE):
            in_flight -= 1
    return most


@pytest.mark.parametrize("per_slot, expected_most", [(2, 2), ("none", 6)], ids=["capped", "none"])
def test_a_run_keeps_at_most_its_share_of_steps_in_flight(endpoint, instance, tmp_path, per_slot, expected_most):
    # Given one worker with one slot on the queue (cap: 2 x 1 slot, floor 1)
    queue = f"share-{per_slot}"
    config, path = make_config(endpoint, tmp_path, queue, steps_in_flight_per_slot=per_slot, min_steps_in_flight=1)
    worker = WorkerProcess(path, f"share-{per_slot}", tmp_path, ["-q", queue, "-c", "1"]).wait_ready()
    try:
        # When a run fans out to six steps
        with execute_job(
            reconstructable(jobs.fan_out_fan_in), instance=instance, run_config={"execution": {"config": config}}
        ) as result:
            assert result.success
        # Then at most two of them were in flight at once (all six without a cap), and the run says why
        assert _most_in_flight(instance, result.run_id) == expected_most
        said = [
            e.message
            for _ts, e in _events(instance, result.run_id)
            if e.event_type == DagsterEventType.ENGINE_EVENT and "steps in flight" in (e.message or "")
        ]
        if per_slot == "none":
            assert said == []
        else:
            assert len(said) == 1 and "at most 2 of its steps in flight" in said[0] and "1 slots" in said[0], said
    finally:
        assert worker.stop() == 0


@pytest.mark.parametrize("per_slot", [2, "none"], ids=["capped", "none"])
def test_an_interactive_run_is_not_queued_behind_a_whole_fan_out(endpoint, instance, tmp_path, per_slot):
    # Given a fan-out of twelve 0.3 s steps in flight on a queue served by one slot
    queue = f"interactive-{per_slot}"
    config, path = make_config(endpoint, tmp_path, queue, steps_in_flight_per_slot=per_slot, min_steps_in_flight=1)
    worker = WorkerProcess(path, f"interactive-{per_slot}", tmp_path, ["-q", queue, "-c", "1"]).wait_ready()
    try:
        before = {run.run_id for run in instance.get_runs(filters=RunsFilter(job_name="wide_fan"))}
        backfill = BackgroundRun(fair_jobs.wide_fan, instance, {"execution": {"config": config}})
        big_run_id = wait_for(
            lambda: next(
                (
                    run.run_id
                    for run in instance.get_runs(filters=RunsFilter(job_name="wide_fan"))
                    if run.run_id not in before
                ),
                None,
            ),
            what="the fan-out run",
        )
        wait_for(
            lambda: any(
                e.event_type == DagsterEventType.STEP_START and e.step_key.startswith("branch_")
                for _ts, e in _events(instance, big_run_id)
            ),
            timeout=120,
            what="the fan-out to start",
        )
        # When a small run starts on the same queue
        with execute_job(
            reconstructable(jobs.diamond), instance=instance, run_config={"execution": {"config": config}}
        ) as small:
            assert small.success
        assert backfill.wait(300).success
        # Then its first step ran after at most the fan-out's steps already queued when it was sent
        # (two in flight: one running, one queued), not after every remaining branch
        small_events = _events(instance, small.run_id)
        sent = next(ts for ts, e in small_events if e.event_type == DagsterEventType.STEP_WORKER_STARTING)
        started = next(ts for ts, e in small_events if e.event_type == DagsterEventType.STEP_START)
        overtaking = [
            e.step_key
            for ts, e in _events(instance, big_run_id)
            if e.event_type == DagsterEventType.STEP_START and sent < ts < started
        ]
        if per_slot == "none":
            assert len(overtaking) >= 3, overtaking  # the defect the cap removes: behind every queued branch
        else:
            assert len(overtaking) <= 2, overtaking
    finally:
        assert worker.stop() == 0
