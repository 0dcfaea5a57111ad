"""What runs inside a step child or a run child: the code on the far side of the fork.

The worker's fork server imports this module (and Dagster, see ``_dagster.names.PRELOAD_MODULES``)
once; step children forked from it run :func:`serve_steps`, run children :func:`run_run_in_child`.
Everything a step needs comes from the worker's own instance (its reference is handed down by the
worker, never read from a message): the run, its job's code origin, its run config and the retry
mode its executor config implies. The message contributes only the run id, step key, attempt and
the orchestrator's known state.

A child answers its worker on a pipe in the types of ``child_pipe`` (a step's :class:`StepDone`, a
run child's :class:`CannotRunReason`); the exit code is user code's (an op may call ``os._exit(3)``).
"""

from __future__ import annotations

import ctypes
import gc
import os
import select
import signal
import sys
import threading
import time
import traceback
from typing import Any

from dagster_taskiq_sync._dagster.child import (
    SoftTimeLimitExceeded,
    install_cached_step_plans,
    install_soft_time_limit,
    install_step_worker_details,
    install_thread_log_mirror,
    retry_mode_of_run,
    soft_time_limit,
    step_worker_details,
)
from dagster_taskiq_sync._dagster.names import (
    DagsterExecutionStepNotFoundError,
    EngineEventData,
    ExecuteStepArgs,
    KnownExecutionState,
    capture_interrupts,
    deserialize_value,
    execute_run_command_body,
    execute_step_command_body,
    recon_job_from_origin,
    resume_run_command_body,
    serializable_error_info_from_exc_info,
)
from dagster_taskiq_sync.storage.instance import InstanceOptions, instance_from_ref
from dagster_taskiq_sync.wire.tracing import JOB_NAME, TraceContext, activate_in_child
from dagster_taskiq_sync.worker.child_pipe import (
    SOFT_LIMIT_SIGNAL,
    CannotRunReason,
    ChildStatus,
    Pickup,
    RunStep,
    StepDone,
    StepTask,
    Warm,
)
from dagster_taskiq_sync.worker.key_guard import StepUser, set_dumpable, take_key_environment
from dagster_taskiq_sync.worker.traces import ChildSpans

TASKIQ_EXECUTOR = "taskiq"  # taskiq_executor's name (orchestrator/executor.py), the one that signs messages


class CannotRun(Exception):
    """The message cannot run on this worker at all."""

    def __init__(self, reason: CannotRunReason) -> None:
        super().__init__(reason.value)
        self.reason = reason


