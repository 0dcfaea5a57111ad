"""Who starts step children, as the worker sees them: a pool of reusable processes forked from a
pre-imported parent, and the handles the worker holds of them.

A fresh ``dagster api execute_step`` interpreter costs about 2 s before user code runs. The worker
instead starts one multiprocessing *fork server* that imports Dagster (and the modules named with
``worker start -i``) once, and forks *step children* from it, like Celery's prefork pool: a step
child runs one step at a time and is reused for the next one, keeping the Dagster instance and the
loaded job between steps. A step never shares a process with another step running at the same
time, so it can still be killed (the child is killed and a new one forked), a crash in user code
cannot take the worker down, and its stdout/stderr are its own. ``--max-tasks-per-child`` and
``--max-memory-per-child`` recycle children as in Celery; a child whose step could not run (its
job would not load) or broke outside the step is never reused.

The fork server starts without the worker's signing-key variables, and with ``--step-user`` the
children drop to that user (``key_guard.py``); a run child gets the variables on its pipe.

Whole runs (TaskiqRunLauncher) get a fresh child each. The fork server is a child of the worker,
and every child a child of the fork server: the whole tree stays under the ``worker start``
process where supervisors can see and limit it. What runs inside the children is
``step_child.py``.

Children start from this package's entry, never from the host's ``__main__``: multiprocessing
would re-run the main script (or re-import the ``-m`` module) in every child, which in an embedding
host runs its top-level code again there (a second ``Worker``, another Celery worker or web server
when the host is a console script). :func:`_without_host_main` leaves the main module out of what
multiprocessing sends a child this module starts; other code's children are untouched.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import multiprocessing
import multiprocessing.connection as mp_connection
import multiprocessing.spawn as mp_spawn
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.context import ForkServerContext
from typing import Any, Protocol

from dagster_taskiq_sync._dagster.names import OPTIONAL_PRELOAD_MODULES, PRELOAD_MODULES
from dagster_taskiq_sync.storage.instance import InstanceOptions
from dagster_taskiq_sync.wire.lanes import BULK_STEP_NICENESS
from dagster_taskiq_sync.wire.tracing import TraceContext, preload_modules
from dagster_taskiq_sync.worker.child_pipe import (
    REPLY_MAX_BYTES,
    SOFT_LIMIT_SIGNAL,
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
from dagster_taskiq_sync.worker.key_guard import (
    StepUser,
    encode_key_environment,
    scrub_environment_of_spawned,
    send_key_environment,
)
from dagster_taskiq_sync.worker.step_child import run_run_in_child, serve_steps

log = logging.getLogger("dagster_taskiq_sync.worker")
_MAIN_KEYS = ("init_main_from_path", "init_main_from_name")  # what makes a child re-run __main__
_starting = threading.local()  # set while this thread starts a child of ours
_host_preparation_data = mp_spawn.get_preparation_data


def _preparation_data(name: str) -> dict[str, Any]:
    """multiprocessing's data for a new child, minus the main module for children of ours."""
    data = _host_preparation_data(name)
    if getattr(_starting, "ours", False):
        for key in _MAIN_KEYS:
            data.pop(key, None)
    return data


mp_spawn.get_preparation_data = _preparation_data  # changes only what children of ours get


@contextlib.contextmanager
def _without_host_main() -> Iterator[None]:
    """Start children in this block without re-running the host's ``__main__`` in them."""
    _starting.ours = True
    try:
        yield
    finally:
        _starting.ours = False


class ChildHandle(Protocol):
    """What a worker thread holds of the process running its message."""

    @property
    def pid(self) -> int | None: ...

    def wait(self, timeout: float) -> int | None:
        """Exit code (0: ran to its end), or None if still running after ``timeout`` seconds."""

    def kill(self) -> None: ...

    def interrupt(self) -> None:
        """Ask it to stop the way Dagster stops a run (SIGINT); steps are simply killed."""

    def soft_interrupt(self) -> None:
        """A step's soft time limit: Dagster's interrupt inside the op, which may clean up."""

    def cannot_run_reason(self) -> CannotRunReason | None:
        """Why the child could not run its message at all, if it said so."""

    def step_failed(self) -> bool:
        """The step ran to its end and failed, or is up for retry (exit code 0: the failure is in the event log)."""

    def close(self) -> None: ...


