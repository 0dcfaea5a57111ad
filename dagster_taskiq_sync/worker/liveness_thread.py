"""The worker's liveness thread: cancel requests, heartbeats, the registry, and bounded state.

Every ``cancel_poll_interval`` it reads the cancel requests of the running steps and the status of
their runs, and stops a step whose run is being canceled or is over, unless its child already wrote
the attempt's outcome to the event log: such a child is only ending the step's compute-log capture
(a remote compute log manager uploads the files then), and its run may end as soon as the outcome
is written, so a kill would lose the step's logs; one still at it ``ENDING_GRACE`` seconds later
(a teardown that hangs) is killed, so that it cannot hold a slot for good. Every
``heartbeat_interval`` it rewrites their ``running`` records (so the orchestrator can tell a live
worker from a lost one) and this worker's registry entry. About every ten minutes it deletes liveness records nobody updated for
``record_expiry`` and registry entries of workers lost for ``lost_worker_expiry``.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable

from dagster import DagsterRunStatus

from dagster_taskiq_sync.storage.registry import WorkerRegistry
from dagster_taskiq_sync.storage.run_report import StepOutcomes, step_outcomes
from dagster_taskiq_sync.wire.messages import StepMessage, TaskKind
from dagster_taskiq_sync.worker.admission import CANCEL_STATUSES, STOP_STATUSES
from dagster_taskiq_sync.worker.context import RunningStep, WorkerContext
from dagster_taskiq_sync.worker.threads import GuardedThread

# How long a step child may go on after writing its attempt's outcome once its run is over (it ends
# the step's compute-log capture, which may upload the logs, and tears down its resources).
ENDING_GRACE = 120.0
log = logging.getLogger("dagster_taskiq_sync.worker")
SWEEP_INTERVAL = 600.0


class LivenessThread(GuardedThread):
    def __init__(
        self,
        context: WorkerContext,
        beat_registry: Callable[[], None],
        check_terminate: Callable[[], None],
        on_death: Callable[[str], None],
    ) -> None:
        super().__init__("liveness", on_death)
        self._context = context
        self._beat_registry = beat_registry
        self._check_terminate = check_terminate
        self._last_error: str | None = None
        self._ending_since: dict[str, float] = {}  # task id -> when its run was seen over after its outcome

    def loop(self) -> None:
        settings = self._context.settings
        now = time.monotonic()
        next_heartbeat = now + settings.heartbeat_interval
        next_sweep = now + SWEEP_INTERVAL * random.random()  # workers started together do not sweep together
        # Wake for whichever comes first: a heartbeat due, or a look for cancel requests.
        tick = min(settings.cancel_poll_interval, settings.heartbeat_interval)
        while not self.done.wait(tick):
            try:
                requests = self._context.running.list()
                if requests:
                    self._stop_canceled(requests)
                if time.monotonic() >= next_heartbeat:
                    next_heartbeat = time.monotonic() + settings.heartbeat_interval
                    for request in requests:
                        request.heartbeat()
                    self._beat_registry()
                self._check_terminate()
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + SWEEP_INTERVAL
                    self._sweep()
                self._last_error = None
            except Exception as exc:  # noqa: BLE001 - keep watching whatever happens (a database blip, say)
                text = f"{type(exc).__name__}: {exc}"
                if text != self._last_error:
                    log.warning("worker %s: liveness check failed: %s", self._context.name, text)
                self._last_error = text

    def _stop_canceled(self, requests: list[RunningStep]) -> None:
        context = self._context
        cancels = context.store.cancel_requests(r.task_id for r in requests)
        statuses: dict[str, DagsterRunStatus | None] = {}
        outcomes: dict[str, dict[str, StepOutcomes]] = {}  # per run, read only for steps of runs that are over
        now, running = self._context.clock(), {r.task_id for r in requests}
        for request in requests:
            if request.message is None:
                continue
            run_id = request.message.run_id
            if run_id not in statuses:
                run = context.instance.get_run_by_id(run_id)
                statuses[run_id] = run.status if run else None
            status = statuses[run_id]
            # A run process itself ends its run SUCCESS/FAILURE before exiting: only a cancel stops
            # it. A step has nobody waiting for it once its run is over.
            stop = STOP_STATUSES if request.message.kind is TaskKind.STEP else CANCEL_STATUSES
            if request.task_id in cancels:
                request.kill(f"cancel requested: {cancels[request.task_id]}")
            elif status in stop:
                why = f"run {run_id} is {status.value}"  # type: ignore[union-attr]  # in stop: not None
                if not self._ending_capture(request, outcomes):
                    request.kill(why)
                elif self._ending_for(request.task_id, now) > ENDING_GRACE:
                    request.kill(
                        f"{why} and its child was still ending step {request.message.step_key} "
                        f"{ENDING_GRACE:.0f} s after writing its outcome (compute-log upload, resource teardown)"
                    )
        self._ending_since = {t: since for t, since in self._ending_since.items() if t in running}

    def _ending_for(self, task_id: str, now: float) -> float:
        """Seconds since ``task_id``'s child was first seen ending its step after its run was over."""
        return now - self._ending_since.setdefault(task_id, now)

    def _ending_capture(self, request: RunningStep, outcomes: dict[str, dict[str, StepOutcomes]]) -> bool:
        """The step's child wrote its attempt's outcome (the last of the step's outcomes, and as many
        as its attempt number): it is only ending the step's compute-log capture. An outcome the
        orchestrator wrote (its health check failing a step it thought lost) does not count."""
        message = request.message
        if not isinstance(message, StepMessage) or request.child_pid is None:
            return False
        if message.run_id not in outcomes:
            outcomes[message.run_id] = step_outcomes(self._context.instance, message.run_id)
        step = outcomes[message.run_id].get(message.step_key, StepOutcomes())
        return step.count >= message.attempt and step.last_pid == request.child_pid

    def _sweep(self) -> None:
        settings = self._context.settings
        records = self._context.store.sweep(settings.record_expiry)
        workers = WorkerRegistry(self._context.instance).prune(settings.lost_worker_expiry)
        if records or workers:
            log.info(
                "worker %s: deleted %d stale liveness record(s) and %d lost worker(s) from the registry",
                self._context.name,
                records,
                len(workers),
            )
