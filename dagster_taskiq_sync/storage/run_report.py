"""What happened to each step of a run, read back from the Dagster event log.

Used by the demo to print where each step ran, and by tests to assert it; workers read how many
attempts of a step have ended, and which process ended the last (``step_outcomes``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dagster import DagsterEventType, DagsterInstance

PICKED_UP_KEY = "picked_up_by"  # metadata key of the event saying which worker took a message

# Steps say who took them in STEP_WORKER_STARTED, whole runs (TaskiqRunLauncher, also when
# resumed) in an engine event; both carry the PICKED_UP_KEY metadata.
PICKED_UP_EVENTS = (DagsterEventType.STEP_WORKER_STARTED, DagsterEventType.ENGINE_EVENT)

# Each attempt of a step ends in exactly one of these: its own, or the health check's for a worker
# that was lost while it ran.
STEP_OUTCOMES = frozenset(
    {DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE, DagsterEventType.STEP_UP_FOR_RETRY}
)


@dataclass
class StepReport:
    step_key: str
    worker: str | None = None
    host: str | None = None
    pid: int | None = None
    queue: str | None = None
    started: float | None = None
    finished: float | None = None
    status: str = "NOT RUN"
    attempts: int = 0
    messages: list[str] = field(default_factory=list)

    @property
    def seconds(self) -> float | None:
        if self.started is None or self.finished is None:
            return None
        return self.finished - self.started


def step_reports(instance: DagsterInstance, run_id: str) -> dict[str, StepReport]:
    reports: dict[str, StepReport] = {}
    for record in instance.all_logs(run_id):
        event = record.dagster_event
        key = record.step_key or (event.step_key if event else None)
        if not key:
            continue
        rep = reports.setdefault(key, StepReport(key))
        if event is None:
            continue
        kind = event.event_type
        meta = getattr(event.event_specific_data, "metadata", None) or {}
        if kind in PICKED_UP_EVENTS and PICKED_UP_KEY in meta:
            rep.worker = _text(meta.get("worker"))
            rep.host = _text(meta.get("host"))
            rep.queue = _text(meta.get("queue"))
            pid = _text(meta.get("pid"))
            rep.pid = int(pid) if pid else None
        elif kind == DagsterEventType.STEP_START:
            rep.attempts += 1
            rep.started = record.timestamp
        elif kind == DagsterEventType.STEP_RESTARTED:
            rep.attempts += 1
        elif kind in (DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE, DagsterEventType.STEP_SKIPPED):
            rep.finished = record.timestamp
            rep.status = kind.value.removeprefix("STEP_")
            if kind == DagsterEventType.STEP_FAILURE and event.step_failure_data.error:
                rep.messages.append(event.step_failure_data.error.message.strip())
        elif kind == DagsterEventType.STEP_UP_FOR_RETRY:
            rep.status = "UP_FOR_RETRY"
    return reports


@dataclass(frozen=True)
class StepOutcomes:
    """A step's attempt outcomes in a run's event log: how many, and which process wrote the last."""

    count: int = 0
    last_pid: int | None = None


def step_outcomes(instance: DagsterInstance, run_id: str) -> dict[str, StepOutcomes]:
    """Each step's :class:`StepOutcomes` in the run's event log, in one read (steps with none are absent)."""
    outcomes: dict[str, StepOutcomes] = {}
    for entry in instance.all_logs(run_id, of_type=set(STEP_OUTCOMES)):
        if entry.step_key:
            pid = entry.dagster_event.pid if entry.dagster_event else None
            outcomes[entry.step_key] = StepOutcomes(outcomes.get(entry.step_key, StepOutcomes()).count + 1, pid)
    return outcomes


def _text(value) -> str | None:
    if value is None:
        return None
    return str(getattr(value, "value", value))
