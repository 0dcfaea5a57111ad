"""Who runs a step: a child process forked from a pre-imported parent.

A fresh ``dagster api execute_step`` interpreter costs about 2 s before user code runs. The
worker instead starts one multiprocessing *fork server* that imports Dagster (and the modules
named with ``worker start -i``) once; every step is a fork of it, ready in milliseconds. Each
step still gets its own process, so it can be killed, its stdout/stderr are its own (Dagster's
compute log manager captures them per step), and a crash in user code cannot take the worker
down. The fork server is a child of the worker, and every step a child of the fork server: the
whole tree stays under the ``worker start`` process where supervisors can see and limit it.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import select
import signal
import sys
import threading
import time
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
    execute_run_command_body,
    execute_step_command_body,
    recon_job_from_origin,
    resume_run_command_body,
    serializable_error_info_from_exc_info,
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
    """Starts step children from a warm fork server."""

    def __init__(self, preload: Sequence[str] = ()) -> None:
        self._ctx: ForkServerContext = multiprocessing.get_context("forkserver")  # type: ignore[assignment]
        self._ctx.set_forkserver_preload([__name__, *PRELOAD_MODULES, *preload])

    def warm(self) -> None:
        """Start the fork server now (and import Dagster in it) rather than on the first step."""
        probe = self._ctx.Process(target=_noop, name="taskiq-warmup")
        probe.start()
        probe.join(60)

    def start(self, payload: str, worker_meta: Mapping[str, Any], kind: str = "step") -> StepProcess:
        """Start a child for one step, or for a whole run (kind "run" or "resume")."""
        reports, report = self._ctx.Pipe(duplex=False)
        if kind == "step":
            target, args, name = run_step_in_child, (payload, dict(worker_meta), report), f"step:{worker_meta.get('step_key', '?')}"
        else:
            target, args, name = run_run_in_child, (kind, payload, dict(worker_meta), report), f"run:{worker_meta.get('run_id', '?')}"
        process = self._ctx.Process(target=target, args=args, name=name)
        process.start()
        report.close()  # the child holds the write end now
        return StepProcess(process, reports)


def _noop() -> None:
    pass


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


def _cannot_run(report, reason: str) -> None:
    report.send(reason)
    report.close()
    sys.exit(1)


def _job_loadable_or_exit(instance, run, what: str, worker_meta: Mapping[str, Any], step_key: str | None, report) -> None:
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
        _cannot_run(report, "job_not_loadable")


def _open_run(instance, run_id: str, label: str, verb: str, worker_meta: Mapping[str, Any],
              step_key: str | None, report):
    """The run a child was sent for, after checking it can run here; logs who picked it up."""
    run = instance.get_run_by_id(run_id)
    if run is None:
        print(f"{label}: run {run_id} is not in the Dagster instance", file=sys.stderr)
        _cannot_run(report, "run_not_found")
    _job_loadable_or_exit(instance, run, label, worker_meta, step_key, report)
    instance.report_engine_event(
        f"{label} {verb} by worker {worker_meta.get('worker')} on {worker_meta.get('host')} from "
        f"queue {worker_meta.get('queue')!r} (pid {os.getpid()}).",
        run,
        EngineEventData(metadata={k: str(v) for k, v in worker_meta.items()} | {"pid": str(os.getpid())}),
        step_key=step_key,
    )
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
            _open_run(instance, args.run_id, "Run", "resumed" if kind == "resume" else "picked up",
                      worker_meta, None, report)
            body = execute_run_command_body if kind == "run" else resume_run_command_body
            code = body(args.run_id, instance, lambda _event: None, set_exit_code_on_failure=True)
    sys.exit(code)


def run_step_in_child(payload: str, worker_meta: Mapping[str, Any], report) -> None:
    """Entry point of a step child: execute one step attempt against the Dagster instance.

    The step writes its own events to the instance's event log (that is how the orchestrator
    learns about them); nothing is sent back through SQS.
    """
    _die_with_worker(worker_meta.get("worker_pid"))
    profile_dir = os.environ.get("DAGSTER_TASKIQ_SYNC_PROFILE_DIR")
    if profile_dir:  # developer aid: one cProfile file per step, see bin/bench
        import cProfile

        preloaded = set(sys.modules)
        profiler = cProfile.Profile()
        profiler.enable()
        try:
            _run_step(payload, worker_meta, report)
        finally:
            profiler.disable()
            base = os.path.join(profile_dir, f"{worker_meta.get('step_key', 'step')}-{os.getpid()}")
            profiler.dump_stats(base + ".prof")
            with open(base + ".imports", "w") as fh:  # what the fork server did not preload
                fh.write("\n".join(sorted(set(sys.modules) - preloaded)))
        return
    _run_step(payload, worker_meta, report)


def _run_step(payload: str, worker_meta: Mapping[str, Any], report) -> None:
    # A Ctrl-C in the worker's terminal is the worker's to handle: it decides whether running
    # steps finish within the shutdown deadline or are killed.
    os.setpgrp()
    from .secrets import instance_from_ref

    args = deserialize_value(payload, ExecuteStepArgs)
    step_key = (args.step_keys_to_execute or ["?"])[0]
    with instance_from_ref(args.instance_ref) as instance:
        run = _open_run(instance, args.run_id, f"Step {step_key}", "picked up", worker_meta, step_key, report)
        for _event in execute_step_command_body(args, instance, run):
            pass  # events are already in the event log; nobody re-logs them
