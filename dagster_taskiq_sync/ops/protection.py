"""Scale-in protection's policy, whatever the platform: when a worker's busy or idle state reaches
its platform (``scale_in.py`` has the ECS and Kubernetes calls and the flag).

Policy:

* busy is applied at once; idle only after ``idle_delay`` seconds of staying idle, so a worker
  between two steps does not flap (Kubernetes asks not to update the annotation often, and a
  protection cleared for a moment is all a scale-in needs). Rapid changes coalesce to the last;
* on start the protection is cleared once, so a restarted container does not inherit its
  predecessor's (the pod annotation outlives a container restart);
* failures are retried with backoff (2 s doubling to 60 s), logged once per kind of failure, and
  never raised into the worker; :meth:`stop` clears the protection, best effort, within its timeout.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger("dagster_taskiq_sync.scale_in")

DEFAULT_IDLE_DELAY = 15.0  # seconds idle before protection is cleared


class ProtectionCallFailed(Exception):
    """One call to the platform failed; ``kind`` groups failures for logging once."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class ScaleInProtector:
    """No scale-in protection (the flag was not given): every method does nothing."""

    name = "none"

    def start(self) -> ScaleInProtector:
        return self

    def set_busy(self, busy: bool) -> None:
        """The worker went from idle to holding steps (True) or back (False). Never blocks, never raises."""

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until the platform has the last state asked for."""
        return True

    def stop(self, timeout: float = 5.0) -> None:
        """Clear the protection (best effort, within ``timeout``) and stop the background thread."""


class BackgroundProtector(ScaleInProtector):
    """Applies the desired state from one daemon thread: debounce, coalesce, renew, retry."""

    def __init__(
        self,
        *,
        idle_delay: float = DEFAULT_IDLE_DELAY,
        renew_interval: float | None = None,
        retry_initial: float = 2.0,
        retry_max: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.idle_delay = idle_delay
        self.renew_interval = renew_interval
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._clock = clock
        self._cond = threading.Condition()
        self._desired = False
        self._applied: bool | None = None  # unknown until the first call succeeds
        self._idle_since = clock()
        self._renew_at: float | None = None
        self._retry_at: float | None = None
        self._backoff = retry_initial
        self._stopping = False
        self._logged: set[str] = set()
        self._thread: threading.Thread | None = None

    # --- what the worker calls -----------------------------------------------------------

    def start(self) -> ScaleInProtector:
        self._thread = threading.Thread(target=self._run, name=f"scale-in-protection:{self.name}", daemon=True)
        self._thread.start()
        return self

    def set_busy(self, busy: bool) -> None:
        with self._cond:
            busy = bool(busy)
            if busy == self._desired or self._stopping:
                return
            self._desired = busy
            if not busy:
                self._idle_since = self._clock()
            self._cond.notify_all()

    def flush(self, timeout: float) -> bool:
        deadline = self._clock() + timeout
        with self._cond:
            while self._applied != self._desired:
                left = deadline - self._clock()
                if left <= 0 or self._thread is None or not self._thread.is_alive():
                    return False
                self._cond.wait(left)
            return True

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._desired = False
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def applied(self) -> bool | None:
        """What the platform was last told (None before the first successful call)."""
        with self._cond:
            return self._applied

    # --- the platform call ---------------------------------------------------------------

    def _apply(self, busy: bool) -> None:  # pragma: no cover - each platform overrides it
        raise NotImplementedError

    def _describe(self, busy: bool) -> str:
        return "protect this worker" if busy else "clear this worker's protection"

    # --- the background thread ------------------------------------------------------------

    def _next_target(self) -> bool | None:
        """Wait until there is something to send; None when the thread should end."""
        with self._cond:
            while True:
                now = self._clock()
                target = self._desired
                if self._stopping and target == self._applied:
                    return None
                if target != self._applied:
                    if self._retry_at is not None and now < self._retry_at and not self._stopping:
                        self._cond.wait(self._retry_at - now)
                        continue
                    going_idle = not target and self._applied is not None and not self._stopping
                    if going_idle and now < self._idle_since + self.idle_delay:
                        # A worker between two steps is idle for a moment; only a lasting idle
                        # clears the protection. A set_busy(True) meanwhile wakes us with nothing to do.
                        self._cond.wait(self._idle_since + self.idle_delay - now)
                        continue
                    return target
                if target and self._renew_at is not None:
                    if now >= self._renew_at:
                        return target
                    self._cond.wait(self._renew_at - now)
                    continue
                self._cond.wait()

    def _run(self) -> None:
        while True:
            target = self._next_target()
            if target is None:
                return
            try:
                self._apply(target)
            except Exception as exc:  # noqa: BLE001 - this thread must outlive any surprise
                if not isinstance(exc, ProtectionCallFailed):
                    exc = ProtectionCallFailed(type(exc).__name__, f"{type(exc).__name__}: {exc}")
                self._failed(target, exc)
                with self._cond:
                    if self._stopping:
                        return  # shutting down: one try is all the clear gets
                    self._retry_at = self._clock() + self._backoff
                    if self._renew_at is not None:  # a failed renewal waits like any retry
                        self._renew_at = max(self._renew_at, self._retry_at)
                    self._backoff = min(self._backoff * 2, self._retry_max)
                continue
            with self._cond:
                if self._logged and "recovered" not in self._logged:
                    self._logged.add("recovered")
                    log.info("scale-in protection (%s): calls succeed again", self.name)
                self._applied = target
                self._retry_at = None
                self._backoff = self._retry_initial
                self._renew_at = self._clock() + self.renew_interval if target and self.renew_interval else None
                self._cond.notify_all()
            log.debug("scale-in protection (%s): %s", self.name, "on" if target else "off")

    def _failed(self, target: bool, exc: ProtectionCallFailed) -> None:
        if exc.kind in self._logged:
            log.debug("scale-in protection (%s): could not %s: %s", self.name, self._describe(target), exc)
            return
        self._logged.add(exc.kind)
        log.warning(
            "scale-in protection (%s): could not %s: %s; retrying with backoff up to %g s "
            "(this kind of failure is logged once)",
            self.name,
            self._describe(target),
            exc,
            self._retry_max,
        )
