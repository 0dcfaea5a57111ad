"""Lanes: which runs are bulk, the fair-queue group of a message, and how a worker's room is shared
between the interactive and the bulk lane (``wire/lanes.py``, ``worker/capacity.py``)."""

from __future__ import annotations

import os
import re
import threading

import pytest

from dagster_taskiq_sync.config.celery_compat import settings_from_executor_config
from dagster_taskiq_sync.errors import ConfigError
from dagster_taskiq_sync.storage.instance import InstanceOptions
from dagster_taskiq_sync.wire.lanes import (
    BULK,
    BULK_ORCHESTRATOR_NICENESS,
    INTERACTIVE,
    lane_queue,
    lowered_thread_priority,
    message_group,
    run_lane,
    with_lanes,
)
from dagster_taskiq_sync.wire.messages import RUN_PRIORITY_TAGS, STEP_PRIORITY_TAGS, int_tag
from dagster_taskiq_sync.worker.capacity import Capacity
from dagster_taskiq_sync.worker.child_pipe import StepChild
from dagster_taskiq_sync.worker.step_runner import StepRunner

# --- which lane a run takes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "tags, priority, lane",
    [
        ({}, 0, INTERACTIVE),
        ({"dagster/backfill": "abc"}, 0, BULK),  # what Dagster's backfill daemon puts on its runs
        ({}, -1, BULK),  # negative run priority: Dagster's run queue serves it last, and so do workers
        ({"dagster-taskiq/lane": "interactive"}, -5, INTERACTIVE),  # the explicit tag wins
        ({"dagster-taskiq/lane": "interactive", "dagster/backfill": "abc"}, 0, INTERACTIVE),
        ({"dagster-taskiq/lane": "bulk"}, 10, BULK),
    ],
)
def test_a_run_is_bulk_when_tagged_so_or_part_of_a_backfill_or_of_negative_priority(tags, priority, lane):
    assert run_lane(tags, priority)[0] == lane


def test_a_bad_lane_tag_is_one_sentence_naming_the_tag():
    with pytest.raises(ConfigError, match=r"tag dagster-taskiq/lane='fast' must be 'bulk' or 'interactive'"):
        run_lane({"dagster-taskiq/lane": "fast"}, 0)


def test_dagster_priority_counts_as_run_and_step_priority_after_the_executors_own_tags():
    assert int_tag({"dagster/priority": "-3"}, RUN_PRIORITY_TAGS, 0) == -3
    assert int_tag({"dagster/priority": "-3", "dagster-celery/run_priority": "2"}, RUN_PRIORITY_TAGS, 0) == 2
    assert int_tag({"dagster/priority": "7"}, STEP_PRIORITY_TAGS, 5) == 7
    assert int_tag({"dagster/priority": "7", "dagster-celery/priority": "1"}, STEP_PRIORITY_TAGS, 5) == 1


# --- lane queues and what names them ------------------------------------------------------------


def test_every_standard_queue_has_a_bulk_lane_and_fifo_queues_have_none():
    assert lane_queue("dagster", "dagster") == "dagster-bulk"
    assert lane_queue("jobs.fifo", "jobs.fifo") is None
    assert lane_queue("dagster-bulk", "dagster-bulk") is None  # a lane has no lane
    assert with_lanes(["dagster", "big", "jobs.fifo"], lambda q: q) == [
        "dagster",
        "dagster-bulk",
        "big",
        "big-bulk",
        "jobs.fifo",
    ]


def test_queues_create_stats_and_iam_cover_the_lanes_only_when_lanes_are_on():
    routes = [{"queue": "big", "when": {"ecs/memory": ">= 8192"}}]
    off = settings_from_executor_config({"routes": routes})
    on = settings_from_executor_config({"routes": routes, "lanes": True})
    assert off.config_queues(["extra"]) == ["dagster", "big", "extra"]
    assert on.config_queues(["extra"]) == ["dagster", "dagster-bulk", "big", "big-bulk", "extra", "extra-bulk"]


def test_lane_settings_are_checked_by_name():
    with pytest.raises(ConfigError, match="execution.config.lanes must be true or false"):
        settings_from_executor_config({"lanes": "sometimes"})
    with pytest.raises(ConfigError, match="execution.config.message_group_tag must be a non-empty string"):
        settings_from_executor_config({"message_group_tag": ""})


# --- names the user gives: with lanes, a name ending in -bulk is another queue's lane ---------------

LANE_NAME = "ends in '-bulk', which with execution.config.lanes is the bulk lane of queue"


