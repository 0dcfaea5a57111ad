"""The one door between synchronous code and the async TaskIQ broker.

A :class:`Bridge` owns one anyio blocking portal: one event-loop thread. The executor, the
worker's threads and the CLI call the async broker only through it, always with a deadline, so
no synchronous caller can hang on the loop. Stopping the bridge cancels calls still in flight;
their callers get :class:`BridgeStoppedError` instead of waiting forever.

One bridge per process is shared through :func:`shared_bridge` (reference counted: the first
user starts it, the last one stops it).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

from anyio.from_thread import BlockingPortal, start_blocking_portal

from dagster_taskiq_sync.errors import BridgeStoppedError

T = TypeVar("T")


class Bridge:
    """An event loop in its own thread, reachable from any thread with deadlines."""

    def __init__(self, name: str = "taskiq-bridge") -> None:
        self._name = name
        self._lock = threading.Lock()
        self._cm: contextlib.AbstractContextManager[BlockingPortal] | None = None
        self._portal: BlockingPortal | None = None
        self._pending: set[concurrent.futures.Future[Any]] = set()

    @property
    def running(self) -> bool:
        return self._portal is not None

    def start(self) -> Bridge:
        with self._lock:
            if self._portal is None:
                cm = start_blocking_portal(backend="asyncio", name=self._name)
                self._portal = cm.__enter__()
                self._cm = cm
        return self

    def submit(self, fn: Callable[..., Awaitable[T]], *args: Any) -> concurrent.futures.Future[T]:
        """Schedule ``fn(*args)`` on the loop and return its future at once."""
        portal = self._portal
        if portal is None:
            raise BridgeStoppedError("the TaskIQ bridge is stopped; no broker call can be made")
        try:
            future = portal.start_task_soon(fn, *args)
        except RuntimeError:
            raise BridgeStoppedError("the TaskIQ bridge is stopping; no broker call can be made") from None
        with self._lock:
            self._pending.add(future)
        future.add_done_callback(self._discard)
        return future

    def _discard(self, future: concurrent.futures.Future[Any]) -> None:
        with self._lock:
            self._pending.discard(future)

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any, timeout: float) -> T:
        """Run ``fn(*args)`` on the loop and wait at most ``timeout`` seconds for it.

        On timeout the call is cancelled on the loop and :class:`TimeoutError` is raised.
        """
        future = self.submit(fn, *args)
        return self.result(future, timeout)

    @staticmethod
    def result(future: concurrent.futures.Future[T], timeout: float, cancel: bool = True) -> T:
        """Wait for a submitted call; on timeout cancel it (unless ``cancel`` is False)."""
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            if cancel:
                future.cancel()
            raise TimeoutError(f"broker call did not finish within {timeout:g} s") from None
        except concurrent.futures.CancelledError:
            raise BridgeStoppedError("the broker call was cancelled because the TaskIQ bridge stopped") from None

    def responsive(self, timeout: float) -> bool:
        """Whether the loop runs a trivial call within ``timeout`` seconds (the worker's liveness)."""
        try:
            self.call(_noop, timeout=timeout)
            return True
        except (TimeoutError, BridgeStoppedError):
            return False

    def stop(self) -> None:
        """Cancel calls in flight, stop the loop and join its thread."""
        with self._lock:
            cm, portal = self._cm, self._portal
            self._cm = self._portal = None
        if cm is None or portal is None:
            return
        with contextlib.suppress(RuntimeError):
            portal.call(portal.stop, True)
        cm.__exit__(None, None, None)

    def __enter__(self) -> Bridge:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def _noop() -> None:
    return None


_shared_lock = threading.Lock()
_shared: Bridge | None = None
_shared_users = 0
_shared_pid: int | None = None


@contextlib.contextmanager
def shared_bridge() -> Iterator[Bridge]:
    """The process's bridge: started by the first user, stopped when the last one leaves."""
    global _shared, _shared_users, _shared_pid
    with _shared_lock:
        if _shared_pid != os.getpid():  # a forked child must not reuse its parent's loop thread
            _shared, _shared_users, _shared_pid = None, 0, os.getpid()
        if _shared is None:
            _shared = Bridge(name="taskiq-bridge").start()
        _shared_users += 1
        bridge = _shared
    try:
        yield bridge
    finally:
        with _shared_lock:
            _shared_users -= 1
            if _shared_users == 0 and _shared is bridge:
                _shared = None
                bridge.stop()
