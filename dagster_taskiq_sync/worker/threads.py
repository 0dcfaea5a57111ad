"""The worker's threads, each given exactly the collaborators it uses.

* :class:`ConsumerThread`: long-polls one queue for as many messages as the worker has room for
  (``capacity.Capacity``, shared fairly between queues); on shutdown it lets its last poll return
  and releases whatever that poll got at once.
* :class:`WorkerThread`: takes one received message at a time and runs its whole life
  (``request.Request.handle``), settling it in ``finally``.
* :class:`VisibilityThread`: extends the visibility of every held message every third of the
  visibility timeout, so SQS does not hand a long step to a second worker.
* :class:`Acker`: deletes finished messages, gathering those that finish within
  ``ACK_WINDOW`` seconds of each other into one ``DeleteMessageBatch`` call (up to ten).

Every blocking call has a timeout and re-checks a stop flag, so no thread can hang shutdown. A
thread that ends while the worker is not stopping reports itself through ``on_death``: the
worker then stops and exits non-zero, so its supervisor restarts it, rather than running degraded.
"""

from __future__ import annotations

import logging
import queue as queue_mod
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from dagster_taskiq_sync.errors import TaskiqSyncError
from dagster_taskiq_sync.wire.broker_client import BrokerClient
from dagster_taskiq_sync.wire.deliveries import Delivery
from dagster_taskiq_sync.wire.payloads import S3Pointer
from dagster_taskiq_sync.worker.capacity import Capacity

log = logging.getLogger("dagster_taskiq_sync.worker")
# A finished message waits up to this long for others to share its DeleteMessageBatch call. Its
# slot is free at once (the delete is bookkeeping, not work), and the message stays invisible for
# the whole visibility timeout anyway, so the wait costs no step any time: with 4 slots and
# sub-second steps it turns ~1 delete call per step into ~0.2-0.3.
ACK_WINDOW = 0.5


class GuardedThread(threading.Thread):
    """A daemon thread whose unexpected end is reported, never silent."""

    def __init__(self, name: str, on_death: Callable[[str], None]) -> None:
        super().__init__(name=name, daemon=True)
        self._on_death = on_death
        self.done = threading.Event()  # set by the worker when this thread should end

    def run(self) -> None:
        try:
            self.loop()
        except BaseException as exc:  # anything: the worker must not run on degraded
            log.exception("thread %s died", self.name)
            self._on_death(f"thread {self.name} died ({type(exc).__name__}: {exc})")
            return
        if not self.done.is_set():
            self._on_death(f"thread {self.name} ended unexpectedly")

    def loop(self) -> None:
        raise NotImplementedError


