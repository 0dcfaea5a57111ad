"""The worker's rules as plain units with an injected clock: drop rules, kill escalation, capacity
fairness between queues. Milliseconds each; the end-to-end tests exercise the same paths on real
workers."""

from __future__ import annotations

import pathlib
import threading
import time
from types import SimpleNamespace

import pytest
from dagster import DagsterEventType, DagsterRunStatus

from dagster_taskiq_sync.ops.metrics import NullMetrics
from dagster_taskiq_sync.storage.liveness import DEAD_LETTERED, EXITED, QUEUED, RUNNING, StepRecord
from dagster_taskiq_sync.wire.messages import RunMessage, StepMessage, TaskKind
from dagster_taskiq_sync.wire.settings import Settings
from dagster_taskiq_sync.worker.admission import (
    DROP_RULES,
    Drop,
    Outcome,
    Verdict,
    already_started,
    could_not_run_before,
    ran_to_its_end,
    run_cannot_take_it,
    run_is_over,
    run_missing,
)
from dagster_taskiq_sync.worker.capacity import Capacity
from dagster_taskiq_sync.worker.liveness_thread import ENDING_GRACE, LivenessThread
from dagster_taskiq_sync.worker.request import RUN_INTERRUPT_GRACE, Request
from tests.supervision import Clock, supervising_request

STEP = StepMessage("0b6f9c7e-6a43-4c1e-9d55-3c2f9a1d2b10", "emit_one", 1, "{}")
RUN = RunMessage(TaskKind.RUN, STEP.run_id, "launch")
RESUME = RunMessage(TaskKind.RESUME, STEP.run_id, "resume-1")


def run(status: DagsterRunStatus):
    return SimpleNamespace(status=status)


def first_verdict(message, the_run, previous=None, lost_timeout=30.0):
    for rule in DROP_RULES:
        verdict = rule(message, the_run, previous, lost_timeout)
        if verdict is not None:
            return rule.__name__, verdict
    return None, None


# --- drop rules ------------------------------------------------------------------------------------------


def test_a_step_of_a_started_run_that_its_orchestrator_sent_runs():
    assert first_verdict(STEP, run(DagsterRunStatus.STARTED), StepRecord(QUEUED, queue="q")) == (None, None)


@pytest.mark.parametrize(
    "message",
    [
        STEP,  # a step the orchestrator has not sent (yet)
        StepMessage(STEP.run_id, "emit_one", 2, "{}"),  # attempt 2 of a step that ended (issue 19 row 6)
        RESUME,  # a resume of a run nobody resumed (issue 19 row 6)
    ],
    ids=["unsent-step", "attempt-2-of-a-finished-step", "forged-resume"],
)
def test_what_no_sender_recorded_sending_is_dead_lettered_without_a_record(message):
    # Given a STARTED run and no queued record for the message's attempt or launch
    name, verdict = first_verdict(message, run(DagsterRunStatus.STARTED))
    # Then it never runs, and nothing is written for it (so a real message sent later still runs)
    assert name == "never_sent" and verdict.outcome is Outcome.DEAD_LETTER and verdict.unrecorded
    assert f"no orchestrator or run launcher of this instance sent {message.label}" in verdict.why


def test_a_run_this_worker_does_not_have_can_never_run():
    verdict = run_missing(STEP, None, None, 30)
    assert verdict.outcome is Outcome.DEAD_LETTER and "is not in this worker's Dagster instance" in verdict.why


@pytest.mark.parametrize("state", [RUNNING, EXITED])
def test_an_attempt_that_already_started_is_dropped_not_rerun(state):
    previous = StepRecord(state, worker="w1@h")
    name, verdict = first_verdict(STEP, run(DagsterRunStatus.STARTED), previous)
    assert name == "already_started" and verdict.outcome is Outcome.DONE and verdict.dropped is Drop.DUPLICATE
    assert "already " + ("started" if state == RUNNING else "ran") + " on worker w1@h" in verdict.why


def test_a_lost_attempt_says_its_worker_was_lost():
    previous = StepRecord(RUNNING, ts=time.time() - 120, worker="w1@h", heartbeat_interval=5)
    verdict = already_started(STEP, run(DagsterRunStatus.STARTED), previous, 30)
    assert "stopped heartbeating 120 s ago (lost)" in verdict.why


