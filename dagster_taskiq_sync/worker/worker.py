"""Who polls SQS and supervises steps: the sync, thread-based worker, usable from the CLI or embedded.

In the mould of dramatiq's worker: one consumer thread per queue, ``concurrency`` worker threads,
a visibility extender, an acker and a liveness thread (``threads.py``); what happens to one
message lives in ``request.py``, what a started worker is made of in ``parts.py``. The worker
itself holds what they share: the capacity (prefetch counts running plus waiting messages,
shared fairly by its queues), the held messages, and the ordered shutdown under one deadline:

1. stop taking work; release received-but-unstarted messages at once (visibility 0);
2. let running steps finish until the deadline, then kill what is left;
3. let each consumer's last long poll return and release what it got (a poll abandoned
   mid-flight could take a message and hide it for a whole visibility timeout);
4. stop the helper threads, flush deletes, close clients, leave the registry.

Embedding it (``celery.Celery.Worker`` / dramatiq's ``Worker(broker).start()`` style)::

    from dagster_taskiq_sync import Worker, WorkerConfig

    with Worker(WorkerConfig.from_yaml("run_config.yaml", queues=["dagster"], concurrency=4)):
        ...  # steps run while the block runs; leaving it stops the worker in order

No signal handler is installed and ``sys.exit`` is never called unless ``run_until_stopped`` is
asked to (the CLI does).
"""

from __future__ import annotations

import logging
import os
import queue as queue_mod
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from dagster_taskiq_sync.config.worker_config import WorkerConfig
from dagster_taskiq_sync.ops.health_server import HealthServer
from dagster_taskiq_sync.ops.metrics import NullMetrics, WorkerMetrics
from dagster_taskiq_sync.ops.protection import ScaleInProtector
from dagster_taskiq_sync.ops.scale_in import protector_from_flag
from dagster_taskiq_sync.storage.registry import WorkerRecord
from dagster_taskiq_sync.wire.deliveries import Delivery
from dagster_taskiq_sync.wire.lanes import is_bulk_lane
from dagster_taskiq_sync.wire.tracing import FLUSH_SECONDS, active
from dagster_taskiq_sync.worker.admission import Outcome
from dagster_taskiq_sync.worker.capacity import Capacity
from dagster_taskiq_sync.worker.key_guard import StepUser
from dagster_taskiq_sync.worker.liveness_thread import LivenessThread
from dagster_taskiq_sync.worker.parts import Parts, WorkerHooks, open_parts
from dagster_taskiq_sync.worker.request import Request
from dagster_taskiq_sync.worker.signals import SignalInbox
from dagster_taskiq_sync.worker.threads import ConsumerThread, GuardedThread, VisibilityThread, WorkerThread

log = logging.getLogger("dagster_taskiq_sync.worker")


