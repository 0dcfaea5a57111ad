"""Who polls SQS and who supervises steps: the sync, thread-based worker.

In the mould of dramatiq's worker:

* one :class:`ConsumerThread` per queue long-polls SQS, but only for as many messages as the
  worker has room for: prefetch counts running *plus* waiting messages, so with the default
  multiplier of 1 a worker never holds a message it cannot start, and ready steps spread
  across workers instead of piling up in the first one that polls;
* ``concurrency`` :class:`WorkerThread` s each supervise one step child process at a time
  and settle its message in ``finally`` (delete when the step ran, release otherwise);
* one :class:`HeartbeatThread` extends the visibility of every message the worker holds, so
  a step longer than the queue's visibility timeout is not handed to a second worker;
* :meth:`Worker.stop` shuts down in order under one deadline: stop taking work, release
  unstarted messages at once (visibility 0) so another worker takes them, let running steps
  finish, kill what is left at the deadline, stop consumers, close clients.

Every blocking call has a timeout and re-checks a stop flag, so no thread can hang shutdown.
"""

from __future__ import annotations

import logging
import os
import queue as queue_mod
import socket
import threading
import time
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any

from dagster import DagsterRunStatus

from ._dagster_private import ExecuteRunArgs, ExecuteStepArgs, ResumeRunArgs, deserialize_value, serialize_value
from .broker import RUN_TASK_NAME, STEP_TASK_NAME, TASK_NAMES, BrokerClient, Delivery
from .errors import ConfigError, TaskiqSyncError
from .liveness import EXITED, RUNNING, LivenessStore, StepRecord, run_handle_id, step_handle_id
from .registry import WorkerRecord, WorkerRegistry
from .secrets import instance_from_ref, pooled
from .settings import Settings
from .step_runner import StepAttempt, StepProcess, StepRunner

log = logging.getLogger("dagster_taskiq_sync.worker")


@dataclass
class RunningStep:
    """A step process this worker supervises, and where its liveness is recorded."""

    handle: str
    run_id: str
    step_key: str
    delivery: Delivery
    store: LivenessStore
    instance: Any
    process: StepProcess | StepAttempt
    record: StepRecord
    kind: str = "step"  # or "run" / "resume" (TaskiqRunLauncher)
    kill_reason: str | None = None
    interrupted_at: float | None = None


@dataclass(frozen=True)
class Work:
    """What one message asks for."""

    kind: str  # "step", "run" or "resume"
    run_id: str
    handle: str
    payload: str
    instance_ref: Any
    label: str  # how logs name it
    step_key: str | None = None
    attempt: int | None = None


RUN_INTERRUPT_GRACE = 15.0  # seconds a terminated run gets to stop its steps before SIGKILL


class InstanceCache:
    """One DagsterInstance per instance reference seen in messages, open until the worker stops."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._instances: dict[str, Any] = {}

    def get(self, instance_ref: Any) -> Any:
        key = serialize_value(instance_ref)
        with self._lock:
            instance = self._instances.get(key)
            if instance is None:
                instance = self._instances[key] = pooled(instance_from_ref(instance_ref))
            return instance

    def close(self) -> None:
        with self._lock:
            for instance in self._instances.values():
                try:
                    instance.dispose()
                except Exception:  # noqa: BLE001 - closing must not mask shutdown
                    pass
            self._instances.clear()


@dataclass(frozen=True)
class WorkerOptions:
    name: str
    queues: tuple[str, ...]
    concurrency: int
    shutdown_timeout: float = 60.0  # running steps get this long to finish on SIGTERM


class Outcome(Enum):
    DONE = "done"  # the step ran (whatever its result): delete the message
    RELEASE = "release"  # not run here: make it visible again now
    ABANDON = "abandon"  # unusable: stop extending it and let the queue's redrive policy decide


class Capacity:
    """How many messages this worker may hold: running plus waiting."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held = 0
        self._cond = threading.Condition()

    def acquire_up_to(self, wanted: int, timeout: float) -> int:
        with self._cond:
            if self._held >= self.limit:
                self._cond.wait(timeout)
            granted = max(0, min(wanted, self.limit - self._held))
            self._held += granted
            return granted

    def release(self, count: int = 1) -> None:
        if count:
            with self._cond:
                self._held -= count
                self._cond.notify_all()


