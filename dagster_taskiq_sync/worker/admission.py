"""What a worker does with a message it has decoded: run it, drop it, release it or dead-letter it.

Each drop rule is a small named predicate over plain data (the message, its run as the worker's own
instance has it, the attempt's liveness record), tried in order by ``request.Request.admit``:

* ``run_missing``: the run is not in this worker's instance: it can never run here (dead-letter).
* ``could_not_run_before``: a worker already found this attempt cannot run (dead-letter).
* ``already_started``: the attempt started or ran before (SQS delivered it again): drop it; user
  code never runs twice. A started attempt whose record went stale is called lost unless the run's
  event log has its outcome (``ran_to_its_end``, read only then).
* ``run_is_over``: its run finished or is being canceled: nobody waits for it (drop).
* ``never_sent``: no sender recorded sending this attempt or launch (the orchestrator and the run
  launcher write its ``queued`` record before they send it): a forged or stale message, e.g. an
  attempt 2 of a step that ended, or a resume of a run nobody resumed (dead-letter, with no record
  written on its behalf, so that it cannot spoil the real message if one is ever sent).
* ``run_cannot_take_it``: its run is in a state no genuine sender sends this kind in (dead-letter).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from dagster import DagsterRunStatus

from dagster_taskiq_sync.storage.liveness import DEAD_LETTERED, EXITED, RUNNING, StepRecord
from dagster_taskiq_sync.wire.messages import Message, StepMessage, TaskKind

CANCEL_STATUSES = (DagsterRunStatus.CANCELING, DagsterRunStatus.CANCELED)
# A step whose run is in one of these states has nobody waiting for it.
STOP_STATUSES = (*CANCEL_STATUSES, DagsterRunStatus.FAILURE, DagsterRunStatus.SUCCESS)


class Outcome(Enum):
    DONE = "done"  # it ran (whatever its result), or need not run: delete it
    RELEASE = "release"  # not run here: visible again now, for this or another worker
    DEAD_LETTER = "dead_letter"  # it can never run: to the dead-letter queue at once


class Drop(Enum):
    """Why a DONE verdict did not run the message."""

    DUPLICATE = "duplicate"  # its attempt already started or ran: SQS delivered it again, or a resume re-sent it
    RUN_OVER = "run_over"  # its run finished or is being canceled


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    why: str = ""
    dropped: Drop | None = None  # set on DONE verdicts that did not run the message
    release_after: int = 0  # seconds before a released message is visible again
    resent_started: bool = False  # it names an attempt already running (a resumed run re-sends it)
    lost: bool = False  # dropped as an attempt whose worker stopped heartbeating while it ran
    unrecorded: bool = False  # dead-lettered without writing a record for its attempt (never sent)


# --- drop rules: (message, its run, its attempt's record, lost timeout) -> Verdict or None ---------------


def run_missing(message: Message, run: Any, previous: StepRecord | None, lost_timeout: float) -> Verdict | None:
    if run is None:
        return Verdict(
            Outcome.DEAD_LETTER,
            f"its run {message.run_id} is not in this worker's Dagster instance "
            "(check that DAGSTER_HOME has the orchestrator's storage)",
        )
    return None


def could_not_run_before(
    message: Message, run: Any, previous: StepRecord | None, lost_timeout: float
) -> Verdict | None:
    if previous is not None and previous.state in (EXITED, DEAD_LETTERED) and previous.cannot_run:
        return Verdict(Outcome.DEAD_LETTER, f"{previous.reason} (on worker {previous.worker})")
    return None


def already_started(message: Message, run: Any, previous: StepRecord | None, lost_timeout: float) -> Verdict | None:
    if previous is None or previous.state not in (RUNNING, EXITED):
        return None
    verb = "started" if previous.state == RUNNING else "ran"
    why = f"{message.label} already {verb} on worker {previous.worker}"
    # The worker cannot know the orchestrator's worker_lost_timeout: three missed heartbeats (or its
    # own lost timeout, if shorter) say its worker is gone.
    stale = min(lost_timeout, 3 * (previous.heartbeat_interval or 5.0))
    lost = previous.state == RUNNING and previous.age() > stale
    if lost:
        why += f", which stopped heartbeating {previous.age():.0f} s ago (lost)"
    return Verdict(Outcome.DONE, why, Drop.DUPLICATE, resent_started=previous.state == RUNNING, lost=lost)


def ran_to_its_end(message: Message, previous: StepRecord | None, attempts_ended: int) -> Verdict | None:
    """For a ``lost`` verdict: a ``running`` record nobody refreshes is also what an attempt that
    ran to its end leaves (a worker writes nothing when a step ends normally: one instance write
    per step fewer), e.g. when its message comes back because the delete failed in an SQS outage.
    When the run's event log already holds the outcome of this attempt (each attempt ends in one
    STEP_SUCCESS, STEP_FAILURE or STEP_UP_FOR_RETRY: its own, or the health check's for a worker
    that really was lost), there is nothing more to say about it: it has ended.

    And for a ``never_sent`` verdict (``previous`` None): an attempt whose outcome is in the event
    log was sent; its record was deleted when its run's execution ended (found by bin/soak: a
    killed worker's message came back after the run had retried the step and finished). It is
    dropped, not dead-lettered as forged; nothing runs either way."""
    if isinstance(message, StepMessage) and attempts_ended >= message.attempt:
        if previous is None:
            return Verdict(
                Outcome.DONE,
                f"{message.label} already ran and has ended (the run's event log has its outcome; "
                "its record was deleted with the run's others)",
                Drop.DUPLICATE,
            )
        return Verdict(
            Outcome.DONE,
            f"{message.label} already started on worker {previous.worker} and has "
            "ended (the run's event log has its outcome)",
            Drop.DUPLICATE,
        )
    return None


def run_is_over(message: Message, run: Any, previous: StepRecord | None, lost_timeout: float) -> Verdict | None:
    if run.status in STOP_STATUSES:
        return Verdict(
            Outcome.DONE, f"run {message.run_id} is {run.status.value}, so {message.label} is not run", Drop.RUN_OVER
        )
    return None


def never_sent(message: Message, run: Any, previous: StepRecord | None, lost_timeout: float) -> Verdict | None:
    if previous is None:
        return Verdict(
            Outcome.DEAD_LETTER,
            f"no orchestrator or run launcher of this instance sent {message.label} (it has no queued record): "
            "a forged or stale message",
            unrecorded=True,
        )
    return None


def run_cannot_take_it(message: Message, run: Any, previous: StepRecord | None, lost_timeout: float) -> Verdict | None:
    allowed = {
        TaskKind.STEP: (DagsterRunStatus.STARTED,),
        TaskKind.RUN: (DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING),
        TaskKind.RESUME: (DagsterRunStatus.STARTING, DagsterRunStatus.STARTED),
    }[message.kind]
    if run.status not in allowed:
        return Verdict(
            Outcome.DEAD_LETTER,
            f"its run {message.run_id} is {run.status.value}, and a "
            f"{message.kind.name.lower()} message needs it {' or '.join(s.value for s in allowed)}",
        )
    return None


DROP_RULES = (run_missing, could_not_run_before, already_started, run_is_over, never_sent, run_cannot_take_it)
