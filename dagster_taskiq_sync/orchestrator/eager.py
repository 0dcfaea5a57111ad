"""``task_always_eager: true``: Celery's eager mode, as Dagster's in-process executor plus what a
user must be told about it.

Steps run one by one inside the run's own process, with no worker around them. The worker is what
enforces time limits (it interrupts or kills a step's child process); here there is no such process
to interrupt or kill without stopping the run itself, and Dagster ends a whole in-process run on an
interrupt (no RetryPolicy applies), so a soft limit cannot honestly be enforced per step either.
Rather than ignore limits silently, the run's log says once, as a warning, which steps ask for one
and that it does not apply. Bad limit values still fail the run, as they would on workers.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from dagster_taskiq_sync._dagster.names import InProcessExecutor, RetryMode
from dagster_taskiq_sync.errors import ConfigError
from dagster_taskiq_sync.wire.settings import Settings
from dagster_taskiq_sync.wire.time_limits import StepLimits, limits_for_step

LISTED_STEPS = 10  # step keys named in the warning; the rest are counted


def ignored_limits_warning(limited: dict[str, StepLimits]) -> str | None:
    """The warning for steps whose time limits eager mode cannot apply (None: no step has one)."""
    if not limited:
        return None
    keys = sorted(limited)
    named = ", ".join(keys[:LISTED_STEPS]) + (
        f" and {len(keys) - LISTED_STEPS} more" if len(keys) > LISTED_STEPS else ""
    )
    origins = sorted({limit.origin for limits in limited.values() for limit in (limits.hard, limits.soft) if limit})
    return (
        f"Time limits do not apply in eager mode (task_always_eager: true): step{'s' if len(keys) > 1 else ''} "
        f"{named} ask{'' if len(keys) > 1 else 's'} for one ({'; '.join(origins)}), but steps run one by one in the "
        "run's own process, which no worker supervises; run them on workers (task_always_eager: false) to "
        "enforce the limits."
    )


class EagerExecutor(InProcessExecutor):
    """Dagster's in-process executor that says which steps' time limits it cannot apply."""

    def __init__(self, settings: Settings, retries: RetryMode) -> None:
        super().__init__(retries=retries)
        self.settings = settings

    def execute(self, plan_context: Any, execution_plan: Any) -> Iterator[Any]:
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
        warning = ignored_limits_warning(limited)
        if warning is not None:
            plan_context.log.warning(warning)
        yield from super().execute(plan_context, execution_plan)
