"""The orchestrator's side of Dagster's step delegation: the polling executor loop, step
submission order and run cancellation."""

from __future__ import annotations

import collections
import contextvars
import threading
import time
from collections.abc import Callable
from typing import Any

from dagster import DagsterEventType
from dagster._check import CheckError
from dagster._core.event_api import EventLogCursor
from dagster._core.execution.plan.active import ActiveExecution
from dagster._core.execution.plan.state import KnownExecutionState
from dagster._core.executor.step_delegating import (
    StepDelegatingExecutor,
    StepHandlerContext,
)
from dagster._core.executor.step_delegating import step_delegating_executor as _sde_module
from dagster._grpc.types import ExecuteStepArgs

# --- the orchestrator's loop ------------------------------------------------------------------------


class PollingStepDelegatingExecutor(StepDelegatingExecutor):
    """StepDelegatingExecutor with a hook run on every loop iteration that has steps in flight.

    Dagster's loop reads new events through ``_pop_events`` once per iteration; the hook lets
    the executor notice a run being canceled (``instance.report_run_canceling``, the UI) without
    waiting for a signal that an in-process caller never sends.

    It also builds each step's handler context with the known state *that step* needs (see
    ``_TaskiqActiveExecution.known_state_for``): Dagster builds it with the whole run's state for
    every launch and every health check, O(run size) each, O(n^2) per run.
    """

    late_commits: LateCommits | None = None  # set where event ids are handed out before commit

    def on_poll(self, instance: Any, run_id: str) -> None:
        """Called before every read of the event log; subclasses override it."""

    def _pop_events(self, instance, run_id, seen_storage_ids):  # Dagster's signature
        self.on_poll(instance, run_id)
        events = super()._pop_events(instance, run_id, seen_storage_ids)
        if self.late_commits is not None and self._event_cursor:
            read_up_to = EventLogCursor.parse(self._event_cursor).storage_id()
            events = [*events, *self.late_commits.check(instance, run_id, read_up_to, seen_storage_ids)]
        return events

    def _get_step_handler_context(self, plan_context, steps, active_execution):  # Dagster's signature
        known_state_for = getattr(active_execution, "known_state_for", None)
        if known_state_for is None or len(steps) != 1:
            return super()._get_step_handler_context(plan_context, steps, active_execution)
        return StepHandlerContext(
            instance=plan_context.plan_data.instance,
            plan_context=plan_context,
            steps=steps,
            execute_step_args=ExecuteStepArgs(
                job_origin=plan_context.reconstructable_job.get_python_origin(),
                run_id=plan_context.dagster_run.run_id,
                step_keys_to_execute=[steps[0].key],
                instance_ref=plan_context.plan_data.instance.get_ref(),
                retry_mode=self.retries.for_inner_plan(),
                known_state=known_state_for(steps[0]),
                should_verify_step=self._should_verify_step,
                print_serialized_events=False,
            ),
            dagster_run=plan_context.dagster_run,
        )


# --- events committed out of order -----------------------------------------------------------------
# Dagster's loop reads a run's events after the storage id it last read. PostgreSQL hands out an
# insert's id before the insert commits, so two events written at once (steps running side by side,
# the orchestrator's own engine events) can commit in the other order: a read between the two
# commits sees id 101 and moves its cursor past 100, which is then never read (seen in a bench
# under load: a step's STEP_SUCCESS skipped, the step failed 30 s later as "worker lost"). Reading
# at once on every change (storage/event_watch.py) makes such reads likelier. Every CHECK_SECONDS
# the events that drive Dagster's plan are read again from where the cursor was two checks before,
# and those not seen yet are handed to the loop.

LATE_CHECK_SECONDS = 1.0
_PLAN_EVENT_TYPES = {
    DagsterEventType.STEP_SUCCESS,
    DagsterEventType.STEP_FAILURE,
    DagsterEventType.STEP_UP_FOR_RETRY,
    DagsterEventType.STEP_OUTPUT,
    DagsterEventType.RESOURCE_INIT_FAILURE,
}