def test_a_lost_attempt_whose_outcome_is_in_the_event_log_ran_to_its_end():
    previous = StepRecord(RUNNING, ts=time.time() - 120, worker="w1@h", heartbeat_interval=5)
    assert ran_to_its_end(STEP, previous, attempts_ended=0) is None  # no outcome: lost
    verdict = ran_to_its_end(STEP, previous, attempts_ended=1)
    assert verdict.outcome is Outcome.DONE and not verdict.lost and verdict.dropped is Drop.DUPLICATE
    assert "already started on worker w1@h and has ended (the run's event log has its outcome)" in verdict.why
    assert ran_to_its_end(RESUME, previous, attempts_ended=1) is None


def test_an_unrecorded_attempt_whose_outcome_is_in_the_event_log_is_dropped_not_dead_lettered():
    # Found by bin/soak: a SIGKILLed worker's message came back after its run had retried the step
    # and finished, and the run's records were deleted: it was sent, and it has ended.
    assert ran_to_its_end(STEP, None, attempts_ended=0) is None  # no outcome: never_sent stands
    verdict = ran_to_its_end(STEP, None, attempts_ended=1)
    assert verdict.outcome is Outcome.DONE and verdict.dropped is Drop.DUPLICATE
    assert "already ran and has ended (the run's event log has its outcome" in verdict.why


def test_a_redelivered_message_of_a_finished_attempt_is_not_called_lost(monkeypatch):
    # Found by bin/soak: a step ran to its end during an SQS outage, its delete failed, the
    # message came back, and the worker dropped it as "... stopped heartbeating 12 s ago (lost)"
    # and wrote "Step X is not run again ... its health check fails it" into the run's own log.
    previous = StepRecord(RUNNING, ts=time.time() - 12, worker="w1@h", heartbeat_interval=2)
    outcomes = [SimpleNamespace(step_key="other_step", dagster_event=None)]
    asked = []

    def all_logs(run_id, of_type=None):
        asked.append((run_id, of_type))
        return list(outcomes)

    worker = SimpleNamespace(
        name="w2",
        settings=Settings(worker_lost_timeout=10),
        stopping=threading.Event(),
        instance=SimpleNamespace(get_run_by_id=lambda run_id: run(DagsterRunStatus.STARTED), all_logs=all_logs),
        store=SimpleNamespace(read=lambda task_ids: {STEP.task_id: previous}),
    )
    request = Request(SimpleNamespace(queue="q", message_id="m", receive_count=2), worker)
    monkeypatch.setattr(request, "_open", lambda: STEP)

    # no outcome of the step in the event log: its worker was lost while it ran
    verdict = request.admit()
    assert verdict.outcome is Outcome.DONE and verdict.lost and "(lost)" in verdict.why
    assert asked and asked[0][0] == STEP.run_id and DagsterEventType.STEP_SUCCESS in asked[0][1]

    # its STEP_SUCCESS is there: it ran to its end, and nothing says it was lost
    outcomes.append(SimpleNamespace(step_key=STEP.step_key, dagster_event=None))
    verdict = request.admit()
    assert verdict.outcome is Outcome.DONE and not verdict.lost
    assert (
        verdict.why
        == f"{STEP.label} already started on worker w1@h and has ended (the run's event log has its outcome)"
    )


def test_a_lost_run_launch_is_dropped_and_deleted_and_only_steps_are_explained_in_the_run_log(monkeypatch):
    # Found by the run-launcher tests: a launch message whose worker was SIGKILLed comes back; the
    # drop's explanation (written for step attempts only) raised for it and the message was never
    # deleted. Settling deletes it whatever the report does.
    previous = StepRecord(RUNNING, ts=time.time() - 30, worker="w1@h", heartbeat_interval=2)
    deleted, events = [], []
    worker = SimpleNamespace(
        name="w2",
        settings=Settings(worker_lost_timeout=10),
        stopping=threading.Event(),
        instance=SimpleNamespace(
            get_run_by_id=lambda run_id: run(DagsterRunStatus.STARTED),
            report_engine_event=lambda *a, **k: events.append(a),
        ),
        store=SimpleNamespace(read=lambda task_ids: {RUN.task_id: previous}),
        acks=SimpleNamespace(delete=lambda delivery, pointer: deleted.append(delivery)),
        metrics=SimpleNamespace(step_dropped_duplicate=lambda queue: None),
    )
    delivery = SimpleNamespace(queue="runs", message_id="m", receive_count=2)
    request = Request(delivery, worker)
    monkeypatch.setattr(request, "_open", lambda: RUN)
    verdict = request.settle(request.admit())
    assert verdict.outcome is Outcome.DONE and verdict.lost and "(lost)" in verdict.why
    assert deleted == [delivery] and events == []

    # and a report that fails (the run's log unreachable) does not keep a step's message either
    def broken(*args, **kwargs):
        raise RuntimeError("database is gone")

    worker.instance.report_engine_event = broken
    worker.instance.all_logs = lambda run_id, of_type=None: []
    worker.store.read = lambda task_ids: {STEP.task_id: previous}
    step_request = Request(delivery, worker)
    monkeypatch.setattr(step_request, "_open", lambda: STEP)
    assert step_request.settle(step_request.admit()).lost
    assert deleted == [delivery, delivery]