class ConsumerThread(GuardedThread):
    """Long-polls one queue, only for as many messages as the worker has room for."""

    def __init__(
        self,
        queue: str,
        client: BrokerClient,
        capacity: Capacity,
        hold: Callable[[list[Delivery]], None],
        release: Callable[[list[Delivery]], None],
        wait_time_seconds: int,
        polling_interval: float,
        on_death: Callable[[str], None],
        on_outage: Callable[[str, bool], None],
    ) -> None:
        super().__init__(f"consumer:{queue}", on_death)
        self.queue = queue
        self._client, self._capacity = client, capacity
        self._hold, self._release = hold, release
        self._wait, self._interval = wait_time_seconds, polling_interval
        self._on_outage = on_outage

    def loop(self) -> None:
        backoff = 0.5
        while not self.done.is_set():
            grant = self._capacity.acquire(self.queue, 10, self._wait, timeout=0.5)
            if grant is None:
                continue
            try:
                deliveries = self._client.receive(self.queue, grant.count, grant.wait_seconds)
            except TaskiqSyncError as exc:
                self._capacity.release(grant.count, self.queue)
                self._on_outage(self.queue, True)
                log.warning("receiving from queue %s failed: %s; retrying in %.1f s", self.queue, exc, backoff)
                self.done.wait(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            self._on_outage(self.queue, False)
            backoff = 0.5
            self._capacity.release(grant.count - len(deliveries), self.queue)
            if self.done.is_set() and deliveries:
                # The worker stopped while this poll was in flight: SQS handed it these after we
                # stopped listening. Release them now, not after a whole visibility timeout.
                self._release(deliveries)
            elif deliveries:
                self._hold(deliveries)
            elif self._wait == 0:
                self.done.wait(self._interval)


class WorkerThread(GuardedThread):
    """Runs one message's life at a time (``process`` never raises; settling is its job)."""

    def __init__(
        self,
        index: int,
        inbox: queue_mod.Queue[Delivery],
        process: Callable[[Delivery], Any],
        on_death: Callable[[str], None],
    ) -> None:
        super().__init__(f"worker-thread:{index}", on_death)
        # Not `_handle`: Python 3.13's Thread keeps its own `_handle` and refuses to start without it.
        self._inbox, self._process = inbox, process

    def loop(self) -> None:
        while not self.done.is_set():
            try:
                delivery = self._inbox.get(timeout=0.5)
            except queue_mod.Empty:
                continue
            self._process(delivery)
            del delivery


class VisibilityThread(GuardedThread):
    """Extends the visibility of every held message every third of the visibility timeout."""

    def __init__(
        self,
        held: Callable[[], list[Delivery]],
        client: BrokerClient,
        visibility_timeout: int,
        on_death: Callable[[str], None],
        on_extended: Callable[[int], None] = lambda n: None,
    ) -> None:
        super().__init__("visibility-extender", on_death)
        self._held, self._client, self._visibility = held, client, visibility_timeout
        self._on_extended = on_extended

    def loop(self) -> None:
        # Without this, SQS hands a step that outlives the visibility timeout to a second worker.
        while not self.done.wait(max(1.0, self._visibility / 3)):
            held = self._held()
            if not held:
                continue
            try:
                lost = self._client.change_visibility(held, self._visibility)
            except TaskiqSyncError as exc:
                log.warning("extending visibility of %d message(s) failed: %s", len(held), exc)
                continue
            self._on_extended(len(held) - len(lost))
            for receipt in lost:
                log.warning(
                    "SQS no longer knows a held message (receipt %s...); it may be delivered again", receipt[:12]
                )


class Acker(GuardedThread):
    """Deletes messages whose steps finished, batching those that finish close together.

    ``on_settled`` is called as soon as a message is handed over (its step is over, so its slot
    is free); the delete follows within ``window`` seconds, with whatever else finished meanwhile.
    On shutdown (``done``) the last ones are deleted without waiting.
    """

    def __init__(
        self,
        client: BrokerClient,
        on_death: Callable[[str], None],
        on_settled: Callable[[Delivery], None],
        window: float = ACK_WINDOW,
    ) -> None:
        super().__init__("acker", on_death)
        self._client, self._on_settled = client, on_settled
        self._window = window
        self._pending: queue_mod.Queue[tuple[Delivery, S3Pointer | None]] = queue_mod.Queue()

    def delete(self, delivery: Delivery, pointer: S3Pointer | None = None) -> None:
        self._pending.put((delivery, pointer))
        self._on_settled(delivery)

    def loop(self) -> None:
        while not (self.done.is_set() and self._pending.empty()):
            try:
                first = self._pending.get(timeout=0.2)
            except queue_mod.Empty:
                continue
            batch = [first]
            deadline = time.monotonic() + self._window
            while len(batch) < 10:
                left = deadline - time.monotonic()
                try:
                    if left <= 0 or self.done.is_set():
                        batch.append(self._pending.get_nowait())
                    else:
                        batch.append(self._pending.get(timeout=min(left, 0.1)))
                except queue_mod.Empty:
                    if left <= 0 or self.done.is_set():
                        break
            self._delete_batch(batch)

    def _delete_batch(self, batch: Sequence[tuple[Delivery, S3Pointer | None]]) -> None:
        deliveries = [d for d, _ in batch]
        try:
            refused = self._client.delete_many(deliveries, [p for _, p in batch if p is not None])
            for message_id in refused:
                log.warning(
                    "SQS refused to delete message %s; it will be delivered again and dropped as already run",
                    message_id,
                )
        except TaskiqSyncError as exc:
            # Not fatal: the message reappears after its visibility timeout and an attempt that
            # already ran is dropped then without running user code again.
            log.warning(
                "could not delete %d message(s) from queue %s: %s",
                len(deliveries),
                ", ".join(sorted({d.queue for d in deliveries})),
                exc,
            )