def die_with_worker(worker_pid: int | None) -> None:
    """SIGKILL this process when the worker that supervises it dies (e.g. ``kill -9``).

    The fork server, not the worker, is the child's parent, and multiprocessing hands every child
    the fork server's keep-alive pipe: a running step would keep the fork server, and itself,
    alive as orphans. So the child watches the worker's pid itself (a pidfd where the kernel has
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
                except PermissionError:  # alive, and another user's (the child runs as --step-user)
                    pass
                time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="watch-worker", daemon=True).start()


def leave_host_signals() -> None:
    """Take this child out of the host's signal world: its own process group (a Ctrl-C or a
    signal to the host's group is the worker's to handle), and the default SIGCHLD.

    A host that ignores SIGCHLD (``SIG_IGN`` survives the fork server's exec, and the fork server
    restores it in each child) would otherwise make every subprocess a step starts look as if it
    exited 0: the kernel reaps it, and ``subprocess`` reports 0 when there is nothing to wait for.
    """
    os.setpgrp()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)


def _open_instance(instance_ref: str, options: InstanceOptions) -> Any:
    return instance_from_ref(deserialize_value(instance_ref), options)


def _recon_job(run: Any) -> Any:
    return recon_job_from_origin(run.job_code_origin).get_subset(
        op_selection=run.resolved_op_selection,
        asset_selection=run.asset_selection,
        asset_check_selection=run.asset_check_selection,
    )


def _load_job_or_raise(instance: Any, run: Any, what: str, pickup: Pickup) -> Any:
    try:
        recon = _recon_job(run)
        recon.get_definition()
        return recon
    except Exception:  # noqa: BLE001 - user code failing to import
        error = serializable_error_info_from_exc_info(sys.exc_info())
        instance.report_engine_event(
            f"{what} cannot run on worker {pickup.worker}: its job could not be loaded "
            f"({error.message.strip()}). Check that the worker has the job's code (same path or "
            "package, `-i` modules) and its dependencies.",
            run,
            EngineEventData(error=error),
            step_key=pickup.step_key,
        )
        print(f"{what}: the job could not be loaded: {error.message.strip()}", file=sys.stderr)
        raise CannotRun(CannotRunReason.JOB_NOT_LOADABLE) from None


def _run_or_raise(instance: Any, run_id: str, what: str) -> Any:
    run = instance.get_run_by_id(run_id)
    if run is None or run.job_code_origin is None:
        print(f"{what}: run {run_id} is not in the Dagster instance", file=sys.stderr)
        raise CannotRun(CannotRunReason.RUN_NOT_FOUND)
    return run


def share_fork_server_memory() -> None:
    """First thing in a child: keep the fork server's objects out of this process's garbage
    collections. Without it the child's first full collection writes to every object it inherited
    (Dagster and everything preloaded), so the kernel copies those pages into each child: with 4
    step children the worker's tree took ~560 MiB PSS instead of ~400 (bin/bench's memory table).
    Inherited objects are still freed by reference counting; only cycles among them stay."""
    gc.freeze()


def run_run_in_child(
    kind: str,
    run_id: str,
    pickup: Pickup,
    instance_ref: str,
    options: InstanceOptions,
    report: Any,
    trace: TraceContext | None = None,
    step_user: StepUser | None = None,
) -> None:
    """Entry point of a run child (TaskiqRunLauncher): execute or resume a whole run.

    The run process is Dagster's own run worker: with ``taskiq_executor`` it sends its steps to
    the queues as any orchestrator does. SIGINT (a terminate) stops it the way Dagster's
    ``api execute_run`` stops: steps are terminated and the run ends CANCELED.
    """
    share_fork_server_memory()
    if step_user is not None:
        step_user.become()
    set_dumpable(False)  # it may hold the signing keys: other processes of its user cannot read them
    die_with_worker(pickup.worker_pid)  # after become(): a change of user clears the parent-death signal
    leave_host_signals()  # a Ctrl-C in the worker's terminal is the worker's to handle, not the run's
    with capture_interrupts():
        instance = _open_instance(instance_ref, options)
        try:
            run = _run_or_raise(instance, run_id, "Run")
            recon = _load_job_or_raise(instance, run, "Run", pickup)
            if recon.get_definition().executor_def.name == TASKIQ_EXECUTOR:
                take_key_environment(report)  # it signs its steps' messages; no other run needs the keys
            verb = "resumed" if kind == "resume" else "picked up"
            instance.report_engine_event(
                f"Run {pickup.text(verb, os.getpid())}", run, EngineEventData(metadata=pickup.metadata(os.getpid()))
            )
        except CannotRun as exc:
            report.send_bytes(exc.reason.value.encode("ascii"))
            report.close()
            sys.exit(1)
        body = execute_run_command_body if kind == "run" else resume_run_command_body
        tracing = activate_in_child()  # after the fork: this process's own exporter
        spans = ChildSpans(tracing) if tracing is not None else None
        span = spans.start(trace, pickup) if spans is not None else None
        if spans is None or span is None:
            code = body(run_id, instance, lambda _event: None, set_exit_code_on_failure=True)
        else:
            span.set_attribute(JOB_NAME, run.job_name)
            with spans.tracing.current(span):  # the run's step sends nest under its run span
                code = body(run_id, instance, lambda _event: None, set_exit_code_on_failure=True)
            spans.end(span, f"the run process exited with code {code}" if code else None)
    sys.exit(code)


class _StepChildState:
    """What a step child keeps between steps: its one instance and the runs it has looked at."""

    def __init__(self, instance_ref: str, options: InstanceOptions) -> None:
        self.instance_ref = instance_ref
        self.options = options
        self._instance: Any = None
        self.retry_modes: dict[tuple[str, str], Any] = {}
        tracing = activate_in_child()  # after the fork: this process's own exporter
        self.spans = ChildSpans(tracing) if tracing is not None else None

    @property
    def instance(self) -> Any:
        if self._instance is None:
            self._instance = _open_instance(self.instance_ref, self.options)
        return self._instance


def serve_steps(
    conn: Any, worker_pid: int, instance_ref: str, options: InstanceOptions, step_user: StepUser | None = None
) -> None:
    """Entry point of a step child: run the steps the worker sends, one at a time, until told to
    to stop (``Stop``) or the worker goes away.

    A step writes its own events to the instance's event log (that is how the orchestrator learns
    about them); the pipe only carries the outcome back, with this process's RSS so the worker
    can apply --max-memory-per-child.
    """
    share_fork_server_memory()
    if step_user is not None:
        step_user.become()
        set_dumpable(True)  # a change of user made it undumpable; it holds no secret, so an ordinary process
    die_with_worker(worker_pid)  # after become(): a change of user clears the parent-death signal
    # A Ctrl-C in the worker's terminal is the worker's to handle: it decides whether running
    # steps finish within the shutdown deadline or are killed.
    leave_host_signals()
    install_thread_log_mirror()
    install_cached_step_plans()
    install_step_worker_details()
    install_soft_time_limit(SOFT_LIMIT_SIGNAL)
    state = _StepChildState(instance_ref, options)
    profile_dir = os.environ.get("DAGSTER_TASKIQ_SYNC_PROFILE_DIR")
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError, KeyboardInterrupt):
            return
        if isinstance(message, Warm):
            _warm(message.run_id, state)
            continue
        if not isinstance(message, RunStep):  # Stop (or anything else): exit
            return
        status, reason = _serve_one(message.task, state, profile_dir)
        try:
            conn.send_bytes(StepDone(message.seq, status, reason, _rss_kib()).to_bytes())
        except (OSError, ValueError):
            return
        if status not in (ChildStatus.OK, ChildStatus.FAILED):
            sys.exit(1)  # whatever broke (or a job that would not load) may have left this process unusable


def _serve_one(
    task: StepTask, state: _StepChildState, profile_dir: str | None
) -> tuple[ChildStatus, CannotRunReason | None]:
    span = state.spans.start(task.trace, task.pickup) if state.spans is not None else None
    if span is None:
        return _serve_untraced(task, state, profile_dir, None)
    assert state.spans is not None
    with state.spans.tracing.current(span):  # user code's own spans nest under the step's run span
        status, reason = _serve_untraced(task, state, profile_dir, span)
    # A step that failed in its own code (FAILED) has its error status from its failure event already.
    ok = status in (ChildStatus.OK, ChildStatus.FAILED)
    error = None if ok else reason.sentence if reason else "the step child broke outside the step"
    state.spans.end(span, error)  # exported (bounded) before the child answers its worker
    return status, reason


def _serve_untraced(
    task: StepTask, state: _StepChildState, profile_dir: str | None, span: Any
) -> tuple[ChildStatus, CannotRunReason | None]:
    try:
        with soft_time_limit(task.soft_limit):
            failed = _profiled(profile_dir, task, state) if profile_dir else _run_step(task, state, span)
        return (ChildStatus.FAILED if failed else ChildStatus.OK), None
    except CannotRun as exc:
        return ChildStatus.CANNOT_RUN, exc.reason
    except SoftTimeLimitExceeded as exc:  # the step's failure (in the event log) says it; no traceback
        print(exc, file=sys.stderr)
        return ChildStatus.ERROR, None
    except BaseException:  # noqa: BLE001 - anything outside the step's own error handling, SystemExit included
        traceback.print_exc()
        return ChildStatus.ERROR, None


def _rss_kib() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _profiled(profile_dir: str, task: StepTask, state: _StepChildState) -> bool:
    """Developer aid: one cProfile file per step, and the modules it imported late."""
    import cProfile

    preloaded = set(sys.modules)
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        return _run_step(task, state)
    finally:
        profiler.disable()
        base = os.path.join(profile_dir, f"{task.step_key}-{os.getpid()}-{time.time():.3f}")
        profiler.dump_stats(base + ".prof")
        with open(base + ".imports", "w") as fh:  # what the fork server did not preload
            fh.write("\n".join(sorted(set(sys.modules) - preloaded)))


def _warm(run_id: str, state: _StepChildState) -> None:
    """Load a run's job into this child's caches; failures are the step's to report."""
    try:
        run = state.instance.get_run_by_id(run_id)
        if run is not None and run.job_code_origin is not None:
            _retry_mode(state, run, _recon_job(run))
    except Exception:  # noqa: BLE001 - the step that follows reports whatever this was
        pass