@pytest.mark.parametrize(
    "config, said",
    [
        (
            {"config_source": {"task_default_queue": "reports-bulk"}},
            f"execution.config.config_source.task_default_queue 'reports-bulk' {LANE_NAME} 'reports'",
        ),
        (  # kombu turns '.' into '-': in SQS this is the lane of etl
            {"routes": [{"queue": "etl.bulk", "when": {"ecs/memory": ">= 8192"}}]},
            f"execution.config.routes[0].queue 'etl.bulk' ('etl-bulk' in SQS) {LANE_NAME} 'etl'",
        ),
    ],
)
def test_with_lanes_a_config_queue_named_like_a_bulk_lane_is_refused_by_its_setting(config, said):
    settings_from_executor_config(config)  # without lanes it is a queue like any other
    with pytest.raises(ConfigError) as refused:
        settings_from_executor_config({**config, "lanes": True})
    assert str(refused.value).startswith(said), refused.value
    assert str(refused.value).endswith("otherwise rename the queue, or set execution.config.lanes: false.")


def test_with_lanes_a_dash_q_named_like_a_bulk_lane_is_refused_for_a_worker_and_queues_create(tmp_path):
    import yaml

    from dagster_taskiq_sync.config.worker_config import WorkerConfig

    path = tmp_path / "lanes.yaml"
    path.write_text(yaml.safe_dump({"execution": {"config": {"lanes": True}}}))
    said = f"-q 'dagster-bulk' {LANE_NAME} 'dagster' (workers run its steps after interactive ones, at a lower "
    said += "CPU priority); if you meant that lane, name 'dagster': its lane comes with it; otherwise"
    with pytest.raises(ConfigError, match=re.escape(said)):
        WorkerConfig.from_yaml(str(path), queues=["dagster-bulk"], concurrency=1)
    on = settings_from_executor_config({"lanes": True})
    with pytest.raises(ConfigError, match=re.escape(said)):
        on.config_queues(["dagster-bulk"])  # queues create -q, iam-policy -q
    # a FIFO queue has no lane, so its name is free; without lanes every name is
    assert on.config_queues(["jobs-bulk.fifo"]) == ["dagster", "dagster-bulk", "jobs-bulk.fifo"]
    off = WorkerConfig.from_yaml(None, queues=["dagster-bulk"], concurrency=1)
    assert off.queues == ("dagster-bulk",)


def test_with_lanes_a_steps_queue_tag_naming_a_bulk_lane_fails_the_step_with_the_sentence():
    from dagster_taskiq_sync.orchestrator.step_handler import TaskiqStepHandler

    tagged = {"dagster-celery/queue": "reports-bulk"}
    on = TaskiqStepHandler(settings_from_executor_config({"lanes": True}))
    decision = on.decision("load", tagged)
    assert decision.refused == (
        f"step load's queue tag 'reports-bulk' {LANE_NAME} 'reports' (workers run its steps after interactive "
        "ones, at a lower CPU priority); if you meant that lane, tag the step 'reports' and the run "
        "dagster-taskiq/lane: bulk; otherwise rename the queue, or set execution.config.lanes: false."
    )
    assert on.decision("other", {"dagster-celery/queue": "reports"}).refused is None
    off = TaskiqStepHandler(settings_from_executor_config({}))
    assert (off.decision("load", tagged).queue, off.decision("load", tagged).refused) == ("reports-bulk", None)


# --- one set of slots serves a queue and its lane ------------------------------------------------


def _worker(name: str, queues: list[str], concurrency: int = 2, running: int = 0):
    from dagster_taskiq_sync.storage.registry import WorkerRecord

    return WorkerRecord(name=name, host="h", pid=1, queues=queues, concurrency=concurrency, running=["s"] * running)


def _rows(**backlog: int):
    from dagster_taskiq_sync.ops.queue_depths import QueueStats

    return [
        QueueStats(queue=q, sqs_name=q, visible=n) for q, n in ((k.replace("_", "-"), v) for k, v in backlog.items())
    ]


