"""SIGTERM / SIGINT for a worker run from the CLI: handlers only record the signal.

A handler that logs or takes a lock can deadlock or raise ("reentrant call inside
<_io.BufferedWriter name='<stderr>'>") when the signal lands while the main thread is inside the
same call, and the stop request is lost for good. These handlers append the signal number to a
list and write one byte to a self-pipe; the main loop waits on the pipe, then logs and stops.
"""

from __future__ import annotations

import os
import select
import signal
from typing import Any


class SignalInbox:
    """Records SIGTERM/SIGINT; :meth:`wait` returns the ones not yet seen."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self._signals = signals
        self._seen: list[int] = []  # appended by the handler (atomic), read by the main loop
        self._read = 0
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._rfd, False)
        os.set_blocking(self._wfd, False)
        self._previous: dict[int, Any] = {}

    def install(self) -> SignalInbox:
        for signum in self._signals:
            self._previous[signum] = signal.signal(signum, self._handler)
        return self

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
        for fd in (self._rfd, self._wfd):
            try:
                os.close(fd)
            except OSError:
                pass

    def _handler(self, signum: int, _frame: Any) -> None:
        self._seen.append(signum)
        try:
            os.write(self._wfd, b"s")
        except OSError:  # the pipe is full: the list still has it
            pass

    def wait(self, timeout: float) -> list[int]:
        """Signals received since the last call, waiting up to ``timeout`` for one."""
        if len(self._seen) == self._read:
            try:
                select.select([self._rfd], [], [], timeout)
            except (OSError, ValueError):
                pass
        try:
            while os.read(self._rfd, 512):
                pass
        except (BlockingIOError, OSError):
            pass
        new = self._seen[self._read :]
        self._read += len(new)
        return new
