"""Who decides when a run's ready steps go out: per-run caps on steps in flight, refills in batches.

Without a cap, a run sends every ready step at once: a 1000-way fan-out puts 1000 messages on the
queue, and a small run started after it waits behind all of them (measured: a 5-step chain took
45x its solo time). SQS standard queues have no per-run fairness, so each run keeps its own share
small instead: at most ``steps_in_flight_per_slot`` x the live worker slots on a queue (never
fewer than ``min_steps_in_flight``) of its steps are in flight there, queued or running. The rest
wait in the orchestrator's own plan (Dagster's ``ActiveExecution``), where they cost nothing, and
go out as earlier ones finish. Another run's step then waits behind at most about one slot's
worth of this run's messages per slot.

Live slots come from the worker registry (``registry.py``, the same instance every worker
heartbeats into): the summed ``-c`` of running workers that consume the queue, read when the run
starts and again every ``health_check_interval``. The cap follows the fleet: with autoscaling on
backlog (KEDA's ``aws-sqs-queue`` scaler with ``queueLength`` = a worker's concurrency and
``scaleOnInFlight``), a run holds about ``per_slot`` x slots messages, so KEDA asks for ``per_slot``
x the current replicas, the new workers' slots raise the cap, and the backlog grows with the
fleet until the run's ready steps or ``maxReplicaCount`` run out. ``per_slot`` must stay above 1
for that (at 1 the backlog never exceeds what the fleet already has); the floor lets a run with
no live worker still put work on the queue, so scaling from zero starts.

Refills go out together: once a run has more than its queue's slots in flight, it waits until it
may send a batch of up to ten (one ``SendMessageBatch``) rather than one message per finished
step; the queue still holds the run's next steps while the batch is gathered.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from dagster_taskiq_sync.wire.broker import BATCH_ENTRIES
from dagster_taskiq_sync.wire.messages import queue_for_tags

log = logging.getLogger("dagster_taskiq_sync.fair_share")
LAUNCHES_PER_ITERATION = 50  # steps launched before the orchestrator reads results again


def live_slots(workers: Iterable[Any], now: float | None = None) -> dict[str, int]:
    """Celery queue name -> summed concurrency of the running, live workers consuming it."""
    now = now if now is not None else time.time()
    slots: dict[str, int] = {}
    for worker in workers:
        if worker.state != "running" or not worker.looks_alive(now):
            continue
        for queue in dict.fromkeys(worker.queues):
            slots[queue] = slots.get(queue, 0) + max(0, int(worker.concurrency))
    return slots


class LaunchPolicy:
    """What ``_TaskiqActiveExecution.get_steps_to_execute`` asks before steps go out.

    ``per_slot`` None: no cap (every ready step goes out, at most ``per_iteration`` per loop
    iteration). ``caps`` stay empty until :meth:`refresh` has read the registry once.
    """

    def __init__(
        self,
        default_queue: str,
        per_slot: float | None,
        floor: int,
        on_launching: Callable[[int], None] = lambda n: None,
        per_iteration: int | None = LAUNCHES_PER_ITERATION,
        route: Callable[[str, Mapping[str, Any]], str] | None = None,
    ) -> None:
        self.default_queue = default_queue
        # (step key, tags) -> queue: the executor's routing (queue tags, then execution.config.routes)
        self.route = route or (lambda _key, tags: queue_for_tags(tags, default_queue))
        self.per_slot = per_slot
        self.floor = floor
        self.per_iteration = per_iteration
        self.on_launching = on_launching
        self.caps: dict[str, int] = {}
        self.slots: dict[str, int] = {}
        self.held_queues: set[str] = set()  # queues on which the cap held a ready step back
        self._queues: dict[str, str] = {}

    @property
    def capped(self) -> bool:
        return bool(self.caps)

    def queue_of(self, step: Any) -> str:
        queue = self._queues.get(step.key)
        if queue is None:
            queue = self._queues[step.key] = self.route(step.key, step.tags)
        return queue

    def refresh(self, queues: Iterable[str], slots: Mapping[str, int]) -> dict[str, int]:
        """New caps for ``queues`` from the live slots on each; returns them."""
        if self.per_slot is None:
            return {}
        self.slots = {queue: slots.get(queue, 0) for queue in queues}
        self.caps = {queue: max(self.floor, math.ceil(self.per_slot * n)) for queue, n in self.slots.items()}
        return dict(self.caps)

    def room(self, queue: str, in_flight: int) -> int:
        """How many more of this run's steps may go to ``queue`` now."""
        cap = self.caps.get(queue)
        if cap is None:
            return 1 << 30
        room = cap - in_flight
        slots = self.slots.get(queue, 0)
        # Past the queue's slots, wait for a whole batch: one SendMessageBatch per refill. (With
        # no live slot known there is no batch to wait for: the floor goes out as it frees.)
        batch = max(1, min(BATCH_ENTRIES, cap - slots))
        if slots and in_flight > slots and room < batch:
            return 0
        return max(0, room)

    def held_back(self, queue: str) -> None:
        self.held_queues.add(queue)

    def launching(self, count: int) -> None:
        self.on_launching(count)