class Worker:
    def __init__(
        self,
        settings: Settings,
        options: WorkerOptions,
        client: BrokerClient,
        runner: StepRunner,
        registry: WorkerRegistry | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.terminate_requested = threading.Event()  # `worker terminate` asked this worker to stop
        self.started_wall = time.time()
        self.options = options
        self.client = client
        self.runner = runner
        self.host = socket.gethostname()
        self.capacity = Capacity(options.concurrency * settings.prefetch_multiplier)
        self.stopping = threading.Event()  # stop taking new work
        self.killing = threading.Event()  # kill running steps now
        self.work: queue_mod.Queue[Delivery] = queue_mod.Queue()
        self._held: dict[str, Delivery] = {}  # receipt handle -> delivery, extended by heartbeat
        self._running: dict[str, RunningStep] = {}  # step handle id -> running step
        self._lock = threading.Lock()
        self.instances = InstanceCache()
        self._consumers = [ConsumerThread(self, q) for q in options.queues]
        self._workers = [WorkerThread(self, i) for i in range(options.concurrency)]
        self._heartbeat = HeartbeatThread(self)
        self._liveness = LivenessThread(self)
        self.steps_done = 0

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self.runner.warm(children=self.options.concurrency)
        self._heartbeat.start()
        self._liveness.start()
        for thread in self._workers:
            thread.start()
        for thread in self._consumers:
            thread.start()
        self.heartbeat_registry()
        log.info(
            "worker %s ready: pid %d, queues %s, concurrency %d, prefetch %d, endpoint %s",
            self.options.name,
            os.getpid(),
            ", ".join(f"{q} (SQS {self.settings.sqs.queue_name(q)})" for q in self.options.queues),
            self.options.concurrency,
            self.capacity.limit,
            self.settings.sqs.describe_endpoint(),
        )

    def stop(self, timeout: float | None = None) -> None:
        """Ordered shutdown under one deadline (see the module docstring)."""
        timeout = self.options.shutdown_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        self.stopping.set()
        self.heartbeat_registry("stopping")
        self._release_waiting()
        running = self.running_steps()
        if running:
            log.info("worker %s: waiting up to %.0f s for %d running step(s): %s",
                     self.options.name, timeout, len(running), ", ".join(running))
        for thread in self._workers:
            thread.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in self._workers):
            self.kill_running("the shutdown deadline passed")
            for thread in self._workers:
                thread.join(10)
        for thread in self._consumers:
            thread.join(5)
        self._release_waiting()  # anything a consumer handed over while stopping
        self._heartbeat.done.set()
        self._liveness.done.set()
        self._heartbeat.join(5)
        self._liveness.join(5)
        self.client.stop()
        self.runner.close()
        self.instances.close()
        self.heartbeat_registry("stopped")
        log.info("worker %s stopped after running %d step(s)", self.options.name, self.steps_done)

    def kill_running(self, why: str) -> None:
        """Second SIGTERM or deadline: kill running steps. Their messages are deleted (the attempt
        has started); their records say "killed: WHY", so the orchestrator fails or retries them."""
        self.stopping.set()
        self.killing.set()
        for step in self.running():
            self.kill_step(step, why, force=True)

    def kill_step(self, step: RunningStep, why: str, force: bool = False) -> None:
        """Stop a child: a step is killed at once; a run is interrupted (so Dagster stops its steps
        and ends it CANCELED) and killed only if it is still there after its grace period."""
        if step.kill_reason is None:
            step.kill_reason = why
            log.warning("worker %s: %s %s of run %s (pid %s): %s", self.options.name,
                        "killing step" if step.kind == "step" else "stopping", step.step_key,
                        step.run_id, step.process.pid, why)
        if force or step.kind == "step":
            step.process.kill()
        elif step.interrupted_at is None:
            step.interrupted_at = time.monotonic()
            step.process.interrupt()
        elif time.monotonic() - step.interrupted_at > RUN_INTERRUPT_GRACE:
            step.process.kill()

    def heartbeat_registry(self, state: str = "running") -> None:
        """Refresh this worker's entry in the registry `worker list` reads."""
        if self.registry is None:
            return
        try:
            self.registry.record(WorkerRecord(
                name=self.options.name, host=self.host, pid=os.getpid(), queues=list(self.options.queues),
                concurrency=self.options.concurrency, running=[s.step_key for s in self.running()],
                state="stopping" if self.stopping.is_set() and state == "running" else state,
                heartbeat_interval=self.settings.heartbeat_interval,
            ))
        except Exception as exc:  # noqa: BLE001 - the registry is for humans; never stop work for it
            log.warning("worker %s: could not update the worker registry: %s", self.options.name, exc)

    def check_terminate_request(self) -> None:
        if self.registry is None or self.terminate_requested.is_set():
            return
        if self.registry.terminate_requested(self.options.name, since=self.started_wall):
            log.info("worker %s: `dagster-taskiq-sync worker terminate` asked this worker to stop", self.options.name)
            self.terminate_requested.set()

    def running(self) -> list[RunningStep]:
        with self._lock:
            return list(self._running.values())

    def running_steps(self) -> list[str]:
        return [step.step_key for step in self.running()]

    # --- message bookkeeping --------------------------------------------------------------

    def hold(self, delivery: Delivery) -> None:
        with self._lock:
            self._held[delivery.receipt_handle] = delivery

    def held(self) -> list[Delivery]:
        with self._lock:
            return list(self._held.values())

    def settle(self, delivery: Delivery, outcome: Outcome) -> None:
        """Delete, release or abandon one message; never raises."""
        with self._lock:
            self._held.pop(delivery.receipt_handle, None)
        try:
            if outcome is Outcome.DONE:
                self.client.delete(delivery)
            elif outcome is Outcome.RELEASE:
                self.client.change_visibility([delivery], 0)
        except TaskiqSyncError as exc:
            # Not fatal: the message reappears after its visibility timeout and a step attempt
            # that already ran is dropped then without running user code again.
            verb = "delete" if outcome is Outcome.DONE else "release"
            log.warning("worker %s: could not %s message %s on queue %s: %s",
                        self.options.name, verb, delivery.message_id, delivery.queue, exc)
        finally:
            self.capacity.release(1)

    def _release_waiting(self) -> None:
        while True:
            try:
                delivery = self.work.get_nowait()
            except queue_mod.Empty:
                return
            log.info("worker %s: releasing unstarted message %s back to queue %s",
                     self.options.name, delivery.message_id, delivery.queue)
            self.settle(delivery, Outcome.RELEASE)

    # --- running one message --------------------------------------------------------------

    def process(self, delivery: Delivery) -> Outcome:
        work = self._parse(delivery)
        if isinstance(work, Outcome):
            return work
        if self.stopping.is_set():
            return Outcome.RELEASE
        what = work.label
        try:
            instance = self.instances.get(work.instance_ref)
            store = LivenessStore(instance)
            previous = store.read([work.handle]).get(work.handle)
            run = instance.get_run_by_id(work.run_id)
        except ConfigError as exc:
            log.error("worker %s: cannot run %s: %s Leaving the message to the queue's redrive policy.",
                      self.options.name, what, exc)
            return Outcome.ABANDON
        except Exception as exc:  # noqa: BLE001 - the instance is unreachable or misconfigured
            log.error("worker %s: cannot read the Dagster instance for %s (%s: %s); releasing the "
                      "message", self.options.name, what, type(exc).__name__, exc)
            return Outcome.RELEASE
        if run is None:
            log.error("worker %s: run %s of message %s is not in the Dagster instance this worker "
                      "reaches; leaving it to the queue's redrive policy", self.options.name, work.run_id,
                      delivery.message_id)
            return Outcome.ABANDON
        if previous is not None and previous.state == EXITED and previous.cannot_run:
            log.error("worker %s: message %s on queue %s cannot run (%s, on worker %s); leaving it "
                      "to the queue's redrive policy", self.options.name, delivery.message_id,
                      delivery.queue, previous.reason, previous.worker)
            return Outcome.ABANDON
        if previous is not None and previous.state in (RUNNING, EXITED):
            log.warning("worker %s: dropping message %s: %s already %s on worker %s (delivered %d "
                        "times); not running it again", self.options.name, delivery.message_id, what,
                        "started" if previous.state == RUNNING else "ran", previous.worker,
                        delivery.receive_count)
            return Outcome.DONE
        if run.is_finished or run.status in (DagsterRunStatus.CANCELING, DagsterRunStatus.CANCELED):
            log.warning("worker %s: dropping message %s: run %s is %s, so %s is not run",
                        self.options.name, delivery.message_id, work.run_id, run.status.value, what)
            if work.kind != "step" and run.status == DagsterRunStatus.CANCELING:
                instance.report_run_canceled(run, message="Run canceled before a worker started it.")
            return Outcome.DONE

        meta = {
            "worker": self.options.name,
            "host": self.host,
            "worker_pid": os.getpid(),
            "queue": delivery.queue,
            "message_id": delivery.message_id,
            "receive_count": delivery.receive_count,
            "received_at": f"{delivery.received_at:.6f}",
            "run_id": work.run_id,
        }
        if work.step_key is not None:
            meta |= {"step_key": work.step_key, "attempt": work.attempt}
        started = time.monotonic()
        proc = self.runner.start(work.payload, meta, kind=work.kind)
        record = StepRecord(
            RUNNING, queue=delivery.queue, worker=self.options.name, host=self.host,
            worker_pid=os.getpid(), step_pid=proc.pid, message_id=delivery.message_id,
            heartbeat_interval=self.settings.heartbeat_interval,
        )
        step = RunningStep(work.handle, work.run_id, work.step_key or f"run {work.run_id}", delivery,
                           store, instance, proc, record, kind=work.kind)
        self._record(step, record)
        with self._lock:
            self._running[work.handle] = step
        log.info("worker %s: %s started (queue %s, pid %s)", self.options.name, what, delivery.queue, proc.pid)
        limit = self.settings.task_time_limit if work.kind == "step" else None
        try:
            while True:
                code = proc.wait(0.5)
                if code is not None:
                    break
                if self.killing.is_set():
                    self.kill_step(step, "the worker is shutting down", force=True)
                elif limit is not None and time.monotonic() - started > limit:
                    self.kill_step(step, f"task_time_limit of {limit:g} s exceeded", force=True)
                elif step.kill_reason is not None:
                    self.kill_step(step, step.kill_reason)  # escalates a run interrupt after its grace
            cannot_run = proc.cannot_run_reason()
        finally:
            with self._lock:
                self._running.pop(work.handle, None)
            proc.close()
        reason = f"killed: {step.kill_reason}" if step.kill_reason else cannot_run
        if work.kind != "step" or code != 0 or reason:
            # A step that ran to its end has its result in the event log, which is what the
            # orchestrator reads; its "running" record already stops a redelivery from running
            # it again. Only an abnormal end needs saying (one instance write per step fewer).
            self._record(step, replace(record, state=EXITED, ts=time.time(), exit_code=code, reason=reason,
                                       cannot_run=bool(cannot_run) or None))
        self.steps_done += 1
        log.info("worker %s: %s finished in %.2f s (exit code %s%s)", self.options.name, what,
                 time.monotonic() - started, code, f", {reason}" if reason else "")
        if work.kind != "step" and step.kill_reason:
            self._finish_canceled_run(instance, work.run_id, step.kill_reason)
        if cannot_run and not step.kill_reason:
            log.error("worker %s: message %s on queue %s cannot run here (%s); leaving it to the "
                      "queue's redrive policy", self.options.name, delivery.message_id, delivery.queue, reason)
            return Outcome.ABANDON
        return Outcome.DONE

    def _parse(self, delivery: Delivery) -> "Work | Outcome":
        """The work a message asks for, or how to settle it when it cannot be understood."""
        try:
            message = self.client.broker.formatter.loads(delivery.body)
        except Exception as exc:  # noqa: BLE001 - any decoding failure means the same thing
            log.error("worker %s: message %s on queue %s is not a TaskIQ message (%s: %s); "
                      "leaving it to the queue's redrive policy",
                      self.options.name, delivery.message_id, delivery.queue, type(exc).__name__, exc)
            return Outcome.ABANDON
        if message.task_name not in TASK_NAMES:
            log.error("worker %s: message %s on queue %s is for unknown task %r; leaving it to the "
                      "queue's redrive policy", self.options.name, delivery.message_id, delivery.queue,
                      message.task_name)
            return Outcome.ABANDON
        kwargs: dict[str, Any] = message.kwargs
        run_id = kwargs.get("run_id")
        try:
            if not isinstance(run_id, str):
                raise ValueError("run_id missing")
            if message.task_name == STEP_TASK_NAME:
                step_key, attempt, payload = kwargs.get("step_key"), kwargs.get("attempt"), kwargs.get("execute_step_args")
                if not (isinstance(step_key, str) and isinstance(attempt, int) and isinstance(payload, str)):
                    raise ValueError("step_key, attempt or execute_step_args missing")
                args = deserialize_value(payload, ExecuteStepArgs)
                return Work("step", run_id, step_handle_id(run_id, step_key, attempt), payload, args.instance_ref,
                            f"step {step_key} (attempt {attempt}) of run {run_id}", step_key, attempt)
            launch, payload = kwargs.get("launch"), kwargs.get("execute_run_args")
            if not (isinstance(launch, str) and isinstance(payload, str)):
                raise ValueError("launch or execute_run_args missing")
            kind = "run" if message.task_name == RUN_TASK_NAME else "resume"
            args = deserialize_value(payload, ExecuteRunArgs if kind == "run" else ResumeRunArgs)
            return Work(kind, run_id, run_handle_id(run_id, launch), payload, args.instance_ref,
                        f"run {run_id} ({launch})")
        except Exception as exc:  # noqa: BLE001 - any decoding failure means the same thing
            log.error("worker %s: message %s on queue %s has no usable arguments (%s); leaving it to "
                      "the queue's redrive policy", self.options.name, delivery.message_id, delivery.queue, exc)
            return Outcome.ABANDON

    def _finish_canceled_run(self, instance: Any, run_id: str, why: str) -> None:
        """A run process stopped on a terminate normally ends its run CANCELED itself; if it was
        killed before it could, say so here rather than leave the run CANCELING."""
        try:
            run = instance.get_run_by_id(run_id)
            if run is not None and run.status == DagsterRunStatus.CANCELING:
                instance.report_run_canceled(run, message=f"Run process stopped by worker {self.options.name}: {why}.")
        except Exception as exc:  # noqa: BLE001
            log.warning("worker %s: could not mark run %s canceled: %s", self.options.name, run_id, exc)

    def _record(self, step: RunningStep, record: StepRecord) -> None:
        step.record = record
        try:
            step.store.write(step.handle, record)
        except Exception as exc:  # noqa: BLE001 - liveness must not take the step down
            log.warning("worker %s: could not record liveness of step %s: %s", self.options.name, step.step_key, exc)


