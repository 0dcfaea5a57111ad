"""``task_always_eager: true``: Celery's eager mode, as Dagster's in-process executor plus the
time limits it can honestly apply, and a warning for those it cannot.

Steps run one by one inside the run's own process, with no worker around them.

- **Soft limits apply**, as on workers: while a step with one runs, a timer sends this process
  the soft-limit signal when it falls due, and the op gets Dagster's own interrupt saying which
  limit (``_dagster/child``'s handler, the step child's). Under the op's ``RetryPolicy`` the step is
  retried and the run goes on; without one the step fails with that sentence and, as Dagster ends an
  in-process run on any interrupt, the run stops there. Signal handlers belong to the main thread:
  a run executing elsewhere (a thread of the host's) gets the warning below instead.
- **Hard limits do not apply**: killing the step's process would kill the run itself. The run's
  log says once, as a warning, which steps ask for one.

Bad limit values fail the run, as they would on workers.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

from dagster import DagsterEventType

from dagster_taskiq_sync._dagster.child import arm_soft_time_limit, install_soft_time_limit
from dagster_taskiq_sync._dagster.names import InProcessExecutor, RetryMode
from dagster_taskiq_sync.errors import ConfigError
from dagster_taskiq_sync.wire.settings import Settings
from dagster_taskiq_sync.wire.time_limits import Limit, StepLimits, limits_for_step

LISTED_STEPS = 10  # step keys named in the warning; the rest are counted
SOFT_LIMIT_SIGNAL = signal.SIGUSR1  # as a step child's (worker/child_pipe): billiard's choice
_ATTEMPT_STARTS = (DagsterEventType.STEP_START, DagsterEventType.STEP_RESTARTED)
_ATTEMPT_ENDS = (
    DagsterEventType.STEP_SUCCESS,
    DagsterEventType.STEP_FAILURE,
    DagsterEventType.STEP_UP_FOR_RETRY,
    DagsterEventType.STEP_SKIPPED,
)


def ignored_limits_warning(ignored: dict[str, list[Limit]]) -> str | None:
    """The warning for steps whose time limits eager mode cannot apply (None: no step has one)."""
    keys = sorted(key for key, limits in ignored.items() if limits)
    if not keys:
        return None
    named = ", ".join(keys[:LISTED_STEPS]) + (
        f" and {len(keys) - LISTED_STEPS} more" if len(keys) > LISTED_STEPS else ""
    )
    many = len(keys) > 1
    kinds = sorted({limit.kind for key in keys for limit in ignored[key]})
    origins = sorted({limit.origin for key in keys for limit in ignored[key]})
    return (
        f"{' and '.join(kinds).capitalize()} time limits do not apply in eager mode (task_always_eager: true): "
        f"step{'s' if many else ''} {named} ask{'' if many else 's'} for one ({'; '.join(origins)}), but steps run "
        "one by one in the run's own process, which no worker supervises; run them on workers "
        "(task_always_eager: false) to enforce the limits."
    )


class _SoftLimits:
    """Each step attempt's soft limit while it runs in this process (main thread only)."""

    def __init__(self, soft: dict[str, Limit]) -> None:
        self._soft = soft
        self._timer: threading.Timer | None = None
        self._previous: Any = None

    def __enter__(self) -> _SoftLimits:
        if self._soft:
            self._previous = install_soft_time_limit(SOFT_LIMIT_SIGNAL)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._soft:
            self._disarm()
            # None: a handler not set from Python, which cannot be put back; the default is what it was
            signal.signal(SOFT_LIMIT_SIGNAL, signal.SIG_DFL if self._previous is None else self._previous)

    def see(self, event: Any) -> None:
        """Arm at an attempt's start, disarm at its end (as the in-process executor reports them)."""
        if event.event_type in _ATTEMPT_STARTS and event.step_key in self._soft:
            self._disarm()
            limit = self._soft[event.step_key]
            arm_soft_time_limit(limit.interrupted(event.step_key))
            self._timer = threading.Timer(limit.seconds, os.kill, (os.getpid(), SOFT_LIMIT_SIGNAL))
            self._timer.daemon = True
            self._timer.start()
        elif event.event_type in _ATTEMPT_ENDS and self._timer is not None:
            self._disarm()

    def _disarm(self) -> None:
        arm_soft_time_limit(None)  # a signal already on its way is ignored
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class EagerExecutor(InProcessExecutor):
    """Dagster's in-process executor with the soft time limits it can apply (see the module docstring)."""

    def __init__(self, settings: Settings, retries: RetryMode) -> None:
        super().__init__(retries=retries)
        self.settings = settings

    def _limits(self, plan_context: Any, execution_plan: Any) -> dict[str, StepLimits]:
        limited: dict[str, StepLimits] = {}
        for step in execution_plan.get_steps_to_execute_in_topo_order():
            try:
                limits = limits_for_step(
                    str(step.node_handle),
                    step.tags or {},
                    self.settings.task_time_limit,
                    self.settings.task_soft_time_limit,
                )
            except ConfigError as exc:  # as on workers: one sentence in the run's log, and the run fails
                plan_context.log.error(str(exc))
                raise
            if limits != StepLimits():
                limited[step.key] = limits
        return limited

    def execute(self, plan_context: Any, execution_plan: Any) -> Iterator[Any]:
        limited = self._limits(plan_context, execution_plan)
        soft_applies = threading.current_thread() is threading.main_thread()
        warning = ignored_limits_warning(
            {
                key: [limit for limit in (limits.hard, None if soft_applies else limits.soft) if limit is not None]
                for key, limits in limited.items()
            }
        )
        if warning is not None:
            plan_context.log.warning(warning)
        soft = {key: limits.soft for key, limits in limited.items() if limits.soft is not None and soft_applies}
        with _SoftLimits(soft) as armed:
            for event in super().execute(plan_context, execution_plan):
                armed.see(event)
                yield event
