"""What one message's life may use of its worker: the collaborators a ``request.Request`` gets.

Requests never see the ``Worker`` itself (its threads, capacity and shutdown): only this.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from dagster_taskiq_sync.ops.metrics import NullMetrics
from dagster_taskiq_sync.storage.liveness import LivenessStore
from dagster_taskiq_sync.wire.broker_client import BrokerClient
from dagster_taskiq_sync.wire.messages import Message
from dagster_taskiq_sync.wire.settings import Settings
from dagster_taskiq_sync.worker.step_runner import StepRunner


class RunningStep(Protocol):
    """What the worker and its liveness thread use of a running ``request.Request``."""

    @property
    def message(self) -> Message | None: ...
    @property
    def task_id(self) -> str: ...
    @property
    def label(self) -> str: ...
    @property
    def step_key(self) -> str: ...
    @property
    def child_pid(self) -> int | None: ...
    def heartbeat(self) -> None: ...
    def kill(self, why: str, force: bool = False) -> None: ...
    def registry_entry(self) -> dict[str, Any]: ...


class RunningRequests:
    """The requests whose children are running (the liveness thread heartbeats and cancels them)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[int, RunningStep] = {}

    def add(self, request: RunningStep) -> None:
        with self._lock:
            self._requests[id(request)] = request

    def remove(self, request: RunningStep) -> None:
        with self._lock:
            self._requests.pop(id(request), None)

    def list(self) -> list[RunningStep]:
        with self._lock:
            return list(self._requests.values())


@dataclass
class WorkerContext:
    """The collaborators one message's life uses, and nothing else of the worker."""

    name: str
    host: str
    pid: int
    settings: Settings
    client: BrokerClient
    instance: Any
    store: LivenessStore
    runner: StepRunner
    acks: Any  # worker_threads.Acker: delete(delivery, pointer)
    stopping: threading.Event
    killing: threading.Event
    running: RunningRequests = field(default_factory=RunningRequests)
    metrics: Any = field(default_factory=NullMetrics)  # metrics.WorkerMetrics when --metrics-port is given
    clock: Callable[[], float] = time.monotonic
    on_done: Callable[[], None] = lambda: None
    # A step (or launched run) of this queue starts or ends: the bulk lane yields (capacity.Capacity).
    on_step_moved: Callable[[str], None] = lambda queue: None

    def count_done(self) -> None:
        self.on_done()