class ConsumerThread(threading.Thread):
    """Long-polls one queue, only for as many messages as the worker has room for."""

    def __init__(self, worker: Worker, queue: str) -> None:
        super().__init__(name=f"consumer:{queue}", daemon=True)
        self.worker = worker
        self.queue = queue

    def run(self) -> None:
        worker, settings = self.worker, self.worker.settings.sqs
        backoff = 0.5
        while not worker.stopping.is_set():
            granted = worker.capacity.acquire_up_to(10, timeout=0.5)
            if not granted:
                continue
            try:
                deliveries = worker.client.receive(
                    self.queue, granted, settings.wait_time_seconds, cancel=worker.stopping
                )
            except TaskiqSyncError as exc:
                worker.capacity.release(granted)
                log.warning("worker %s: receiving from queue %s failed: %s; retrying in %.1f s",
                            worker.options.name, self.queue, exc, backoff)
                worker.stopping.wait(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            backoff = 0.5
            worker.capacity.release(granted - len(deliveries))
            for delivery in deliveries:
                worker.hold(delivery)
                worker.work.put(delivery)
            if not deliveries and settings.wait_time_seconds == 0:
                worker.stopping.wait(settings.polling_interval)


class WorkerThread(threading.Thread):
    """Supervises one step at a time and settles its message in ``finally``."""

    def __init__(self, worker: Worker, index: int) -> None:
        super().__init__(name=f"worker-thread:{index}", daemon=True)
        self.worker = worker

    def run(self) -> None:
        worker = self.worker
        while not worker.stopping.is_set():
            try:
                delivery = worker.work.get(timeout=0.5)
            except queue_mod.Empty:
                continue
            outcome = Outcome.RELEASE
            try:
                outcome = worker.process(delivery)
            except Exception:  # noqa: BLE001 - a bad message must not kill the thread
                log.exception("worker %s: unexpected error handling message %s on queue %s",
                              worker.options.name, delivery.message_id, delivery.queue)
            finally:
                worker.settle(delivery, outcome)
                del delivery


class HeartbeatThread(threading.Thread):
    """Extends the visibility of every held message every third of the visibility timeout."""

    def __init__(self, worker: Worker) -> None:
        super().__init__(name="visibility-heartbeat", daemon=True)
        self.worker = worker
        self.done = threading.Event()  # set by Worker.stop once every step has settled

    def run(self) -> None:
        worker = self.worker
        visibility = worker.settings.sqs.visibility_timeout
        # Without this, SQS hands a step that outlives the visibility timeout to a second worker.
        while not self.done.wait(max(1.0, visibility / 3)):
            held = worker.held()
            if not held:
                continue
            try:
                lost = worker.client.change_visibility(held, visibility)
            except TaskiqSyncError as exc:
                log.warning("worker %s: extending visibility of %d message(s) failed: %s",
                            worker.options.name, len(held), exc)
                continue
            for receipt in lost:
                log.warning("worker %s: SQS no longer knows a held message (receipt %s...); it may be "
                            "delivered again", worker.options.name, receipt[:12])


class LivenessThread(threading.Thread):
    """Acts on cancel requests and canceled runs, and refreshes liveness records.

    Every ``cancel_poll_interval`` it reads the cancel requests of the running steps and the
    status of their runs, and kills a step whose run is being canceled or is over; every
    ``heartbeat_interval`` it rewrites their ``running`` records so the orchestrator can tell a
    live worker from a lost one.
    """

    def __init__(self, worker: Worker) -> None:
        super().__init__(name="liveness", daemon=True)
        self.worker = worker
        self.done = threading.Event()

    def run(self) -> None:
        worker, settings = self.worker, self.worker.settings
        next_heartbeat = time.monotonic() + settings.heartbeat_interval
        # Wake for whichever comes first: a heartbeat due, or a look for cancel requests.
        tick = min(settings.cancel_poll_interval, settings.heartbeat_interval)
        while not self.done.wait(tick):
            steps = worker.running()
            try:
                if steps:
                    self._kill_canceled(steps)
                if time.monotonic() >= next_heartbeat:
                    next_heartbeat = time.monotonic() + settings.heartbeat_interval
                    for step in steps:
                        if step.kill_reason is None:
                            worker._record(step, replace(step.record, ts=time.time()))
                    worker.heartbeat_registry()
                worker.check_terminate_request()
            except Exception as exc:  # noqa: BLE001 - keep watching whatever happens
                log.warning("worker %s: liveness check failed: %s", worker.options.name, exc)

    def _kill_canceled(self, steps: list[RunningStep]) -> None:
        by_store: dict[int, list[RunningStep]] = {}
        for step in steps:
            by_store.setdefault(id(step.store), []).append(step)
        for group in by_store.values():
            requests = group[0].store.cancel_requests(step.handle for step in group)
            statuses = {}
            for step in group:
                if step.run_id not in statuses:
                    run = step.instance.get_run_by_id(step.run_id)
                    statuses[step.run_id] = run.status if run else None
            for step in group:
                status = statuses[step.run_id]
                # A run process itself ends its run SUCCESS/FAILURE before exiting: only a
                # cancel stops it. A step has nobody waiting for it once its run is over.
                stop = STOP_STATUSES if step.kind == "step" else CANCEL_STATUSES
                if step.handle in requests:
                    self.worker.kill_step(step, f"cancel requested: {requests[step.handle]}")
                elif status in stop:
                    self.worker.kill_step(step, f"run {step.run_id} is {status.value}")


CANCEL_STATUSES = (DagsterRunStatus.CANCELING, DagsterRunStatus.CANCELED)
# A step whose run is in one of these states has nobody waiting for it.
STOP_STATUSES = (
    DagsterRunStatus.CANCELING,
    DagsterRunStatus.CANCELED,
    DagsterRunStatus.FAILURE,
    DagsterRunStatus.SUCCESS,
)