def test_stats_count_a_lanes_backlog_with_its_queue_and_its_workers_once():
    from dagster_taskiq_sync.ops.queue_depths import add_workers

    # Given two workers (-c 2) of -q q with lanes, 40 interactive and 40 bulk messages
    workers = [_worker("a@h", ["q", "q-bulk"], running=1), _worker("b@h", ["q", "q-bulk"])]
    q, lane = rows = _rows(q=40, q_bulk=40)
    add_workers(rows, workers, prefetch_multiplier=1, config_concurrency=None, target=None, lanes={"q-bulk": "q"})
    # Then the pool needs ceil(80 / 2) replicas, said once on the queue's row (as KEDA's summed triggers)
    assert (q.replicas_needed, q.lane, q.target_backlog_per_worker) == (40, "q-bulk", 2)
    assert (lane.replicas_needed, lane.lane_of) == (None, "q")
    # and the lane's workers are the queue's: 2 workers, 3 free slots, not 4 and 6
    assert (len(q.workers), q.free_slots) == (2, 3)
    assert {w.name for w in lane.workers} == {w.name for w in q.workers}
    # Without lanes each queue is its own: 20 and 20, the max of which asked for half the workers
    alone = _rows(q=40, q_bulk=40)
    add_workers(alone, workers, prefetch_multiplier=1, config_concurrency=None, target=None)
    assert [(s.replicas_needed, s.lane, s.lane_of) for s in alone] == [(20, None, None), (20, None, None)]


def test_a_lane_with_a_worker_that_skips_its_queue_is_shown_on_its_own():
    from dagster_taskiq_sync.ops.queue_depths import add_workers

    rows = _rows(q=4, q_bulk=4)
    workers = [_worker("a@h", ["q", "q-bulk"]), _worker("other-config@h", ["q-bulk"])]
    add_workers(rows, workers, prefetch_multiplier=1, config_concurrency=None, target=None, lanes={"q-bulk": "q"})
    assert [(s.replicas_needed, s.lane_of) for s in rows] == [(2, None), (2, None)]


def test_the_orchestrators_live_slots_give_a_queue_and_its_lane_the_same_slots_once_each():
    from dagster_taskiq_sync.orchestrator.fair_share import LaunchPolicy, live_slots

    # A run's cap is per queue, never a sum over queues: the lane's slots are the queue's, and a
    # bulk run (on the lane) gets the cap an interactive run (on the queue) gets.
    slots = live_slots([_worker("a@h", ["q", "q-bulk"], concurrency=3), _worker("b@h", ["q", "q-bulk"])])
    assert slots == {"q": 5, "q-bulk": 5}
    policy = LaunchPolicy("q", per_slot=2.0, floor=4)
    assert policy.refresh(["q", "q-bulk"], slots) == {"q": 10, "q-bulk": 10}


# --- fair-queue groups --------------------------------------------------------------------------


def test_a_runs_messages_are_grouped_by_run_id_or_by_the_named_tag():
    tags = {"dagster/code_location": "team a/etl", "team": "x" * 300}
    assert message_group("run-1", tags, None) == "run-1"
    assert message_group("run-1", tags, "missing") == "run-1"
    # SQS takes printable ASCII without spaces, up to 128 characters
    assert message_group("run-1", tags, "dagster/code_location") == "team_a/etl"
    assert message_group("run-1", tags, "team") == "x" * 128


# --- a worker's room between lanes --------------------------------------------------------------


def test_a_worker_full_of_bulk_steps_still_takes_an_interactive_one():
    # Given -c 2 with a bulk lane and one interactive slot, both bulk slots busy
    capacity = Capacity(2, bulk={"q-bulk"}, reserve=1)
    assert capacity.acquire("q-bulk", 10, 10, timeout=0).count == 2
    assert capacity.acquire("q-bulk", 10, 10, timeout=0) is None  # the bulk lane never has more than -c
    # When an interactive message comes, then there is room for it (and no more)
    assert capacity.acquire("q", 10, 10, timeout=0).count == 1
    assert capacity.acquire("q", 10, 10, timeout=0) is None
    # And when a bulk step ends, its slot goes back to the bulk lane
    capacity.release(1, "q-bulk")
    assert capacity.acquire("q-bulk", 10, 10, timeout=0).count == 1


def test_the_interactive_lane_is_served_first_and_takes_at_most_c_itself():
    capacity = Capacity(2, bulk={"q-bulk"}, reserve=1)
    capacity._waiting.add("q-bulk")  # the bulk consumer waits for room too
    grant = capacity.acquire("q", 10, 10, timeout=0)
    assert grant is not None and grant.count == 1  # first, and half of the free room each
    assert capacity.acquire("q", 10, 10, timeout=0).count == 1
    assert capacity.acquire("q", 10, 10, timeout=0) is None  # -c of one lane
    capacity._waiting.discard("q-bulk")
    assert capacity.acquire("q-bulk", 10, 10, timeout=0).count == 1  # the reserve, the other way round
    assert capacity.acquire("q-bulk", 10, 10, timeout=0) is None


