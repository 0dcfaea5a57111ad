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

With lanes (``wire/lanes.py``), a worker's queues are of two lanes: bulk (the ``-bulk`` lane
queues) and interactive (the others). Each lane may hold up to ``limit`` messages, and both
together ``limit + reserve``: while the worker is full of a backfill's steps, the interactive
lane still has ``reserve`` (one) slot to long-poll and run in, so an interactive step never
waits for a bulk step to end; and when both lanes wait for room, the interactive lane is served
first. With ``reserve`` 0 (no lanes) the lanes share ``limit`` as any queues do.

And the bulk lane yields: for ``bulk_yield`` seconds after an interactive step starts or ends, the
bulk lane takes no new message (the bulk steps running go on; the messages it would have taken
stay in SQS for any worker). A bulk step's child runs at the lowest CPU priority, but what it makes
others do does not: the worker's threads that supervise it, the database server's work for its
events, the orchestrator reading them. On a shared machine that work, at normal priority, is what
an interactive run waits for; a chain's steps start within the window of the one before, so the
worker's bulk lane stays quiet while the chain runs, and takes up the backfill ``bulk_yield`` after
its last step. A stream of interactive steps closer together than ``bulk_yield`` holds the bulk
lane the whole time (interactive first, as the lanes promise); ``bulk_yield`` 0 turns it off.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Grant:
    """Room for ``count`` messages, and how long the poll that fills it may wait."""

    count: int
    wait_seconds: int


class Capacity:
    def __init__(
        self,
        limit: int,
        clock: Callable[[], float] = time.monotonic,
        bulk: Iterable[str] = (),
        reserve: int = 0,
        bulk_yield: float = 0.0,
    ) -> None:
        if limit < 1:
            raise ValueError("a worker must be able to hold at least one message")
        self.limit = limit
        self.bulk = frozenset(bulk)  # the bulk lane's queues
        self.reserve = reserve  # slots beyond limit, for the lane the other one fills
        self.bulk_yield = bulk_yield if self.bulk else 0.0  # seconds (module docstring)
        self._bulk_quiet_until = -math.inf  # the bulk lane takes nothing new before this (clock)
        self._clock = clock
        self._held = 0
        self._held_bulk = 0
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
                    now = self._clock()
                    left = deadline - now
                    if left <= 0:
                        return None
                    if queue in self.bulk and now < self._bulk_quiet_until:  # wake when the window ends
                        left = min(left, self._bulk_quiet_until - now)
                    self._cond.wait(left)
            finally:
                self._waiting.discard(queue)

    def interactive_step(self, queue: str) -> None:
        """A step of ``queue`` started or ended (an admitted one: ``Request._start`` and ``_finish``
        call it): if ``queue`` is of the interactive lane, the bulk lane takes nothing new for
        ``bulk_yield`` seconds from now."""
        if self.bulk_yield > 0 and queue not in self.bulk:
            with self._cond:
                self._bulk_quiet_until = max(self._bulk_quiet_until, self._clock() + self.bulk_yield)

    def free(self, queue: str) -> int:
        """Messages ``queue``'s consumer may take now: its lane's room, within the worker's (none
        for the bulk lane while it yields)."""
        if queue in self.bulk and self._clock() < self._bulk_quiet_until:
            return 0
        in_lane = self._held_bulk if queue in self.bulk else self._held - self._held_bulk
        return min(self.limit - in_lane, self.limit + self.reserve - self._held)

    def _grant(self, queue: str, wanted: int, wait_seconds: int) -> Grant | None:
        free = self.free(queue)
        if free <= 0:
            return None
        # Among the queues that may take a message now (a full lane waits), the interactive lane
        # first, then the queue served longest ago.
        able = [q for q in self._waiting if self.free(q) > 0]
        contenders = sorted(able, key=lambda q: (q in self.bulk, self._last_served.get(q, 0), q))
        if queue not in contenders[:free]:
            return None  # another queue's turn first
        share = max(1, free // len(contenders))
        count = max(1, min(wanted, share))
        self._held += count
        if queue in self.bulk:
            self._held_bulk += count
        self._last_served[queue] = next(self._turns)
        others = [q for q in contenders if q != queue]
        if others and min(self.free(q) for q in others) < len(others):
            # Others still wait for room this poll may hold: poll for a fraction of the time.
            wait_seconds = max(1, math.ceil(wait_seconds / (1 + len(others)))) if wait_seconds else 0
        return Grant(count, wait_seconds)

    def release(self, count: int = 1, queue: str = "") -> None:
        """``count`` messages from ``queue`` are settled (or were never received)."""
        if count > 0:
            with self._cond:
                self._held = max(0, self._held - count)
                if queue in self.bulk:
                    self._held_bulk = max(0, self._held_bulk - count)
                self._cond.notify_all()