class Worker:
    """A dagster-taskiq-sync worker (see the module docstring)."""

    def __init__(
        self, config: WorkerConfig, *, instance: Any = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config
        self.settings = config.settings
        self.name = config.name
        self.host = socket.gethostname()
        self.stopping = threading.Event()  # stop taking new work
        self.killing = threading.Event()  # kill running steps now
        self.terminate_requested = threading.Event()  # `worker terminate` asked this worker to stop
        self.fatal: str | None = None  # why the worker must stop and exit non-zero
        self.steps_done = 0
        self._instance = instance
        self._clock = clock
        self._lock = threading.Lock()
        self._held: dict[str, Delivery] = {}  # receipt handle -> delivery: extended by the visibility thread
        self._inbox: queue_mod.Queue[Delivery] = queue_mod.Queue()
        self._outage: dict[str, bool] = {}
        bulk = [q for q in config.queues if self.settings.lanes and is_bulk_lane(q)]
        self.capacity = Capacity(
            config.concurrency * self.settings.prefetch_multiplier,
            clock=clock,
            bulk=bulk,
            reserve=config.interactive_slots if bulk else 0,
            bulk_yield=config.bulk_yield,
        )
        # One worker thread per slot, and one more for the interactive lane's reserve slot.
        self.threads_count = config.concurrency + self.capacity.reserve
        self._threads: list[GuardedThread] = []
        self._started = False
        self._owner_pid = os.getpid()  # the process that started it: a fork's copy must not stop it
        self.started_wall = time.time()
        # Replaced by start(): the real metrics, protector and probes, and the started parts.
        self.metrics: WorkerMetrics | NullMetrics = NullMetrics()
        self.protector = ScaleInProtector()
        self.health: HealthServer | None = None
        self._parts: Parts | None = None
        self.step_user = (
            StepUser.lookup(config.step_user) if config.step_user else None
        )  # checked before anything starts

    @property
    def parts(self) -> Parts:
        if self._parts is None:
            raise RuntimeError(f"worker {self.name} is not started")
        return self._parts

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Worker:
        settings, config = self.settings, self.config
        self._owner_pid = os.getpid()
        # Probes first (a Kubernetes startup probe may already ask while step children warm up);
        # a port in use or a platform without scale-in protection fails here, before anything else.
        self.metrics = WorkerMetrics() if config.metrics_port else NullMetrics()
        self.metrics.track_readiness(self.ready)
        self.protector = protector_from_flag(config.scale_in_protection)
        self.health = (
            HealthServer(
                config.metrics_port, config.metrics_host, live=self.live, ready=self.ready, metrics=self.metrics
            ).start()
            if config.metrics_port
            else None
        )
        try:
            self._start(settings, config)
        except BaseException:
            if self.health is not None:
                self.health.stop()
            raise
        return self

    def _start(self, settings: Any, config: WorkerConfig) -> None:
        on = (self._on_death, self._settled, self._count_done, self.capacity.interactive_step)
        hooks = WorkerHooks(self.host, self.stopping, self.killing, self._clock, *on)
        self._parts = open_parts(config, self._instance, self.metrics, hooks, self.step_user)
        self.metrics.track_slots(self._slots)
        self.protector.start()
        self.parts.runner.warm(children=self.threads_count, interactive_reserve=self.capacity.reserve)
        if active() is not None:  # set up now rather than on the first message; off, nothing is imported
            log.info("worker %s: OpenTelemetry traces on (OTEL_* environment variables)", self.name)
        self._threads = self._make_threads()
        for thread in self._threads:
            thread.start()
        self._started = True
        sqs = settings.sqs
        self.heartbeat_registry()
        log.info(
            "worker %s ready: pid %d, queues %s, concurrency %d, prefetch %d, endpoint %s, signed messages %s",
            self.name,
            os.getpid(),
            ", ".join(f"{q} (SQS {sqs.queue_name(q)})" for q in config.queues),
            config.concurrency,
            self.capacity.limit,
            sqs.describe_endpoint(),
            "required" if settings.keyring.verifies else "not required",
        )
        if self.health is not None:
            log.info("worker %s: metrics and probes at %s/metrics, /livez, /readyz", self.name, self.health.url)

    def _make_threads(self) -> list[GuardedThread]:
        """Each thread gets exactly the collaborators it uses."""
        sqs, config = self.settings.sqs, self.config
        return [
            self.parts.acker,
            VisibilityThread(
                self.held,
                self.parts.client,
                sqs.visibility_timeout,
                self._on_death,
                on_extended=self.metrics.visibility_extended,
            ),
            LivenessThread(self.parts.context, self.heartbeat_registry, self._check_terminate, self._on_death),
            *(WorkerThread(i, self._inbox, self._handle, self._on_death) for i in range(self.threads_count)),
            *(
                ConsumerThread(
                    q,
                    self.parts.client,
                    self.capacity,
                    self._hold,
                    self._release_now,
                    sqs.wait_time_seconds,
                    sqs.polling_interval,
                    self._on_death,
                    self._on_outage,
                )
                for q in config.queues
            ),
        ]

    def __enter__(self) -> Worker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def run_until_stopped(self, handle_signals: bool = True) -> int:
        """Start, run until SIGTERM/SIGINT (or `worker terminate`, or a fatal error), stop in order.
        Returns the exit code: 0 after a graceful stop, 1 when the worker stopped because it broke."""
        inbox = SignalInbox().install() if handle_signals else None
        try:
            self.start()
            while True:
                seen: list[int] = inbox.wait(1.0) if inbox else []
                if inbox is None:
                    time.sleep(1.0)
                if seen:
                    log.info(
                        "worker %s: %s received; finishing running steps (up to %.0f s), send it again to stop now",
                        self.name,
                        _signal_name(seen[0]),
                        self.config.shutdown_timeout,
                    )
                    if len(seen) > 1:
                        self.kill_running(f"second {_signal_name(seen[1])}")
                    break
                if self.terminate_requested.is_set() or self.fatal:
                    break
            self.stop(second_signal=(lambda: inbox.wait(0)) if inbox else None)
        finally:
            if inbox is not None:
                inbox.uninstall()
        if self.fatal:
            log.error("worker %s stopped because it could not go on: %s", self.name, self.fatal)
            return 1
        return 0

    def stop(self, timeout: float | None = None, second_signal: Callable[[], list[int]] | None = None) -> None:
        """Ordered shutdown under one deadline (see the module docstring); idempotent."""
        if not self._started or self._forked_copy("stop"):
            return
        self._started = False
        timeout = self.config.shutdown_timeout if timeout is None else timeout
        deadline = self._clock() + timeout
        self.stopping.set()
        self.heartbeat_registry("stopping")
        self.parts.client.call_timeout = max(
            1.0, min(self.parts.client.call_timeout, 10.0)
        )  # SQS may be gone: stay in the deadline
        self._release_waiting()
        workers = [t for t in self._threads if isinstance(t, WorkerThread)]
        consumers = [t for t in self._threads if isinstance(t, ConsumerThread)]
        running = [r.label for r in self.parts.context.running.list()]
        if running:
            log.info(
                "worker %s: waiting up to %.0f s for %d running step(s): %s",
                self.name,
                timeout,
                len(running),
                ", ".join(running),
            )
        for worker_thread in workers:
            worker_thread.done.set()
        for consumer in consumers:
            consumer.done.set()
        self._join(workers, deadline, second_signal)
        if any(t.is_alive() for t in workers):
            self.kill_running("the shutdown deadline passed")
            self._join(workers, self._clock() + 10, None)
        # A consumer's last long poll may still be in flight; it releases what it gets.
        self._join(consumers, max(deadline, self._clock() + 1) + self.settings.sqs.wait_time_seconds, None)
        self._release_waiting()
        for thread in self._threads:
            thread.done.set()
        helpers = [t for t in self._threads if not isinstance(t, (WorkerThread, ConsumerThread))]
        self._join(helpers, self._clock() + 10, None)
        self.parts.client.stop()
        self.parts.bridge.stop()
        self.parts.runner.close()
        if (tracing := active()) is not None:  # the last settle spans, before an embedding host moves on
            tracing.flush(FLUSH_SECONDS)
        self.heartbeat_registry("stopped")
        self.protector.stop()
        if self.health is not None:
            self.health.stop()
        log.info("worker %s stopped after running %d step(s)", self.name, self.steps_done)

    def _join(
        self, threads: Sequence[GuardedThread], deadline: float, second_signal: Callable[[], list[int]] | None
    ) -> None:
        for thread in threads:
            while thread.is_alive() and self._clock() < deadline:
                thread.join(min(0.2, max(0.0, deadline - self._clock())))
                if second_signal is not None:
                    seen = second_signal()
                    if seen and not self.killing.is_set():
                        self.kill_running(f"second {_signal_name(seen[0])}")

    def kill_running(self, why: str) -> None:
        """Second SIGTERM or deadline: kill running steps. Their messages are deleted (the attempt
        has started); their records say "killed: WHY", so the orchestrator fails or retries them."""
        if self._forked_copy("kill_running"):
            return
        self.stopping.set()
        self.killing.set()
        if self._parts is None:  # nothing started, nothing runs
            return
        for request in self.parts.context.running.list():
            request.kill(why, force=True)

    def _forked_copy(self, what: str) -> bool:
        """In a fork of the host, this object is a copy with none of the worker's threads, yet with
        its step children's pipes and pids: a stop from there hangs on the event loop that is not
        there, and a kill would kill the parent's running steps."""
        if os.getpid() == self._owner_pid:
            return False
        log.warning("worker %s: %s() ignored in pid %d, a fork of its process", self.name, what, os.getpid())
        return True

    def _on_death(self, why: str) -> None:
        if not self.stopping.is_set() and self.fatal is None:
            self.fatal = why

    # --- health ---------------------------------------------------------------------------------

    def live(self) -> tuple[bool, str]:
        """Restart me if false: a thread died, or the event-loop bridge does not answer."""
        if self.fatal:
            return False, self.fatal
        dead = [t.name for t in self._threads if not t.is_alive() and not t.done.is_set()]
        if dead:
            return False, f"threads not running: {', '.join(dead)}"
        if self._started and self._parts is not None and not self._parts.bridge.responsive(timeout=2.0):
            return False, "the event-loop bridge does not answer"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        """Send me work if true: consuming, not draining, queues reachable (never a reason to restart)."""
        if not self._started or self.stopping.is_set():
            return False, "draining" if self.stopping.is_set() else "not started"
        down = [q for q, out in self._outage.items() if out]
        if down:
            return False, f"SQS unreachable for queue {', '.join(down)}"
        return True, "ok"

    def _on_outage(self, queue: str, down: bool) -> None:
        self._outage[queue] = down

    # --- messages ---------------------------------------------------------------------------------

    def held(self) -> list[Delivery]:
        with self._lock:
            return list(self._held.values())

    def _hold(self, deliveries: list[Delivery]) -> None:
        with self._lock:
            for delivery in deliveries:
                self._held[delivery.receipt_handle] = delivery
            busy = bool(self._held)
        self.protector.set_busy(busy)
        for delivery in deliveries:
            self._inbox.put(delivery)

    def _settled(self, delivery: Delivery) -> None:
        with self._lock:
            self._held.pop(delivery.receipt_handle, None)
            busy = bool(self._held)
        self.capacity.release(1, delivery.queue)
        if not busy:
            self.protector.set_busy(False)

    def _slots(self) -> tuple[int, int, int]:
        """(busy slots, free slots, prefetched messages) for the metrics."""
        busy = len(self.parts.context.running.list())
        with self._lock:
            held = len(self._held)
        return busy, max(0, self.config.concurrency - busy), max(0, held - busy)

    def _handle(self, delivery: Delivery) -> None:
        verdict = Request(delivery, self.parts.context).handle()
        if verdict.outcome is not Outcome.DONE:  # a delete settles through the acker
            self._settled(delivery)

    def _release_now(self, deliveries: list[Delivery]) -> None:
        for delivery in deliveries:
            log.info(
                "worker %s: releasing message %s back to queue %s (the worker is stopping)",
                self.name,
                delivery.message_id,
                delivery.queue,
            )
            Request(delivery, self.parts.context).mark_final_delivery()
        try:
            self.parts.client.change_visibility(deliveries, 0)
        except Exception as exc:  # noqa: BLE001 - releasing is best effort; unreleased messages reappear after their visibility timeout
            log.warning("worker %s: could not release %d message(s): %s", self.name, len(deliveries), exc)
        for delivery in deliveries:
            self.capacity.release(1, delivery.queue)

    def _release_waiting(self) -> None:
        waiting = []
        while True:
            try:
                waiting.append(self._inbox.get_nowait())
            except queue_mod.Empty:
                break
        if waiting:
            with self._lock:
                for delivery in waiting:
                    self._held.pop(delivery.receipt_handle, None)
            self._release_now(waiting)

    def _count_done(self) -> None:
        with self._lock:
            self.steps_done += 1

    # --- registry --------------------------------------------------------------------------------

    def heartbeat_registry(self, state: str = "running") -> None:
        """Refresh this worker's entry in the registry `worker list` and `queues stats` read."""
        if self._parts is None:
            return
        running = self.parts.context.running.list()
        try:
            self.parts.registry.record(
                WorkerRecord(
                    name=self.name,
                    host=self.host,
                    pid=os.getpid(),
                    queues=list(self.config.queues),
                    concurrency=self.config.concurrency,
                    running=[r.step_key for r in running],
                    steps=[r.registry_entry() for r in running],
                    state="stopping" if self.stopping.is_set() and state == "running" else state,
                    heartbeat_interval=self.settings.heartbeat_interval,
                    signing_required=self.settings.keyring.verifies,
                )
            )
        except Exception as exc:  # noqa: BLE001 - the registry is for humans; never stop work for it
            log.warning("worker %s: could not update the worker registry: %s", self.name, exc)

    def _check_terminate(self) -> None:
        if self.terminate_requested.is_set():
            return
        if self.parts.registry.terminate_requested(self.name, since=self.started_wall):
            log.info("worker %s: `dagster-taskiq-sync worker terminate` asked this worker to stop", self.name)
            self.terminate_requested.set()


def _signal_name(signum: int) -> str:
    import signal

    return signal.Signals(signum).name