def test_an_attempt_that_could_not_run_before_goes_to_the_dead_letter_queue():
    previous = StepRecord(DEAD_LETTERED, worker="w1@h", reason="its job could not be loaded", cannot_run=True)
    verdict = could_not_run_before(STEP, run(DagsterRunStatus.STARTED), previous, 30)
    assert verdict.outcome is Outcome.DEAD_LETTER and "its job could not be loaded" in verdict.why


@pytest.mark.parametrize(
    "status",
    [DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELING, DagsterRunStatus.CANCELED],
)
def test_nothing_runs_for_a_run_that_is_over(status):
    for message in (STEP, RUN, RESUME):
        verdict = run_is_over(message, run(status), None, 30)
        assert verdict.outcome is Outcome.DONE and status.value in verdict.why
        assert verdict.dropped is Drop.RUN_OVER  # counted as a drop, not as a duplicate


def test_a_verdict_that_ran_the_message_is_no_drop():
    assert Verdict(Outcome.DONE).dropped is None


@pytest.mark.parametrize(
    "message, status, runs",
    [
        (STEP, DagsterRunStatus.STARTED, True),
        (STEP, DagsterRunStatus.NOT_STARTED, False),  # no orchestrator sent this
        (STEP, DagsterRunStatus.QUEUED, False),
        (RUN, DagsterRunStatus.STARTING, True),
        (RUN, DagsterRunStatus.NOT_STARTED, True),
        (RUN, DagsterRunStatus.STARTED, False),  # already running somewhere: never twice
        (RESUME, DagsterRunStatus.STARTED, True),
        (RESUME, DagsterRunStatus.NOT_STARTED, False),
    ],
)
def test_a_message_must_fit_its_runs_state(message, status, runs):
    verdict = run_cannot_take_it(message, run(status), None, 30)
    assert (verdict is None) == runs
    if verdict is not None:
        assert verdict.outcome is Outcome.DEAD_LETTER and status.value in verdict.why


# --- kill escalation and the time limit, with an injected clock ----------------------------------------------


class FakeChild:
    def __init__(self, clock, exit_after: float | None = None):
        self.clock, self.exit_after, self.pid = clock, exit_after, 4242
        self.killed = self.interrupted = 0
        self.code = None

    def wait(self, timeout):
        self.clock.now += timeout
        if self.killed:
            self.code = -9
        elif self.exit_after is not None and self.clock.now >= self.exit_after:
            self.code = 0
        return self.code

    def kill(self):
        self.killed += 1

    def interrupt(self):
        self.interrupted += 1

    def cannot_run_reason(self):
        return None

    def step_failed(self):
        return False

    def close(self):
        pass


def request_with(message, child, clock, **settings):
    request = supervising_request("q", message, child, clock, NullMetrics(), **settings)
    if isinstance(message, StepMessage):  # what Request._start resolves
        request.limits = message.limits.with_defaults(request.worker.settings.task_time_limit, None)
    return request


def test_a_step_over_its_time_limit_is_killed():
    clock = Clock()
    child = FakeChild(clock)
    request = request_with(STEP, child, clock, task_time_limit=3.0)
    assert request._supervise() == -9
    assert child.killed
    assert request.kill_reason == "exceeded its hard time limit of 3 s, set by task_time_limit in the worker's config"
    assert clock.now - 1000.0 <= 3.0 + 1.0  # killed within a tick of the limit


def test_a_terminated_run_is_interrupted_first_and_killed_after_its_grace():
    clock = Clock()
    child = FakeChild(clock)
    request = request_with(RUN, child, clock)
    request.kill("cancel requested: the run was terminated")
    assert child.interrupted == 1 and not child.killed  # Dagster's own path: steps stopped, run CANCELED
    code = request._supervise()
    assert code == -9 and child.killed == 1
    assert RUN_INTERRUPT_GRACE <= clock.now - 1000.0 <= RUN_INTERRUPT_GRACE + 1.0