def test_without_a_reserve_the_lanes_share_the_limit_as_any_queues_do():
    capacity = Capacity(2)
    assert capacity.acquire("q-bulk", 10, 10, timeout=0).count == 2
    assert capacity.acquire("q", 10, 10, timeout=0) is None


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_after_an_interactive_step_arrives_or_ends_the_bulk_lane_takes_nothing_new_for_bulk_yield():
    clock = Clock()
    capacity = Capacity(2, clock=clock, bulk={"q-bulk"}, reserve=1, bulk_yield=0.5)
    assert capacity.acquire("q-bulk", 1, 10, timeout=0).count == 1  # a bulk step runs
    capacity.interactive_step("q")  # an interactive step arrives
    assert capacity.acquire("q-bulk", 10, 10, timeout=0) is None  # a free bulk slot, but the lane yields
    assert capacity.acquire("q", 10, 10, timeout=0).count == 2  # the interactive lane is not held
    capacity.release(2, "q")
    clock.now += 0.4
    capacity.interactive_step("q")  # it ends: the window starts again
    clock.now += 0.4
    assert capacity.acquire("q-bulk", 10, 10, timeout=0) is None
    capacity.interactive_step("q-bulk")  # bulk steps' comings and goings do not hold the lane
    clock.now += 0.11
    assert capacity.acquire("q-bulk", 10, 10, timeout=0).count == 1  # bulk_yield after the last one


def test_the_bulk_lane_yields_only_with_lanes_and_a_bulk_yield():
    clock = Clock()
    for capacity in (
        Capacity(2, clock=clock, bulk={"q-bulk"}, reserve=1, bulk_yield=0),  # --bulk-yield 0
        Capacity(2, clock=clock, bulk_yield=0.5),  # no lanes: every queue is the worker's own
    ):
        capacity.interactive_step("q")
        assert capacity.acquire("q-bulk", 1, 10, timeout=0).count == 1


def test_a_bulk_consumer_waiting_for_room_is_woken_when_the_yield_ends():
    clock = Clock()
    capacity = Capacity(2, clock=clock, bulk={"q-bulk"}, reserve=1, bulk_yield=0.5)
    capacity.interactive_step("q")
    waits = []

    def wait(timeout):  # nothing is released or notified: only the wait's own timeout ends it
        waits.append(timeout)
        clock.now += timeout
        return False

    capacity._cond.wait = wait
    grant = capacity.acquire("q-bulk", 10, 10, timeout=30)
    assert grant is not None and grant.count == 2
    assert waits == [pytest.approx(0.5)]  # when the window ends, not the consumer's 30 s


def test_a_worker_consumes_each_queues_lane_and_keeps_an_interactive_slot_only_with_lanes(tmp_path):
    import yaml

    from dagster_taskiq_sync.config.worker_config import WorkerConfig

    path = tmp_path / "lanes.yaml"
    path.write_text(yaml.safe_dump({"execution": {"config": {"lanes": True}}}))
    on = WorkerConfig.from_yaml(str(path), queues=["dagster", "jobs.fifo"], concurrency=2)
    assert (on.queues, on.interactive_slots) == (("dagster", "dagster-bulk", "jobs.fifo"), 1)
    assert WorkerConfig.from_yaml(str(path), concurrency=2, interactive_slots=0).interactive_slots == 0
    off = WorkerConfig.from_yaml(None, queues=["dagster"], concurrency=2, interactive_slots=3)
    assert (off.queues, off.interactive_slots) == (("dagster",), 0)  # no lane: nothing to keep room for


def test_iam_policy_grants_the_lanes_of_a_config_with_lanes(tmp_path):
    import yaml
    from click.testing import CliRunner

    from dagster_taskiq_sync.cli import main

    path = tmp_path / "lanes.yaml"
    config = {"broker": "sqs://", "lanes": True, "config_source": {"broker_transport_options": {"region": "us-east-1"}}}
    path.write_text(yaml.safe_dump({"execution": {"config": config}}))
    out = CliRunner().invoke(main, ["iam-policy", "-y", str(path), "--account-id", "123456789012", "--role", "worker"])
    assert out.exit_code == 0, out.output
    assert "arn:aws:sqs:us-east-1:123456789012:dagster-bulk" in out.output
    assert "arn:aws:sqs:us-east-1:123456789012:dagster-bulk-dlq" in out.output