@dataclass
class RunProcess:
    """A run child (TaskiqRunLauncher)."""

    process: Any  # multiprocessing.Process (forkserver context)
    reports: Any = None  # read end of the child's "cannot run" pipe

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def wait(self, timeout: float) -> int | None:
        self.process.join(timeout)
        return self.process.exitcode

    def kill(self) -> None:
        if self.process.exitcode is None:
            self.process.kill()

    def interrupt(self) -> None:
        if self.process.exitcode is None and self.process.pid:
            os.kill(self.process.pid, signal.SIGINT)

    def soft_interrupt(self) -> None:  # a run's soft time limit: interrupted as a terminate does
        self.interrupt()

    def cannot_run_reason(self) -> CannotRunReason | None:
        try:
            if self.reports is not None and self.reports.poll():
                return cannot_run_from_bytes(self.reports.recv_bytes(REPLY_MAX_BYTES))
        except (EOFError, OSError, BadReply):  # a run child runs user code: its report is only a hint
            pass
        return None

    def step_failed(self) -> bool:
        return False  # a run child's outcome is its exit code

    def close(self) -> None:
        if self.reports is not None:
            self.reports.close()
        try:
            self.process.close()
        except ValueError:  # still running: the caller kills it first
            pass


class StepRunner:
    """Hands steps to reusable step children, and starts run children, from a warm fork server.

    ``instance_ref`` is the worker's own instance reference (serialized): every child opens that
    instance, whatever a message says. ``key_env`` holds the variables the worker's signing keys
    came from: the fork server starts without them, and run children get them on their pipe.
    ``step_user``: the user every child runs as (the worker is root).
    """

    def __init__(
        self,
        instance_ref: str,
        instance_options: InstanceOptions,
        preload: Sequence[str] = (),
        max_tasks_per_child: int | None = None,
        max_memory_per_child: int | None = None,
        on_recycle: Callable[[str], None] | None = None,
        key_env: Mapping[str, str] | None = None,
        step_user: StepUser | None = None,
        step_niceness: int = 0,
    ) -> None:
        self.step_niceness = step_niceness
        self._key_env = encode_key_environment(key_env or {})
        self._step_user = step_user
        scrub_environment_of_spawned(key_env or {})  # before the fork server starts
        self._ctx: ForkServerContext = multiprocessing.get_context("forkserver")
        optional = [m for m in OPTIONAL_PRELOAD_MODULES if importlib.util.find_spec(m) is not None]
        self._ctx.set_forkserver_preload(
            [
                "dagster_taskiq_sync.worker.step_child",
                *PRELOAD_MODULES,
                *optional,
                *preload_modules(os.environ),
                *preload,
            ]
        )
        self._instance_ref = instance_ref
        self._instance_options = instance_options
        self.max_tasks_per_child = max_tasks_per_child
        self.max_memory_per_child = max_memory_per_child  # KiB, as Celery's option
        self._on_recycle = on_recycle or (lambda reason: None)
        self._idle: list[StepChild] = []
        self._lock = threading.Lock()
        self.children_started = 0
        self._warmed_runs: dict[str, None] = {}  # runs whose job idle children loaded (bounded)
        self.max_idle = 0  # idle children kept (warm's count): more are stopped as they come back
        self.interactive_reserve = 0  # plain idle children a bulk step leaves to interactive ones
        self._nice_refused = False

    def warm(self, children: int, interactive_reserve: int = 0) -> None:
        """Start the fork server (importing Dagster in it) and ``children`` step children now,
        rather than on the first step; with lanes, ``interactive_reserve`` of them are kept for
        interactive steps (bulk steps never lower them)."""
        started = [self._new_child() for _ in range(children)]
        with self._lock:
            self.interactive_reserve = max(self.interactive_reserve, interactive_reserve)
            self.max_idle = max(self.max_idle, children)
            self._idle.extend(started)

    def start_step(self, task: StepTask, bulk: bool = False) -> StepAttempt:
        """Run one step in an idle step child; a ``bulk`` lane step in one at a lower CPU priority.

        The first step of a run seen by this worker also asks the other idle children to load the
        run's job now, so its parallel steps do not each pay for that (~0.4 s) when they arrive.
        An interactive step never gets a niced child (a new one is forked if all idle ones are).
        """
        with self._lock:
            child = self._take_idle(bulk)
            to_warm: list[StepChild] = []
            if task.run_id not in self._warmed_runs:
                self._warmed_runs[task.run_id] = None
                while len(self._warmed_runs) > 64:
                    self._warmed_runs.pop(next(iter(self._warmed_runs)))
                to_warm = list(self._idle)
        if child is None or not child.alive():
            if child is not None:
                child.close()
            child = self._new_child()
        if bulk and not child.niced:
            self._lower_priority(child)
        attempt = StepAttempt(self, child, task)
        for idle in to_warm:
            idle.warm(task.run_id)
        return attempt

    def _take_idle(self, bulk: bool) -> StepChild | None:
        """(Under the lock.) The idle child a step runs in, if any fits: an interactive step never
        takes a niced one; a bulk step takes a niced one, else a plain one only beyond the
        interactive lane's reserve. Lowering the last plain idle child would make the next
        interactive step fork one and open the instance and load its job anew (~0.2 s on a busy
        machine: the third step of a chain-5 during a backfill, measured); the bulk step forks
        instead, as the backfill's own cost."""
        fitting = [c for c in self._idle if c.niced == bulk]
        if not fitting and bulk:
            plain = [c for c in self._idle if not c.niced]
            fitting = plain if len(plain) > self.interactive_reserve else []
        if not fitting:
            return None
        self._idle.remove(fitting[-1])
        return fitting[-1]

    def start_run(self, kind: str, run_id: str, pickup: Pickup, trace: TraceContext | None = None) -> RunProcess:
        """A fresh child for a whole run ("run") or a resumed one ("resume")."""
        reports, report = self._ctx.Pipe(duplex=True)  # keys to the child, a "cannot run" back
        process = self._ctx.Process(
            target=run_run_in_child,
            args=(kind, run_id, pickup, self._instance_ref, self._instance_options, report, trace, self._step_user),
            name=f"run:{run_id}",
        )
        with _without_host_main():
            process.start()
        report.close()  # the child holds its end now
        # Waits in the pipe until the child reads it: after it made itself non-dumpable, and only
        # if its run signs messages (taskiq_executor).
        send_key_environment(reports, self._key_env)
        return RunProcess(process, reports)

    def _new_child(self) -> StepChild:
        conn, child_conn = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(
            target=serve_steps,
            args=(child_conn, os.getpid(), self._instance_ref, self._instance_options, self._step_user),
            name="taskiq-step-child",
        )
        with _without_host_main():
            process.start()
        child_conn.close()
        self.children_started += 1
        if self.step_niceness and process.pid:  # below the worker's own threads (worker start --step-niceness)
            with contextlib.suppress(OSError):
                now = os.getpriority(os.PRIO_PROCESS, process.pid)
                os.setpriority(os.PRIO_PROCESS, process.pid, min(19, now + self.step_niceness))
        return StepChild(process, conn)

    def give_back(self, child: StepChild) -> None:
        """A child whose step ended: back to the idle pool, unless it is spent."""
        reason = None
        if child.spent or not child.alive():
            reason = "unusable"
        elif self.max_tasks_per_child is not None and child.steps_run >= self.max_tasks_per_child:
            reason = "max_tasks_per_child"
        elif self.max_memory_per_child is not None and child.rss_kib > self.max_memory_per_child:
            reason = "max_memory_per_child"
        if reason is not None:
            self._on_recycle(reason)
            child.close()
            return
        with self._lock:
            if len(self._idle) < max(1, self.max_idle):
                self._idle.append(child)
                return
            if not child.niced:
                # The pool is full of a backfill's lowered children: keep this one instead of one of
                # them, or every interactive step after a backfill would fork a child and load its
                # job anew (a fanout-1000 took 60 s instead of 30); a bulk step may still take it.
                lowered = next((c for c in self._idle if c.niced), None)
                if lowered is not None:
                    self._idle.remove(lowered)
                    self._idle.append(child)
                    child = lowered
        child.close()  # more idle children than slots: forked for an interactive step while all were niced

    def _lower_priority(self, child: StepChild) -> None:
        """Bulk steps yield the cores to interactive ones (and to the worker itself): the child's
        niceness goes up by BULK_STEP_NICENESS (to nice's maximum) and, on Linux, it is scheduled
        SCHED_IDLE (``wire/lanes.py`` says why), once; it cannot come back without privileges."""
        child.niced = True
        pid = child.process.pid
        try:
            os.setpriority(os.PRIO_PROCESS, pid, min(19, os.getpriority(os.PRIO_PROCESS, pid) + BULK_STEP_NICENESS))
            if sys.platform.startswith("linux"):
                os.sched_setscheduler(pid, os.SCHED_IDLE, os.sched_param(0))
        except OSError as exc:
            if not self._nice_refused:
                self._nice_refused = True
                log.warning("could not lower the CPU priority of bulk-lane step children: %s", exc)

    def close(self) -> None:
        """Stop idle step children (busy ones are the worker's to stop first)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for child in idle:
            child.close()


class StepAttempt:
    """One step running in a step child (a :class:`ChildHandle`).

    ``wait`` gives 0 when the step ran to its end (its result is in the event log, success or
    failure), 1 when the child could not run it or hit an error outside the step, or the child's
    exit code if it died under the step (an op calling ``os._exit``, a kill).
    """

    def __init__(self, runner: StepRunner, child: StepChild, task: StepTask) -> None:
        self._runner = runner
        self.child = child
        self._code: int | None = None
        self._reason: CannotRunReason | None = None
        self._failed = False
        self._seq = child.steps_run + 1
        child.conn.send(RunStep(self._seq, task))

    @property
    def pid(self) -> int | None:
        return self.child.process.pid

    def wait(self, timeout: float) -> int | None:
        if self._code is not None:
            return self._code
        ready = mp_connection.wait([self.child.conn, self.child.process.sentinel], timeout)
        if not ready:
            return None
        reply = self._reply() if self.child.conn in ready else None
        if isinstance(reply, StepDone):
            self._reason, self.child.rss_kib = reply.reason, reply.rss_kib
            self.child.steps_run += 1
            ran = reply.status in (ChildStatus.OK, ChildStatus.FAILED)
            self.child.spent = self.child.spent or not ran
            self._failed = reply.status is ChildStatus.FAILED
            self._code = 0 if ran else 1
        elif isinstance(reply, BadReply):  # user code wrote on the pipe: this child is not trusted again
            self.child.spent = True
            self.kill()
            self.child.process.join(5)
            self._code = 1
        else:  # died under the step
            self.child.process.join(5)
            code = self.child.process.exitcode
            self._code = code if code is not None else -signal.SIGKILL
        return self._code

    def _reply(self) -> StepDone | BadReply | None:
        """The child's answer to this step; None when the pipe closed (it died)."""
        try:
            data = self.child.conn.recv_bytes(REPLY_MAX_BYTES)
        except EOFError:
            return None
        except OSError as exc:  # longer than any reply (recv_bytes refuses it), or the pipe broke
            return BadReply(str(exc)) if self.child.alive() else None
        try:
            return StepDone.from_bytes(data, seq=self._seq)
        except BadReply as exc:
            return exc

    def cannot_run_reason(self) -> CannotRunReason | None:
        return self._reason

    def step_failed(self) -> bool:
        return self._failed

    def kill(self) -> None:
        if self.child.alive():
            self.child.process.kill()

    def interrupt(self) -> None:  # steps are killed, not interrupted
        self.kill()

    def soft_interrupt(self) -> None:
        """Celery's soft time limit: the child raises Dagster's interrupt in the op (``step_child``).
        The child is not reused afterwards, so that a late signal never reaches its next step."""
        self.child.spent = True
        pid = self.child.process.pid
        if self.child.alive() and pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, SOFT_LIMIT_SIGNAL)

    def close(self) -> None:
        if self._code is None:  # abandoned mid-step: the child cannot be reused
            self.kill()
            self.wait(5)
        self._runner.give_back(self.child)