class LateCommits:
    """Finds a run's plan events whose commit came after later events had been read (see above)."""

    def __init__(self, every: float = LATE_CHECK_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self._every = every
        self._clock = clock
        self._next = clock() + every
        self._marks: collections.deque[int] = collections.deque([0, 0], maxlen=2)  # cursor at the last two checks
        self.found = 0  # events this found: each was read late, never lost

    def check(self, instance: Any, run_id: str, read_up_to: int, seen: set[int]) -> list[Any]:
        if self._clock() < self._next:
            return []
        self._next = self._clock() + self._every
        since = self._marks[0]
        self._marks.append(read_up_to)
        late = []
        cursor = EventLogCursor.from_storage_id(since).to_string()
        while True:
            conn = instance.get_records_for_run(run_id, cursor, of_type=_PLAN_EVENT_TYPES, limit=1000)
            for record in conn.records:
                if record.storage_id <= read_up_to and record.storage_id not in seen:
                    seen.add(record.storage_id)
                    if record.event_log_entry.dagster_event is not None:
                        late.append(record.event_log_entry.dagster_event)
            if not conn.has_more:
                break
            cursor = conn.cursor
        self.found += len(late)
        return late


# --- the loop's wait --------------------------------------------------------------------------------
# Dagster's loop ends every iteration with time.sleep(sleep_seconds). taskiq_executor waits on its
# run's bell instead (storage/event_watch.py): as long, or less when the run's events changed. The
# step-delegating module gets a stand-in for its ``time`` whose sleep does that in threads where
# taskiq_executor set ``loop_wait``; everywhere else it is time.sleep.

loop_wait: contextvars.ContextVar[Callable[[float], Any] | None] = contextvars.ContextVar(
    "dagster_taskiq_sync_loop_wait", default=None
)


class _LoopTime:
    """The step-delegating module's ``time`` (it uses only ``time.sleep``)."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        wait = loop_wait.get()
        if wait is None:
            time.sleep(seconds)
        else:
            wait(seconds)


# --- step submission order and run cancellation -----------------------------------------------------
# dagster-celery submits ready steps by (step priority + run priority), higher first, through
# ActiveExecution's sort_key_fn. StepDelegatingExecutor builds its ActiveExecution without one, so
# its module gets a subclass that takes the sort key from a context variable only taskiq_executor
# sets while it orchestrates; every other executor keeps Dagster's default order.
# The same subclass lets taskiq_executor stop a run being canceled (UI, report_run_canceling) through
# Dagster's own interrupt path: "termination signal, forwarding to steps", terminate_step for each
# running step, the run ends CANCELED. Dagster's interrupt flag is process-wide, so a per-run
# context variable says "this run's cancel was seen".

step_sort_key: contextvars.ContextVar[Any] = contextvars.ContextVar("dagster_taskiq_sync_step_sort_key", default=None)
run_interrupted: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "dagster_taskiq_sync_run_interrupted", default=None
)
_install_lock = threading.Lock()


step_launch_policy: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "dagster_taskiq_sync_step_launch_policy", default=None
)


class _TaskiqActiveExecution(ActiveExecution):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        sort_key = step_sort_key.get()
        if sort_key is not None and kwargs.get("sort_key_fn") is None:
            kwargs["sort_key_fn"] = sort_key
        self._taskiq_run_interrupted = run_interrupted.get()
        self._taskiq_policy = step_launch_policy.get()
        self._taskiq_replaying = False
        self._taskiq_dynamic_ancestors: dict[str, frozenset[str]] = {}
        super().__init__(*args, **kwargs)

    def check_for_interrupts(self) -> bool:
        return super().check_for_interrupts() or bool(
            self._taskiq_run_interrupted is not None and self._taskiq_run_interrupted()
        )

    # --- what a step's message carries ----------------------------------------------------------
    # Dagster hands every step the run's whole KnownExecutionState: every output produced so far
    # (~107 bytes each in a message: 110 KB for the gather step of a 1000-way fan-out), every
    # retry count and every dynamic mapping, built and validated (O(run size)) for each launch and
    # each health check. A step reads only its own retry count (attempt number, verify_step), the
    # ready outputs among its inputs' sources (StepExecutionContext.can_load) and the dynamic
    # mappings its plan is resolved with (those of its dynamic ancestors). tests/e2e/test_step_children.py
    # checks that the plan a step child builds from this state equals the one from the full state.

    def known_state_for(self, step: Any) -> KnownExecutionState:
        """The part of the run's known state ``step`` needs (see above)."""
        ready = self._step_outputs
        needed = {
            handle
            for step_input in step.step_inputs
            for handle in step_input.get_step_output_handle_dependencies()
            if handle in ready
        }
        attempts = self._retry_state.get_attempt_count(step.key)
        plan_state = self._plan.known_state
        return KnownExecutionState(
            previous_retry_attempts={step.key: attempts} if attempts else {},
            dynamic_mappings=self._dynamic_mappings_for(step.key),
            ready_outputs=needed,
            step_output_versions=plan_state.step_output_versions,
            parent_state=plan_state.parent_state,
        )

    def _dynamic_mappings_for(self, step_key: str) -> dict[str, Any]:
        mappings = self._completed_dynamic_outputs
        if not mappings:
            return {}
        try:
            wanted = self._dynamic_ancestors_of(step_key)
        except CheckError:  # a step outside this plan's executable steps (re-execution): all of them
            return dict(mappings)
        return {key: value for key, value in mappings.items() if key in wanted}

    def _dynamic_ancestors_of(self, step_key: str) -> frozenset[str]:
        """Keys of the upstream steps of ``step_key`` (transitively) that have dynamic outputs."""
        memo = self._taskiq_dynamic_ancestors
        stack = [step_key]
        while stack:
            key = stack[-1]
            if key in memo:
                stack.pop()
                continue
            deps = self.get_step_by_key(key).get_execution_dependency_keys()
            missing = [dep for dep in deps if dep not in memo]
            if missing:
                stack.extend(missing)
                continue
            found: set[str] = set()
            for dep in deps:
                found |= memo[dep]
                if any(output.is_dynamic for output in self.get_step_by_key(dep).step_outputs):
                    found.add(dep)
            memo[key] = frozenset(found)
            stack.pop()
        return memo[step_key]

    # --- how many steps go out, and when -------------------------------------------------------
    # taskiq_executor's launch policy (executor.LaunchPolicy) caps this run's steps in flight per
    # queue (fair sharing between runs on one queue, README "Fair sharing between runs"), refills
    # in batches (one SendMessageBatch rather than one call per step), and launches at most a
    # bounded number per loop iteration, so the loop reads results between launches. Replaying a
    # resumed run's events must see every step as Dagster would, so the policy is off meanwhile.

    def rebuild_from_events(self, dagster_events: Any) -> Any:
        self._taskiq_replaying = True
        try:
            return super().rebuild_from_events(dagster_events)
        finally:
            self._taskiq_replaying = False

    def get_steps_to_execute(self, limit: int | None = None) -> Any:
        policy = self._taskiq_policy
        if policy is None or self._taskiq_replaying:
            return super().get_steps_to_execute(limit)
        if policy.per_iteration is not None:
            limit = policy.per_iteration if limit is None else min(limit, policy.per_iteration)
        held: list[str] = []
        if policy.capped:
            self._update()
            held = self._over_caps(policy)
        try:
            batch = super().get_steps_to_execute(limit)
        finally:
            if held:
                self._executable.extend(held)
        if batch:
            policy.launching(len(batch))
        return batch

    def _over_caps(self, policy: Any) -> list[str]:
        """Take the ready steps the policy does not let out yet off ``_executable``; returns them."""
        if not self._executable:
            return []
        in_flight: dict[str, int] = collections.Counter(
            policy.queue_of(self.get_step_by_key(key)) for key in self._in_flight
        )
        room: dict[str, int] = {}
        allowed, held = [], []
        for key in sorted(self._executable, key=lambda k: self._sort_key_fn(self.get_step_by_key(k))):
            queue = policy.queue_of(self.get_step_by_key(key))
            if queue not in room:
                room[queue] = policy.room(queue, in_flight.get(queue, 0))
            if room[queue] > 0:
                room[queue] -= 1
                allowed.append(key)
            else:
                held.append(key)
                policy.held_back(queue)
        self._executable = allowed
        return held


def install_step_sort_key() -> None:
    """Let taskiq_executor order ready steps by priority, stop canceled runs through Dagster's
    interrupt path and wait on its run's bell between reads (idempotent; other executors unchanged)."""
    with _install_lock:
        if _sde_module.ActiveExecution is ActiveExecution:
            _sde_module.ActiveExecution = _TaskiqActiveExecution  # type: ignore[misc]  # Dagster has no hook for it
        if _sde_module.time is time:
            _sde_module.time = _LoopTime()  # type: ignore[assignment]  # Dagster has no hook for its wait