def test_a_run_that_stops_within_its_grace_is_not_killed():
    clock = Clock()
    child = FakeChild(clock, exit_after=1005.0)
    request = request_with(RUN, child, clock)
    request.kill("cancel requested")
    assert request._supervise() == 0 and not child.killed


def test_steps_are_killed_at_once_on_a_second_signal():
    clock = Clock()
    child = FakeChild(clock)
    request = request_with(STEP, child, clock)
    request.worker.killing.set()
    assert request._supervise() == -9 and request.kill_reason == "the worker is shutting down"


def test_a_step_whose_run_is_over_is_killed_unless_its_child_wrote_its_outcome_and_is_ending_its_capture():
    # Found in CI: the topology's run ended SUCCESS while its last steps' children were still
    # uploading their compute logs (S3ComputeLogManager, at the end of the capture, after the step's
    # outcome); the liveness thread killed them for "run ... is SUCCESS" and the logs never reached S3.
    run_id = STEP.run_id
    finishing = StepMessage(run_id, "finishing", 1, "{}")  # its child (pid 11) wrote its STEP_SUCCESS
    never_ended = StepMessage(run_id, "never_ended", 1, "{}")
    failed_by_orchestrator = StepMessage(run_id, "thought_lost", 1, "{}")  # the health check's STEP_FAILURE
    second_attempt = StepMessage(run_id, "retried", 2, "{}")  # attempt 1 ended in the same child (pid 14)
    outcomes = [
        SimpleNamespace(step_key="finishing", dagster_event=SimpleNamespace(pid=11)),
        SimpleNamespace(step_key="thought_lost", dagster_event=SimpleNamespace(pid=999)),
        SimpleNamespace(step_key="retried", dagster_event=SimpleNamespace(pid=14)),
    ]
    asked = []

    def all_logs(asked_run_id, of_type=None):
        asked.append((asked_run_id, of_type))
        return list(outcomes)

    killed: dict[str, str] = {}

    def running(message, pid):
        return SimpleNamespace(
            message=message,
            task_id=message.task_id,
            child_pid=pid,
            kill=lambda why: killed.setdefault(message.step_key, why),
        )

    for status in (DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELING):
        killed.clear()
        clock = Clock()
        context = SimpleNamespace(
            store=SimpleNamespace(cancel_requests=lambda task_ids: {}),
            instance=SimpleNamespace(get_run_by_id=lambda _run_id, status=status: run(status), all_logs=all_logs),
            clock=clock,
        )
        thread = LivenessThread(context, lambda: None, lambda: None, lambda why: None)
        thread._stop_canceled(
            [
                running(finishing, 11),
                running(never_ended, 12),
                running(failed_by_orchestrator, 13),
                running(second_attempt, 14),
            ]
        )
        assert killed == {key: f"run {run_id} is {status.value}" for key in ("never_ended", "thought_lost", "retried")}
        # A child still ending its step (a teardown that hangs) is killed once the grace is over, saying so
        clock.now += ENDING_GRACE - 1
        thread._stop_canceled([running(finishing, 11)])
        assert "finishing" not in killed
        clock.now += 2
        thread._stop_canceled([running(finishing, 11)])
        assert killed["finishing"] == (
            f"run {run_id} is {status.value} and its child was still ending step finishing 120 s after writing "
            "its outcome (compute-log upload, resource teardown)"
        )
    assert [a for a, _ in asked] == [run_id] * 9  # one read of the event log per run and pass
    readme = (pathlib.Path(__file__).parents[2] / "README.md").read_text()
    assert f"(for up to {ENDING_GRACE:.0f} s;" in readme  # what the README promises
    assert DagsterEventType.STEP_SUCCESS in asked[0][1] and DagsterEventType.STEP_UP_FOR_RETRY in asked[0][1]


# --- capacity: fair turns between queues ------------------------------------------------------------------------


def test_one_queue_takes_all_free_room():
    capacity = Capacity(4)
    assert capacity.acquire("a", 10, 10, timeout=0).count == 4
    assert capacity.acquire("a", 10, 10, timeout=0) is None


