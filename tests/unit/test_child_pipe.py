"""The worker <-> step child pipe: typed messages one way, checked bytes (never pickles) back.

A step child runs user code, and user code can find the child's end of the pipe (it is one
``gc.get_objects()`` away). What the worker reads from it must therefore be data it checks, not
a pickle it would execute, and a reply that is not the answer to the step it sent makes the
worker stop trusting that child.
"""

from __future__ import annotations

import multiprocessing
import pickle
import sys

import pytest

from dagster_taskiq_sync.worker.child_pipe import (
    REPLY_MAX_BYTES,
    BadReply,
    CannotRunReason,
    ChildStatus,
    Pickup,
    RunStep,
    StepChild,
    StepDone,
    StepTask,
    cannot_run_from_bytes,
)
from dagster_taskiq_sync.worker.step_runner import StepAttempt

pytestmark = pytest.mark.compat


def test_a_step_done_survives_the_pipe_encoding():
    for done in (
        StepDone(3, ChildStatus.OK, None, 81234),
        StepDone(4, ChildStatus.FAILED, None, 81234),
        StepDone(1, ChildStatus.CANNOT_RUN, CannotRunReason.JOB_NOT_LOADABLE, 0),
        StepDone(7, ChildStatus.ERROR, None, 5),
    ):
        data = done.to_bytes()
        assert len(data) < REPLY_MAX_BYTES
        assert StepDone.from_bytes(data, seq=done.seq) == done


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "unreadable"),
        (b"not json", "unreadable"),
        (b'{"seq": 1}', "unreadable"),
        (b'[1, "ok", null]', "unreadable"),
        (b'[1, "fine", null, 0]', "unreadable"),
        (b'[1, "cannot_run", "because", 0]', "unreadable"),
        (b'[1.0, "ok", null, 0]', "wrong type"),
        (b'[true, "ok", null, 0]', "wrong type"),
        (b'[1, "ok", null, -1]', "wrong type"),
        (b'[1, "ok", null, "lots"]', "wrong type"),
        (b'[2, "ok", null, 0]', "reply to step 2 while it runs step 1"),
        (b'[1, "cannot_run", null, 0]', "disagree"),
        (b'[1, "ok", "run_not_found", 0]', "disagree"),
        (pickle.dumps(("ok", None, 0)), "unreadable"),
    ],
)
def test_anything_but_the_answer_to_this_step_is_a_bad_reply(data, why):
    with pytest.raises(BadReply, match=why):
        StepDone.from_bytes(data, seq=1)


def test_a_run_childs_report_is_one_of_the_known_reasons():
    assert cannot_run_from_bytes(b"run_not_found") is CannotRunReason.RUN_NOT_FOUND
    assert CannotRunReason.STEP_NOT_FOUND.sentence == "its step is not in the run's execution plan"
    for data in (b"", b"nope", b"\xff\xfe", pickle.dumps("run_not_found")):
        with pytest.raises(BadReply):
            cannot_run_from_bytes(data)


class _RunsInTheReader:
    """A pickle that, once unpickled, writes a file: what a hostile step would send."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _hostile_child(conn, payload: bytes) -> None:
    conn.recv()  # the RunStep
    conn.send_bytes(payload)
    conn.recv()  # stay alive until the worker kills it


def _attempt_with_a_child_that_replies(payload: bytes) -> tuple[StepAttempt, StepChild]:
    ctx = multiprocessing.get_context("fork")
    conn, child_conn = ctx.Pipe(duplex=True)
    process = ctx.Process(target=_hostile_child, args=(child_conn, payload), daemon=True)
    process.start()
    child_conn.close()
    child = StepChild(process, conn)
    pickup = Pickup("w", "host", 1, "q", "m", 1, 0.0, "run", "step", 1)
    return StepAttempt(None, child, StepTask("run", "step", 1, "{}", pickup)), child  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["pickle that runs code", "reply to another step", "oversized"])
def test_a_child_that_writes_anything_else_is_killed_and_its_pickle_never_runs(tmp_path, kind):
    marker = tmp_path / "ran-in-the-worker"
    payload = {
        "pickle that runs code": pickle.dumps(_RunsInTheReader(str(marker))),
        "reply to another step": StepDone(5, ChildStatus.OK, None, 0).to_bytes(),
        "oversized": b"x" * (REPLY_MAX_BYTES + 1),
    }[kind]
    attempt, child = _attempt_with_a_child_that_replies(payload)
    try:
        assert attempt.wait(10) == 1  # the step failed: nothing it says is believed
        assert not marker.exists()
        assert child.spent and not child.alive()  # killed, never reused
        assert attempt.cannot_run_reason() is None
    finally:
        child.process.kill()
        child.process.join(5)


def test_the_genuine_reply_is_read_and_the_child_stays_usable():
    attempt, child = _attempt_with_a_child_that_replies(StepDone(1, ChildStatus.OK, None, 42).to_bytes())
    try:
        assert attempt.wait(10) == 0
        assert not child.spent and child.alive() and child.rss_kib == 42 and child.steps_run == 1
    finally:
        child.process.kill()
        child.process.join(5)


def test_a_step_that_failed_in_user_code_ends_normally_and_its_child_stays_usable():
    # Its failure is in the event log (the run handles it); the worker only counts it as failed.
    attempt, child = _attempt_with_a_child_that_replies(StepDone(1, ChildStatus.FAILED, None, 42).to_bytes())
    try:
        assert attempt.wait(10) == 0
        assert attempt.step_failed()
        assert not child.spent and child.alive() and child.steps_run == 1
    finally:
        child.process.kill()
        child.process.join(5)


def test_worker_messages_are_plain_typed_values():
    pickup = Pickup("w", "host", 1, "q", "m", 1, 0.0, "run", "step", 1)
    message = RunStep(1, StepTask("run", "step", 1, "{}", pickup))
    assert pickle.loads(pickle.dumps(message)) == message


def test_children_of_ours_are_never_told_to_rerun_the_hosts_main_module(monkeypatch):
    import multiprocessing.spawn
    import threading
    import types

    from dagster_taskiq_sync.worker import step_runner

    host = types.ModuleType("__main__")
    host.__file__ = "/srv/app/bin/celery"  # a console script, as run by its shebang
    monkeypatch.setitem(sys.modules, "__main__", host)
    # any other code's children still get the main module (multiprocessing's own behaviour)
    assert multiprocessing.spawn.get_preparation_data("other")["init_main_from_path"] == host.__file__
    seen = {}
    with step_runner._without_host_main():
        ours = multiprocessing.spawn.get_preparation_data("taskiq-step-child")
        # a thread starting its own child at the same moment is not affected
        other = threading.Thread(target=lambda: seen.update(multiprocessing.spawn.get_preparation_data("x")))
        other.start()
        other.join()
    assert "init_main_from_path" not in ours and "init_main_from_name" not in ours
    assert ours["sys_path"] and seen["init_main_from_path"] == host.__file__
    host.__spec__ = types.SimpleNamespace(name="proj.__main__")  # `python -m proj`
    with step_runner._without_host_main():
        assert "init_main_from_name" not in multiprocessing.spawn.get_preparation_data("taskiq-step-child")
    assert multiprocessing.spawn.get_preparation_data("other")["init_main_from_name"] == "proj.__main__"
