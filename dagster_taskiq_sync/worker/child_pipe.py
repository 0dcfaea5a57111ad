"""The pipe between a worker and its children: what each side sends, as types.

The worker sends a step child :class:`RunStep`, :class:`Warm` or :class:`Stop` (pickled: the child
trusts its worker). What comes back was written by a process that runs user code, so it is never
unpickled: a step child answers each :class:`RunStep` with one :class:`StepDone` as a few bytes of
JSON, and a run child reports a :class:`CannotRunReason` as its value's bytes. Anything else on
the pipe (a reply to another step, a longer message, bytes that do not parse) is
:class:`BadReply`, and the worker stops using that child. :class:`StepChild` is the worker's
handle on one reusable step child (its process and its end of the pipe).
"""

from __future__ import annotations

import json
import signal
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any

from dagster_taskiq_sync.storage.run_report import PICKED_UP_KEY
from dagster_taskiq_sync.wire.tracing import TraceContext

REPLY_MAX_BYTES = 512  # a StepDone is ~80 bytes; recv_bytes refuses (and breaks the pipe on) longer
# The worker's "soft time limit" signal to a step child: billiard's (Celery's prefork pool) choice.
SOFT_LIMIT_SIGNAL = signal.SIGUSR1


class CannotRunReason(Enum):
    """Why a child could not run its message at all (the message goes to the dead-letter queue)."""

    RUN_NOT_FOUND = "run_not_found"
    JOB_NOT_LOADABLE = "job_not_loadable"
    STEP_NOT_FOUND = "step_not_found"

    @property
    def sentence(self) -> str:
        return {
            CannotRunReason.RUN_NOT_FOUND: "its run is not in the worker's Dagster instance",
            CannotRunReason.JOB_NOT_LOADABLE: "its job could not be loaded on the worker",
            CannotRunReason.STEP_NOT_FOUND: "its step is not in the run's execution plan",
        }[self]


class ChildStatus(Enum):
    OK = "ok"  # the step ran to its end and succeeded: its result is in the event log
    FAILED = "failed"  # it ran to its end and failed (or is up for retry): that is in the event log; child reused
    CANNOT_RUN = "cannot_run"  # see the reason; the child is not reused
    ERROR = "error"  # something broke outside the step's own error handling; the child is not reused


@dataclass(frozen=True)
class Pickup:
    """Who took a message, for the run's log (STEP_WORKER_STARTED or an engine event)."""

    worker: str
    host: str
    worker_pid: int
    queue: str
    message_id: str
    receive_count: int
    received_at: float
    run_id: str
    step_key: str | None = None
    attempt: int | None = None

    def text(self, verb: str, pid: int) -> str:
        return f"{verb} by worker {self.worker} on {self.host} from queue {self.queue!r} (pid {pid})."

    def metadata(self, pid: int) -> dict[str, str]:
        fields = {k: v for k, v in asdict(self).items() if v is not None}
        fields["received_at"] = f"{self.received_at:.6f}"
        return {k: str(v) for k, v in fields.items()} | {"pid": str(pid), PICKED_UP_KEY: self.worker}


@dataclass(frozen=True)
class StepTask:
    """One step attempt, as the worker hands it to a step child."""

    run_id: str
    step_key: str
    attempt: int
    known_state: str
    pickup: Pickup
    soft_limit: str | None = None  # what the op's interrupt says if the soft time limit fires
    trace: TraceContext | None = None  # W3C, checked on construction; the step's run span's parent


# --- worker -> step child ----------------------------------------------------------------------


@dataclass(frozen=True)
class RunStep:
    seq: int  # the child's n-th step: its StepDone must carry the same number
    task: StepTask


@dataclass(frozen=True)
class Warm:
    """Load a run's job ahead of its steps (no answer)."""

    run_id: str


@dataclass(frozen=True)
class Stop:
    """Exit (an idle child being closed)."""


ToChild = RunStep | Warm | Stop


# --- step child / run child -> worker ----------------------------------------------------------


class BadReply(ValueError):
    """What a child sent is not a reply the worker asked for."""


@dataclass(frozen=True)
class StepDone:
    seq: int
    status: ChildStatus
    reason: CannotRunReason | None
    rss_kib: int

    def to_bytes(self) -> bytes:
        reason = self.reason.value if self.reason else None
        return json.dumps([self.seq, self.status.value, reason, self.rss_kib]).encode()

    @classmethod
    def from_bytes(cls, data: bytes, *, seq: int) -> StepDone:
        """The reply to step ``seq``, or :class:`BadReply`."""
        try:
            got_seq, status, reason, rss = json.loads(data)
            done = cls(got_seq, ChildStatus(status), CannotRunReason(reason) if reason is not None else None, rss)
        except (ValueError, TypeError) as exc:  # JSON, unpacking, enum values
            raise BadReply(f"an unreadable reply ({len(data)} bytes)") from exc
        if type(done.seq) is not int or type(done.rss_kib) is not int or done.rss_kib < 0:
            raise BadReply("a reply with fields of the wrong type")
        if done.seq != seq:
            raise BadReply(f"a reply to step {done.seq} while it runs step {seq}")
        if (done.status is ChildStatus.CANNOT_RUN) != (done.reason is not None):
            raise BadReply("a reply whose status and reason disagree")
        return done


def cannot_run_from_bytes(data: bytes) -> CannotRunReason:
    """A run child's report, or :class:`BadReply`."""
    try:
        return CannotRunReason(data.decode("ascii"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadReply(f"an unreadable report ({len(data)} bytes)") from exc


@dataclass
class StepChild:
    """A reusable step child: reads ``RunStep``/``Warm``/``Stop`` on its pipe, answers ``StepDone``."""

    process: Any
    conn: Any
    steps_run: int = 0
    rss_kib: int = 0
    spent: bool = False  # never reuse: its last step could not run, or broke outside the step
    niced: bool = False  # runs at the bulk lane's lower CPU priority (for good: niceness only goes up)

    def alive(self) -> bool:
        return self.process.exitcode is None

    def warm(self, run_id: str) -> None:
        """Load a run's job ahead of its steps (no answer is sent)."""
        try:
            self.conn.send(Warm(run_id))
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        """Ask an idle child to exit; kill it if it does not within a second."""
        try:
            if self.alive():
                self.conn.send(Stop())
                self.process.join(1.0)
            if self.alive():
                self.process.kill()
                self.process.join(1.0)
        except (OSError, ValueError):
            pass
        try:
            self.conn.close()
            self.process.close()
        except (OSError, ValueError):
            pass