def test_an_idle_queue_does_not_keep_the_only_slot_from_a_busy_one():
    # Given one slot, queue a's consumer holding it in a long poll, and b's consumer waiting
    capacity = Capacity(1)
    first = capacity.acquire("a", 10, 10, timeout=0)
    assert first.count == 1
    got: list = []
    waiter = threading.Thread(target=lambda: got.append(capacity.acquire("b", 10, 10, timeout=5)))
    waiter.start()
    time.sleep(0.05)
    # When a's poll returns empty and a asks again at once
    capacity.release(1)
    again = capacity.acquire("a", 10, 10, timeout=0.2)
    waiter.join(5)
    # Then b got the slot first (its turn), with a poll shortened because a waits too
    assert got and got[0].count == 1 and again is None
    capacity.release(1)


def test_contended_polls_are_shortened_so_every_queue_is_polled_within_one_long_poll():
    capacity = Capacity(1)
    capacity._waiting.update({"b", "c"})  # two other consumers waiting for room
    grant = capacity.acquire("a", 10, 12, timeout=0)
    assert grant.count == 1 and grant.wait_seconds == 4  # 12 s shared three ways


def test_free_room_is_shared_equally_between_waiting_queues():
    capacity = Capacity(6)
    capacity._waiting.update({"b", "c"})
    assert capacity.acquire("a", 10, 10, timeout=0).count == 2


def test_backlogs_on_three_queues_are_taken_in_turns():
    capacity = Capacity(1)
    order = []
    for _ in range(9):
        # every consumer is waiting (all three have backlogs); the slot frees after each step
        capacity._waiting.update({"a", "b", "c"})
        for queue in ("a", "b", "c"):
            grant = capacity._grant(queue, 10, 10)
            if grant is not None:
                order.append(queue)
                break
        capacity.release(1)
    assert order == ["a", "b", "c"] * 3


# --- bounded state: the registry and liveness records expire ---------------------------------------------


def test_lost_workers_leave_the_registry_and_stale_records_are_swept(tmp_path):
    from dagster import DagsterInstance

    from dagster_taskiq_sync.storage.liveness import QUEUED, LivenessStore, StepRecord
    from dagster_taskiq_sync.storage.registry import WorkerRecord, WorkerRegistry

    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    with DagsterInstance.from_config(str(tmp_path)) as instance:
        registry, store = WorkerRegistry(instance), LivenessStore(instance)
        now = time.time()
        registry.record(WorkerRecord("alive@h", "h", 1, ["q"], 2, ts=now))
        registry.record(WorkerRecord("killed@h", "h", 2, ["q"], 2, ts=now - 7200))
        assert registry.prune(3600, now=now) == ["killed@h"]
        assert [r.name for r in registry.workers()] == ["alive@h"]
        store.write_queued({"fresh": StepRecord(QUEUED, ts=now), "old": StepRecord(QUEUED, ts=now - 90000)})
        store.request_cancel("old-cancel", "terminated")
        assert store.sweep(86400, now=now + 1) == 1  # only the record nobody updated for a day
        assert set(store.read(["fresh", "old"])) == {"fresh"}
        assert store.forget(["fresh"], run_id="r") == 1


