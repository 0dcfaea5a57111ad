"""Who runs a step: a long-lived child process forked from a pre-imported parent.

A fresh ``dagster api execute_step`` interpreter costs about 2 s before user code runs. The
worker instead starts one multiprocessing *fork server* that imports Dagster (and the modules
named with ``worker start -i``) once, and forks *step children* from it, like Celery's prefork
pool: a step child runs one step at a time and is reused for the next one, keeping the Dagster
instance and the loaded job between steps (a fresh fork spends ~0.4 s rebuilding them).
A step never shares a process with another step running at the same time, so it can still be
killed (the child is killed and a new one forked), a crash in user code cannot take the worker
down, and its stdout/stderr are its own (Dagster's compute log manager captures them per step).
``--max-tasks-per-child`` and ``--max-memory-per-child`` recycle children as in Celery.

Whole runs (TaskiqRunLauncher) get a fresh child each. The fork server is a child of the
worker, and every step child a child of the fork server: the whole tree stays under the
``worker start`` process where supervisors can see and limit it.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import multiprocessing.connection as mp_connection
import os
import select
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from multiprocessing.context import ForkServerContext
from typing import Any, Mapping, Sequence

# Imported here so the fork server pays for them once, not every step.
from ._dagster_private import (
    EngineEventData,
    ExecuteRunArgs,
    ExecuteStepArgs,
    ResumeRunArgs,
    capture_interrupts,
    deserialize_value,
    serialize_value,
    execute_run_command_body,
    execute_step_command_body,
    recon_job_from_origin,
    resume_run_command_body,
    serializable_error_info_from_exc_info,
    step_worker_details,
    use_cached_step_plans,
    use_step_worker_details,
    use_thread_log_mirror,
)

# What a step needs beyond `import dagster`, imported once in the fork server. Without these a
# step spends ~0.7 s importing SQLAlchemy, alembic and Dagster's storages (measured with
# DAGSTER_TASKIQ_SYNC_PROFILE_DIR). Missing optional ones (dagster_postgres) are skipped.
PRELOAD_MODULES = (
    "dagster._core.storage.sqlite_storage",
    "dagster._core.storage.runs.sqlite",
    "dagster._core.storage.event_log.sqlite",
    "dagster._core.storage.schedules.sqlite",
    "dagster._core.storage.local_compute_log_manager",
    "dagster._core.storage.fs_io_manager",
    "dagster._core.execution.api",
    "dagster._core.execution.plan.execute_plan",
    "dagster._core.definitions.reconstruct",
    "alembic.command",
    "alembic.config",
    "alembic.runtime.migration",
    "dagster._core.instance.factory",
    "dagster._core.storage.root",
    "dagster._core.storage.migration.utils",
    "dagster._core.system_config.composite_descent",
    "dagster._core.types.transform_typing",
    "dagster._core.workspace.autodiscovery",
    "dagster._core.definitions.repository_definition.repository_data_builder",
    "dagster._core.definitions.external_asset",
    "dagster._utils.test.definitions",
    "upath",
    "fsspec.implementations.local",
    "sqlalchemy.dialects.sqlite",
    "dagster_postgres",
)

WARM = "warm"  # first item of a message asking a step child to load a run's instance and job

# Why a child could not run its message at all. Sent to the worker on a pipe, not encoded in
# the exit code: user code may exit with any code (an op calling os._exit(3) is not "run not found").
CANNOT_RUN_REASONS = {
    "run_not_found": "its run is not in the Dagster instance",
    "job_not_loadable": "its job could not be loaded on the worker",
}


@dataclass
class StepProcess:
    """A running step child, as the supervising worker thread sees it."""

    process: Any  # multiprocessing.Process (forkserver context)
    reports: Any = None  # read end of the child's "cannot run" pipe

    def cannot_run_reason(self) -> str | None:
        """Why the child could not run its message at all, if it said so before exiting."""
        try:
            if self.reports is not None and self.reports.poll():
                return CANNOT_RUN_REASONS.get(self.reports.recv())
        except (EOFError, OSError):
            pass
        return None

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def wait(self, timeout: float) -> int | None:
        """Exit code, or None if still running after ``timeout`` seconds."""
        self.process.join(timeout)
        return self.process.exitcode

    def kill(self) -> None:
        if self.process.exitcode is None:
            self.process.kill()

    def interrupt(self) -> None:
        """SIGINT: a run process stops its steps and ends the run CANCELED (Dagster's own path)."""
        if self.process.exitcode is None and self.process.pid:
            os.kill(self.process.pid, signal.SIGINT)

    def close(self) -> None:
        if self.reports is not None:
            self.reports.close()
        try:
            self.process.close()
        except ValueError:  # still running: the caller kills it first
            pass


class StepRunner:
    """Hands steps to reusable step children, and starts run children, from a warm fork server."""

    def __init__(self, preload: Sequence[str] = (), max_tasks_per_child: int | None = None,
                 max_memory_per_child: int | None = None) -> None:
        self._ctx: ForkServerContext = multiprocessing.get_context("forkserver")  # type: ignore[assignment]
        self._ctx.set_forkserver_preload([__name__, *PRELOAD_MODULES, *preload])
        self.max_tasks_per_child = max_tasks_per_child
        self.max_memory_per_child = max_memory_per_child  # KiB, as Celery's option
        self._idle: list[StepChild] = []
        self._lock = threading.Lock()
        self.children_started = 0
        self._warmed_runs: dict[str, None] = {}  # runs whose instance and job idle children loaded

    def warm(self, children: int) -> None:
        """Start the fork server (importing Dagster in it) and ``children`` step children now,
        rather than on the first step."""
        started = [self._new_child() for _ in range(children)]
        with self._lock:
            self._idle.extend(started)

    def start(self, payload: str, worker_meta: Mapping[str, Any], kind: str = "step") -> "StepProcess | StepAttempt":
        """Run one step in an idle step child, or start a child for a whole run ("run"/"resume").

        The first step of a run seen by this worker also asks the other idle children to load
        the run's instance and job now, so its parallel steps do not each pay for that (~0.4 s)
        when they arrive.
        """
        if kind == "step":
            run_id = str(worker_meta.get("run_id"))
            with self._lock:
                child = self._idle.pop() if self._idle else None
                to_warm = []
                if run_id not in self._warmed_runs:
                    self._warmed_runs[run_id] = None
                    while len(self._warmed_runs) > 64:
                        self._warmed_runs.pop(next(iter(self._warmed_runs)))
                    to_warm = list(self._idle)
            if child is None or not child.alive():
                if child is not None:
                    child.close()
                child = self._new_child()
            attempt = StepAttempt(self, child, payload, dict(worker_meta))
            for idle in to_warm:
                idle.warm(payload)
            return attempt
        reports, report = self._ctx.Pipe(duplex=False)
        process = self._ctx.Process(target=run_run_in_child, args=(kind, payload, dict(worker_meta), report),
                                    name=f"run:{worker_meta.get('run_id', '?')}")
        process.start()
        report.close()  # the child holds the write end now
        return StepProcess(process, reports)

    def _new_child(self) -> "StepChild":
        conn, child_conn = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(target=serve_steps, args=(child_conn, os.getpid()), name="taskiq-step-child")
        process.start()
        child_conn.close()
        self.children_started += 1
        return StepChild(process, conn)

    def give_back(self, child: "StepChild") -> None:
        """A child whose step ended: back to the idle pool, unless it is spent."""
        spent = (
            not child.alive()
            or (self.max_tasks_per_child is not None and child.steps_run >= self.max_tasks_per_child)
            or (self.max_memory_per_child is not None and child.rss_kib > self.max_memory_per_child)
        )
        if spent:
            child.close()
            return
        with self._lock:
            self._idle.append(child)

    def close(self) -> None:
        """Stop idle step children (busy ones are the worker's to stop first)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for child in idle:
            child.close()


@dataclass
class StepChild:
    """A reusable step child: reads (payload, meta) on its pipe, answers (status, reason, rss)."""

    process: Any
    conn: Any
    steps_run: int = 0
    rss_kib: int = 0

    def alive(self) -> bool:
        return self.process.exitcode is None

    def warm(self, payload: str) -> None:
        """Load the instance and job of a step's run ahead of its steps (no answer is sent)."""
        try:
            self.conn.send((WARM, payload))
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        """Ask an idle child to exit; kill it if it does not within a second."""
        try:
            if self.alive():
                self.conn.send(None)
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


class StepAttempt:
    """One step running in a step child, as the supervising worker thread sees it.

    Same surface as :class:`StepProcess`: ``wait`` gives 0 when the step ran to its end (its
    result is in the event log, success or failure), 1 when the child could not run it or hit an
    error outside the step, or the child's exit code if it died under the step (an op calling
    ``os._exit``, a kill).
    """

    def __init__(self, runner: StepRunner, child: StepChild, payload: str, worker_meta: dict) -> None:
        self._runner = runner
        self.child = child
        self._code: int | None = None
        self._reason: str | None = None
        child.conn.send((payload, worker_meta))

    @property
    def pid(self) -> int | None:
        return self.child.process.pid

    def wait(self, timeout: float) -> int | None:
        if self._code is not None:
            return self._code
        ready = mp_connection.wait([self.child.conn, self.child.process.sentinel], timeout)
        if not ready:
            return None
        reply = None
        if self.child.conn in ready:
            try:
                reply = self.child.conn.recv()
            except (EOFError, OSError):
                reply = None
        if reply is not None:
            status, self._reason, self.child.rss_kib = reply
            self.child.steps_run += 1
            self._code = 0 if status == "ok" else 1
        else:  # died under the step
            self.child.process.join(5)
            code = self.child.process.exitcode
            self._code = code if code is not None else -signal.SIGKILL
        return self._code

    def cannot_run_reason(self) -> str | None:
        return CANNOT_RUN_REASONS.get(self._reason) if self._reason else None

    def kill(self) -> None:
        if self.child.alive():
            self.child.process.kill()

    def interrupt(self) -> None:  # steps are killed, not interrupted
        self.kill()

    def close(self) -> None:
        if self._code is None:  # abandoned mid-step: the child cannot be reused
            self.kill()
            self.wait(5)
        self._runner.give_back(self.child)


def _die_with_worker(worker_pid: int | None) -> None:
    """SIGKILL this step when the worker that supervises it dies (e.g. ``kill -9``).

    The fork server, not the worker, is the step's parent, and multiprocessing hands every child
    the fork server's keep-alive pipe: a running step would keep the fork server, and itself,
    alive as orphans. So the step watches the worker's pid itself (a pidfd where the kernel has
    them, else a 1 s poll), and also takes the parent-death signal for the fork server.
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass
    if not worker_pid:
        return

    def watch() -> None:
        try:
            fd = os.pidfd_open(worker_pid)
        except (AttributeError, OSError):
            fd = None
        if fd is not None:
            select.select([fd], [], [])
        else:
            while True:
                try:
                    os.kill(worker_pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="watch-worker", daemon=True).start()


class CannotRun(Exception):
    """The message cannot run on this worker at all (reason: a CANNOT_RUN_REASONS key)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _job_loadable_or_raise(instance, run, what: str, worker_meta: Mapping[str, Any], step_key: str | None) -> None:
    try:
        recon_job_from_origin(run.job_code_origin).get_definition()
    except Exception:  # noqa: BLE001 - user code failing to import
        error = serializable_error_info_from_exc_info(sys.exc_info())
        instance.report_engine_event(
            f"{what} cannot run on worker {worker_meta.get('worker')}: its job could not be loaded "
            f"({error.message.strip()}). Check that the worker has the job's code (same path or "
            "package, `-i` modules) and its dependencies.",
            run,
            EngineEventData(error=error),
            step_key=step_key,
        )
        print(f"{what}: the job could not be loaded: {error.message.strip()}", file=sys.stderr)
        raise CannotRun("job_not_loadable") from None


def _picked_up(verb: str, worker_meta: Mapping[str, Any]) -> tuple[str, dict[str, str]]:
    """How a child tells the run's log who picked its message up (run_report reads this)."""
    text = (f"{verb} by worker {worker_meta.get('worker')} on {worker_meta.get('host')} from "
            f"queue {worker_meta.get('queue')!r} (pid {os.getpid()}).")
    return text, {k: str(v) for k, v in worker_meta.items()} | {"pid": str(os.getpid())}


def _open_run(instance, run_id: str, label: str, verb: str, worker_meta: Mapping[str, Any], step_key: str | None,
              announce: bool = True):
    """The run a child was sent for, after checking it can run here; logs who picked it up
    (steps say it in Dagster's STEP_WORKER_STARTED event instead: one event-log write fewer)."""
    run = instance.get_run_by_id(run_id)
    if run is None:
        print(f"{label}: run {run_id} is not in the Dagster instance", file=sys.stderr)
        raise CannotRun("run_not_found")
    _job_loadable_or_raise(instance, run, label, worker_meta, step_key)
    if announce:
        text, metadata = _picked_up(verb, worker_meta)
        instance.report_engine_event(f"{label} {text}", run, EngineEventData(metadata=metadata), step_key=step_key)
    return run


def run_run_in_child(kind: str, payload: str, worker_meta: Mapping[str, Any], report) -> None:
    """Entry point of a run child (TaskiqRunLauncher): execute or resume a whole run.

    The run process is Dagster's own run worker: with ``taskiq_executor`` it sends its steps to
    the queues as any orchestrator does. SIGINT (a terminate) stops it the way Dagster's
    ``api execute_run`` stops: steps are terminated and the run ends CANCELED.
    """
    _die_with_worker(worker_meta.get("worker_pid"))
    os.setpgrp()  # a Ctrl-C in the worker's terminal is the worker's to handle, not the run's
    from .secrets import instance_from_ref

    args = deserialize_value(payload, ExecuteRunArgs if kind == "run" else ResumeRunArgs)
    with capture_interrupts():
        with instance_from_ref(args.instance_ref) as instance:
            try:
                _open_run(instance, args.run_id, "Run", "resumed" if kind == "resume" else "picked up",
                          worker_meta, None)
            except CannotRun as exc:
                report.send(exc.reason)
                report.close()
                sys.exit(1)
            body = execute_run_command_body if kind == "run" else resume_run_command_body
            code = body(args.run_id, instance, lambda _event: None, set_exit_code_on_failure=True)
    sys.exit(code)


def serve_steps(conn, worker_pid: int) -> None:
    """Entry point of a step child: run the steps the worker sends, one at a time, until told
    to stop (None) or the worker goes away.

    A step writes its own events to the instance's event log (that is how the orchestrator
    learns about them); the pipe only carries "done" back, with this process's RSS so the
    worker can apply --max-memory-per-child.
    """
    _die_with_worker(worker_pid)
    # A Ctrl-C in the worker's terminal is the worker's to handle: it decides whether running
    # steps finish within the shutdown deadline or are killed.
    os.setpgrp()
    use_thread_log_mirror()
    use_cached_step_plans()
    use_step_worker_details()
    instances: dict[str, Any] = {}
    profile_dir = os.environ.get("DAGSTER_TASKIQ_SYNC_PROFILE_DIR")
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError, KeyboardInterrupt):
            return
        if message is None:
            return
        if message[0] == WARM:
            _warm(message[1], instances)
            continue
        payload, worker_meta = message
        status, reason = "ok", None
        try:
            if profile_dir:
                _profiled(profile_dir, payload, worker_meta, instances)
            else:
                _run_step(payload, worker_meta, instances)
        except CannotRun as exc:
            status, reason = "cannot_run", exc.reason
        except BaseException:  # noqa: BLE001 - anything outside the step's own error handling
            traceback.print_exc()
            status = "error"
        try:
            conn.send((status, reason, _rss_kib()))
        except (OSError, ValueError):
            return
        if status == "error":  # whatever broke may have left this process unusable
            sys.exit(1)