def test_a_bulk_runs_orchestrating_thread_and_the_threads_it_starts_yield_the_cpu_until_the_run_ends():
    # Given a thread of this process at its normal priority
    seen: dict[str, int] = {}

    def orchestrate() -> None:
        tid = threading.get_native_id()
        seen["before"] = os.getpriority(os.PRIO_PROCESS, tid)
        # When it orchestrates a bulk run, and starts a sender thread meanwhile
        with lowered_thread_priority(BULK_ORCHESTRATOR_NICENESS, "test") as lowered:
            seen["lowered"] = lowered
            seen["during"] = os.getpriority(os.PRIO_PROCESS, tid)
            sender = threading.Thread(
                target=lambda: seen.__setitem__("sender", os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
            )
            sender.start()
            sender.join()
        seen["after"] = os.getpriority(os.PRIO_PROCESS, tid)

    thread = threading.Thread(target=orchestrate)
    thread.start()
    thread.join()
    # Then both ran at the lower priority, while the rest of the process did not
    expected = min(19, seen["before"] + BULK_ORCHESTRATOR_NICENESS)
    assert seen["lowered"] is True
    assert seen["during"] == seen["sender"] == expected
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == seen["before"]
    # And afterwards the thread is back where it was when raising is allowed (root here), else stays lowered
    may_raise = os.geteuid() == 0
    assert seen["after"] == (seen["before"] if may_raise else expected)


class _FakeProcess:
    exitcode = None
    pid = 0

    def join(self, timeout: float) -> None:
        self.exitcode = 0

    def close(self) -> None:
        pass


class _FakeConn:
    def __init__(self) -> None:
        self.sent: list = []

    def send(self, message) -> None:
        self.sent.append(message)

    def close(self) -> None:
        pass


def _child(niced: bool) -> StepChild:
    return StepChild(_FakeProcess(), _FakeConn(), niced=niced)


def test_after_a_backfill_an_interactive_child_is_kept_in_place_of_a_lowered_idle_one():
    # Given a worker of 2 slots whose idle pool holds the backfill's two lowered children
    runner = StepRunner("unused", InstanceOptions())
    runner.max_idle = 2
    lowered = [_child(niced=True), _child(niced=True)]
    runner._idle.extend(lowered)
    # When an interactive step's child (forked because none idle was at full priority) is given back
    interactive = _child(niced=False)
    runner.give_back(interactive)
    # Then it stays for the next interactive step and one lowered child is stopped instead
    assert interactive in runner._idle and len(runner._idle) == 2
    stopped = [c for c in lowered if c not in runner._idle]
    assert len(stopped) == 1 and stopped[0].process.exitcode is not None
    assert interactive.process.exitcode is None
    # And a lowered child given back to a full pool is the one stopped
    extra = _child(niced=True)
    runner.give_back(extra)
    assert extra not in runner._idle and extra.process.exitcode is not None
    assert interactive in runner._idle


def test_a_bulk_step_never_takes_the_plain_idle_children_kept_for_interactive_steps():
    # Given a worker with lanes (one interactive reserve slot) whose only idle child is a plain one
    runner = StepRunner("unused", InstanceOptions())
    runner.max_idle, runner.interactive_reserve = 3, 1
    plain = _child(niced=False)
    runner._idle.append(plain)
    # Then a bulk step finds no child it may take (it forks one), and an interactive step takes it
    with runner._lock:
        assert runner._take_idle(bulk=True) is None
        assert runner._take_idle(bulk=False) is plain
    # And a plain child beyond the reserve, or a lowered one, is the bulk step's to take
    lowered, spare = _child(niced=True), _child(niced=False)
    runner._idle.extend([plain, spare, lowered])
    with runner._lock:
        assert runner._take_idle(bulk=True) is lowered
        assert runner._take_idle(bulk=True) in (plain, spare)
        assert runner._take_idle(bulk=True) is None
    # Without lanes (no reserve) a bulk step may take any idle child, as before
    runner.interactive_reserve = 0
    with runner._lock:
        assert runner._take_idle(bulk=True) in (plain, spare)


def test_a_refused_message_never_holds_the_bulk_lane():
    # Only an admitted step moves the lanes (Request._start, _finish; the e2e lanes test shows it
    # on a real worker): a stream of forged or duplicate messages must not starve a backfill.
    from types import SimpleNamespace

    from dagster_taskiq_sync.wire.deliveries import Delivery
    from dagster_taskiq_sync.worker.admission import Outcome, Verdict
    from dagster_taskiq_sync.worker.request import Request

    moved: list[str] = []
    context = SimpleNamespace(on_step_moved=moved.append, metrics=SimpleNamespace(step_received=lambda queue: None))
    refused = Request(Delivery("dagster", "http://sqs/dagster", "rh", "m-1", 1, b"{}", {}), context)
    refused.admit = lambda: Verdict(Outcome.DEAD_LETTER, "a forged message")
    refused.settle = lambda verdict: verdict
    assert refused.handle().outcome is Outcome.DEAD_LETTER
    assert moved == []