def test_only_one_of_two_deliveries_received_at_once_may_start_an_attempt(tmp_path):
    # Found by the full suite: moto (like SQS, at least once) handed one message to two workers
    # within 2 ms; both found no record, both ran the step, and the run died on Dagster's
    # "Attempted to mark step leaf_5 as complete that was not known to be in flight".
    from dagster import DagsterInstance

    from dagster_taskiq_sync.storage.liveness import LivenessStore

    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    with DagsterInstance.from_config(str(tmp_path)) as instance:
        store = LivenessStore(instance)
        task_ids = [f"attempt-{i}" for i in range(20)]
        results: dict[str, list] = {h: [] for h in task_ids}
        barrier = threading.Barrier(2)

        def deliver(worker: str) -> None:
            for task_id in task_ids:
                barrier.wait()
                results[task_id].append(store.claim(task_id, worker, stale_after=60))

        threads = [threading.Thread(target=deliver, args=(name,)) for name in ("w1@h", "w2@h")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        for task_id, got in results.items():
            assert sorted(got, key=str) in ([None, "w1@h"], [None, "w2@h"]), (task_id, got)

        # a claim given back (the start failed) or abandoned (its worker died before starting) is taken
        store.unclaim("attempt-0")
        assert store.claim("attempt-0", "w3@h", stale_after=60) is None
        assert store.claim("attempt-1", "w3@h", stale_after=60) in ("w1@h", "w2@h")
        assert store.claim("attempt-1", "w3@h", stale_after=-1) is None
        # and the run's end deletes the claims with its records
        store.forget(task_ids, run_id="r")
        assert store.claim("attempt-2", "w4@h", stale_after=60) is None


def test_a_sent_attempt_still_queued_after_record_expiry_reads_as_never_sent(tmp_path):
    # The README's caveat: a queued record nobody updated for record_expiry is swept like any other
    from dagster import DagsterInstance

    from dagster_taskiq_sync.storage.liveness import LivenessStore

    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    with DagsterInstance.from_config(str(tmp_path)) as instance:
        store = LivenessStore(instance)
        store.write_queued({STEP.task_id: StepRecord(QUEUED, ts=time.time() - 90_000, queue="q")})
        previous = store.read([STEP.task_id]).get(STEP.task_id)
        assert first_verdict(STEP, run(DagsterRunStatus.STARTED), previous) == (None, None)
        store.sweep(expiry=86_400)
        previous = store.read([STEP.task_id]).get(STEP.task_id)
        assert first_verdict(STEP, run(DagsterRunStatus.STARTED), previous)[0] == "never_sent"


def test_the_second_of_two_simultaneous_deliveries_is_dropped_as_a_duplicate(tmp_path):
    from dagster import DagsterInstance

    from dagster_taskiq_sync.storage.liveness import LivenessStore

    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    with DagsterInstance.from_config(str(tmp_path)) as instance:
        store = LivenessStore(instance)

        def request(name):
            worker = SimpleNamespace(
                name=name,
                settings=Settings(worker_lost_timeout=10),
                stopping=threading.Event(),
                instance=SimpleNamespace(get_run_by_id=lambda run_id: run(DagsterRunStatus.STARTED)),
                store=store,
            )
            req = Request(SimpleNamespace(queue="q", message_id="m", receive_count=1), worker)
            req._open = lambda: STEP
            return req

        store.write_queued({STEP.task_id: StepRecord(QUEUED, queue="q")})  # the orchestrator sent it
        assert request("w1@h").admit() is None  # no worker's record: it runs
        verdict = request("w2@h").admit()  # the same message, before w1 wrote its running record
        assert verdict.outcome is Outcome.DONE
        assert verdict.why == (
            f"{STEP.label} already started on worker w1@h from another delivery of the same message "
            "(SQS delivered it twice at once)"
        )


@pytest.mark.parametrize(
    ("previous", "reported"),
    [
        (None, True),  # canceled before any worker started it: the drop ends the run
        ("running, heartbeating", False),  # its run child is still stopping steps: it reports the cancel
        ("running, lost", True),  # its worker was lost: nobody else will end it
    ],
)
def test_a_dropped_launch_cancels_its_canceling_run_only_when_no_run_child_is_on_it(monkeypatch, previous, reported):
    records = {
        None: None,
        "running, heartbeating": StepRecord(RUNNING, ts=time.time(), worker="w1@h", heartbeat_interval=2),
        "running, lost": StepRecord(RUNNING, ts=time.time() - 30, worker="w1@h", heartbeat_interval=2),
    }
    canceled = []
    worker = SimpleNamespace(
        name="w2",
        settings=Settings(worker_lost_timeout=10),
        stopping=threading.Event(),
        instance=SimpleNamespace(
            get_run_by_id=lambda run_id: run(DagsterRunStatus.CANCELING),
            report_run_canceled=lambda dagster_run, message: canceled.append(message),
            report_engine_event=lambda *a, **k: None,
        ),
        store=SimpleNamespace(read=lambda task_ids: {RUN.task_id: records[previous]} if records[previous] else {}),
        acks=SimpleNamespace(delete=lambda delivery, pointer: None),
        metrics=SimpleNamespace(step_dropped_duplicate=lambda queue: None),
    )
    request = Request(SimpleNamespace(queue="runs", message_id="m", receive_count=2), worker)
    monkeypatch.setattr(request, "_open", lambda: RUN)
    verdict = request.settle(request.admit())
    assert verdict.outcome is Outcome.DONE and verdict.dropped is not None
    assert len(canceled) == int(reported)
    if previous is None:
        assert canceled == ["Run canceled before a worker started it."]
    elif reported:
        assert canceled[0].startswith("Run canceled (") and "(lost)" in canceled[0]