def _rss_kib() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _profiled(profile_dir: str, payload: str, worker_meta: Mapping[str, Any], instances: dict) -> None:
    """Developer aid: one cProfile file per step, and the modules it imported late."""
    import cProfile

    preloaded = set(sys.modules)
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        _run_step(payload, worker_meta, instances)
    finally:
        profiler.disable()
        base = os.path.join(profile_dir, f"{worker_meta.get('step_key', 'step')}-{os.getpid()}-{time.time():.3f}")
        profiler.dump_stats(base + ".prof")
        with open(base + ".imports", "w") as fh:  # what the fork server did not preload
            fh.write("\n".join(sorted(set(sys.modules) - preloaded)))


def _warm(payload: str, instances: dict) -> None:
    """Load a run's instance and job into this child's caches; failures are the step's to report."""
    try:
        args = deserialize_value(payload, ExecuteStepArgs)
        instance = _cached_instance(instances, args.instance_ref)
        run = instance.get_run_by_id(args.run_id)
        if run is not None:
            recon_job_from_origin(run.job_code_origin).get_definition()
    except Exception:  # noqa: BLE001
        pass


def _cached_instance(instances: dict, instance_ref) -> Any:
    from .secrets import instance_from_ref, pooled

    key = serialize_value(instance_ref)
    instance = instances.get(key)
    if instance is None:
        instance = instances[key] = pooled(instance_from_ref(instance_ref))
    return instance


def _run_step(payload: str, worker_meta: Mapping[str, Any], instances: dict) -> None:
    args = deserialize_value(payload, ExecuteStepArgs)
    step_key = (args.step_keys_to_execute or ["?"])[0]
    instance = _cached_instance(instances, args.instance_ref)
    run = _open_run(instance, args.run_id, f"Step {step_key}", "picked up", worker_meta, step_key, announce=False)
    token = step_worker_details.set(_picked_up("picked up", worker_meta))
    try:
        for _event in execute_step_command_body(args, instance, run):
            pass  # events are already in the event log; nobody re-logs them
    finally:
        step_worker_details.reset(token)
