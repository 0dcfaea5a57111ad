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
from dataclasses import dataclass
from enum import Enum
from typing import Any

from .broker import STEP_TASK_NAME, BrokerClient, Delivery
from .errors import TaskiqSyncError
from .settings import Settings
from .step_runner import StepProcess, StepRunner

log = logging.getLogger("dagster_taskiq_sync.worker")


@dataclass(frozen=True)
class WorkerOptions:
    name: str
    queues: tuple[str, ...]
    concurrency: int
    includes: tuple[str, ...] = ()
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

    @property
    def held(self) -> int:
        return self._held


class Worker:
    def __init__(
        self,
        settings: Settings,
        options: WorkerOptions,
        client: BrokerClient,
        runner: StepRunner,
    ) -> None:
        self.settings = settings
        self.options = options
        self.client = client
        self.runner = runner
        self.host = socket.gethostname()
        self.capacity = Capacity(options.concurrency * settings.prefetch_multiplier)
        self.stopping = threading.Event()  # stop taking new work
        self.killing = threading.Event()  # kill running steps now
        self.work: queue_mod.Queue[Delivery] = queue_mod.Queue()
        self._held: dict[str, Delivery] = {}  # receipt handle -> delivery, extended by heartbeat
        self._running: dict[str, StepProcess] = {}
        self._lock = threading.Lock()
        self._consumers = [ConsumerThread(self, q) for q in options.queues]
        self._workers = [WorkerThread(self, i) for i in range(options.concurrency)]
        self._heartbeat = HeartbeatThread(self)
        self.steps_done = 0

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self.runner.warm()
        self._heartbeat.start()
        for thread in self._workers:
            thread.start()
        for thread in self._consumers:
            thread.start()
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
        self._heartbeat.join(5)
        self.client.stop()
        log.info("worker %s stopped after running %d step(s)", self.options.name, self.steps_done)

    def kill_running(self, why: str) -> None:
        """Second SIGTERM or deadline: kill running steps; their messages are released."""
        self.stopping.set()
        self.killing.set()
        with self._lock:
            procs = list(self._running.items())
        for _, proc in procs:
            log.warning("worker %s: killing step process %s (%s)", self.options.name, proc.pid, why)
            proc.kill()

    def running_steps(self) -> list[str]:
        with self._lock:
            return [p.process.name.removeprefix("step:") for p in self._running.values()]

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
            log.warning("worker %s: could not %s message %s on queue %s: %s",
                        self.options.name, outcome.value, delivery.message_id, delivery.queue, exc)
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
        try:
            message = self.client.broker.formatter.loads(delivery.body)
        except Exception as exc:  # noqa: BLE001 - any decoding failure means the same thing
            log.error("worker %s: message %s on queue %s is not a TaskIQ message (%s: %s); "
                      "leaving it to the queue's redrive policy",
                      self.options.name, delivery.message_id, delivery.queue, type(exc).__name__, exc)
            return Outcome.ABANDON
        if message.task_name != STEP_TASK_NAME:
            log.error("worker %s: message %s on queue %s is for unknown task %r; leaving it to the "
                      "queue's redrive policy", self.options.name, delivery.message_id, delivery.queue,
                      message.task_name)
            return Outcome.ABANDON
        kwargs: dict[str, Any] = message.kwargs
        payload = kwargs.get("execute_step_args")
        step_key, run_id = kwargs.get("step_key"), kwargs.get("run_id")
        if not isinstance(payload, str) or not isinstance(step_key, str) or not isinstance(run_id, str):
            log.error("worker %s: message %s on queue %s lacks step arguments; leaving it to the "
                      "queue's redrive policy", self.options.name, delivery.message_id, delivery.queue)
            return Outcome.ABANDON
        if self.stopping.is_set():
            return Outcome.RELEASE

        meta = {
            "worker": self.options.name,
            "host": self.host,
            "worker_pid": os.getpid(),
            "queue": delivery.queue,
            "message_id": delivery.message_id,
            "receive_count": delivery.receive_count,
            "step_key": step_key,
            "attempt": kwargs.get("attempt", 1),
        }
        started = time.monotonic()
        proc = self.runner.start(payload, meta)
        with self._lock:
            self._running[delivery.receipt_handle] = proc
        log.info("worker %s: step %s of run %s started (queue %s, pid %s)",
                 self.options.name, step_key, run_id, delivery.queue, proc.pid)
        limit = self.settings.task_time_limit
        killed = None
        try:
            while True:
                code = proc.wait(0.5)
                if code is not None:
                    break
                if self.killing.is_set() and killed is None:
                    killed = "worker shutting down"
                    proc.kill()
                elif limit is not None and killed is None and time.monotonic() - started > limit:
                    killed = f"task_time_limit of {limit:g} s exceeded"
                    log.error("worker %s: step %s of run %s exceeded task_time_limit (%g s); killing it",
                              self.options.name, step_key, run_id, limit)
                    proc.kill()
        finally:
            with self._lock:
                self._running.pop(delivery.receipt_handle, None)
            proc.close()
        self.steps_done += 1
        log.info("worker %s: step %s of run %s finished in %.2f s (exit code %s%s)",
                 self.options.name, step_key, run_id, time.monotonic() - started, code,
                 f", killed: {killed}" if killed else "")
        return Outcome.DONE


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