def _retry_mode(state: _StepChildState, run: Any, recon: Any) -> Any:
    key = (run.run_id, run.job_name)
    if key not in state.retry_modes:
        state.retry_modes[key] = retry_mode_of_run(recon, run.run_config)
        while len(state.retry_modes) > 64:
            state.retry_modes.pop(next(iter(state.retry_modes)))
    return state.retry_modes[key]


def _run_step(task: StepTask, state: _StepChildState, span: Any = None) -> bool:
    """Run one step attempt; True when it failed (STEP_FAILURE, or STEP_UP_FOR_RETRY)."""
    instance = state.instance
    what = f"Step {task.step_key}"
    run = _run_or_raise(instance, task.run_id, what)
    if span is not None:
        span.set_attribute(JOB_NAME, run.job_name)
    recon = _load_job_or_raise(instance, run, what, task.pickup)
    args = ExecuteStepArgs(
        job_origin=run.job_code_origin,  # from the worker's own instance, never from the message
        run_id=run.run_id,
        step_keys_to_execute=[task.step_key],
        instance_ref=None,
        retry_mode=_retry_mode(state, run, recon),
        known_state=deserialize_value(task.known_state, KnownExecutionState),
        should_verify_step=True,  # a redelivered attempt that already started is never run twice
        print_serialized_events=False,
    )
    token = step_worker_details.set((task.pickup.text("picked up", os.getpid()), task.pickup.metadata(os.getpid())))
    failed = False
    try:
        for event in execute_step_command_body(args, instance, run):
            # Events are already in the event log (nobody re-logs them); the outcome is for metrics.
            failed = failed or event.is_step_failure or event.is_step_up_for_retry
            if span is not None:
                state.spans.note(span, event)  # type: ignore[union-attr]  # a span comes with spans
    except DagsterExecutionStepNotFoundError:
        raise CannotRun(CannotRunReason.STEP_NOT_FOUND) from None
    finally:
        step_worker_details.reset(token)
    return failed
