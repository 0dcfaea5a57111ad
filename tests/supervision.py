"""Fakes for unit tests of a worker's supervision of one child (``worker/request.Request``): a
clock the child's waits move forward, a child that ignores its soft limit until killed, and the
parts of a worker a request reads."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

import pytest

from dagster_taskiq_sync.wire.settings import Settings
from dagster_taskiq_sync.worker.request import Request


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class StubbornChild:
    """A step or run child that never ends by itself (it ignores its soft limit) until killed."""

    pid = 4242

    def __init__(self, clock: Clock) -> None:
        self.clock, self.interrupted_at, self.killed_at = clock, None, None

    def wait(self, timeout: float) -> int | None:
        self.clock.now += timeout
        return -9 if self.killed_at is not None else None

    def soft_interrupt(self) -> None:
        self.interrupted_at = self.clock.now if self.interrupted_at is None else pytest.fail("interrupted twice")

    def kill(self) -> None:
        self.killed_at = self.killed_at or self.clock.now


def supervising_request(
    queue: str, message: Any, child: Any, clock: Clock, metrics: Any, instance: Any = None, **settings: Any
) -> Request:
    """A request of ``message`` on ``queue`` whose ``child`` was started now, in a worker with
    ``settings`` (Settings fields), ``metrics`` and, for run messages, ``instance``."""
    worker = SimpleNamespace(
        name="w",
        settings=Settings(**settings),
        clock=clock,
        killing=threading.Event(),
        running=SimpleNamespace(add=lambda r: None, remove=lambda r: None),
        metrics=metrics,
        instance=instance,
        on_step_moved=lambda queue: None,
    )
    request = Request(SimpleNamespace(queue=queue, message_id="m", receive_count=1), worker)
    request.message, request.child, request._started = message, child, clock()
    return request
