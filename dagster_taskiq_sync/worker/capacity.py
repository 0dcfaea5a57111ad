"""How many messages a worker may hold, and how its queues share that room fairly.

Prefetch counts running *plus* waiting messages (dramatiq's and kombu's rule): a worker with
``-c N`` and ``worker_prefetch_multiplier`` M never holds more than N x M messages, so ready
steps spread across workers instead of piling up in the first one that polls.

A worker consuming several queues polls each from its own consumer thread. Room is granted in
turns: among the consumers waiting for room, the one served longest ago goes first, and when
several wait, each gets an equal share of the free slots (at least one). A consumer that gets
room while others still wait polls for a shorter time (its long poll divided among them), so an
idle queue's long poll never holds the only slot for a whole ``wait_time_seconds`` while another
queue has work: with ``-c 1`` on two queues, a step on either starts within one long poll.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Grant:
    """Room for ``count`` messages, and how long the poll that fills it may wait."""

    count: int
    wait_seconds: int


class Capacity:
    def __init__(self, limit: int, clock: Callable[[], float] = time.monotonic) -> None:
        if limit < 1:
            raise ValueError("a worker must be able to hold at least one message")
        self.limit = limit
        self._clock = clock
        self._held = 0
        self._cond = threading.Condition()
        self._turns = itertools.count(1)
        self._last_served: dict[str, int] = {}  # queue -> turn number of its last grant
        self._waiting: set[str] = set()

    def acquire(self, queue: str, wanted: int, wait_seconds: int, timeout: float) -> Grant | None:
        """Wait up to ``timeout`` for room on behalf of ``queue``'s consumer; None if there was none."""
        deadline = self._clock() + timeout
        with self._cond:
            self._waiting.add(queue)
            try:
                while True:
                    grant = self._grant(queue, wanted, wait_seconds)
                    if grant is not None:
                        return grant
                    left = deadline - self._clock()
                    if left <= 0:
                        return None
                    self._cond.wait(left)
            finally:
                self._waiting.discard(queue)

    def _grant(self, queue: str, wanted: int, wait_seconds: int) -> Grant | None:
        free = self.limit - self._held
        if free <= 0:
            return None
        contenders = sorted(self._waiting, key=lambda q: (self._last_served.get(q, 0), q))
        if queue not in contenders[:free]:
            return None  # another queue's turn first
        share = max(1, free // len(contenders))
        count = max(1, min(wanted, share))
        self._held += count
        self._last_served[queue] = next(self._turns)
        others_waiting = len(contenders) - 1
        if others_waiting and self.limit - self._held < others_waiting:
            # Others still wait for room this poll may hold: poll for a fraction of the time.
            wait_seconds = max(1, math.ceil(wait_seconds / (1 + others_waiting))) if wait_seconds else 0
        return Grant(count, wait_seconds)

    def release(self, count: int = 1) -> None:
        if count > 0:
            with self._cond:
                self._held = max(0, self._held - count)
                self._cond.notify_all()
