"""What a worker tells a launched run's instance when its run child stops other than by itself.

A run child (TaskiqRunLauncher) normally ends its run itself. Two cases are the worker's to say:

- **A time limit.** Celery's ``task_time_limit`` / ``task_soft_time_limit`` bound every Celery task,
  dagster-celery's run task included; here a run's message carries its limits
  (``wire/time_limits.limits_for_run``: its tags, else the launcher's ``config_source``) and
  ``request.Request`` supervises the run child with them as it does a step child. The run is
  failed with one sentence naming the limit, as Dagster's run monitoring fails a run past its
  ``dagster/max_runtime``: at the soft limit before the child is interrupted (Dagster then stops
  its steps and notes that the run had already failed), at the hard limit after it was killed.
- **A kill while canceling.** A run process stopped on a terminate ends its run CANCELED itself;
  one killed before it could would leave the run CANCELING.
"""

from __future__ import annotations

import logging
from typing import Any

from dagster import DagsterRunStatus

from dagster_taskiq_sync.wire.time_limits import HARD, Limit

log = logging.getLogger("dagster_taskiq_sync.worker")


def fail_run(instance: Any, run_id: str, limit: Limit, worker: str) -> str:
    """Fail run ``run_id``, which ``limit`` stopped, naming the limit; a run that already ended
    only gets the sentence in its log. Returns the sentence; never raises (the message must still
    settle, and the run's process is stopped all the same)."""
    sentence = limit.run_stopped(run_id)
    try:
        run = instance.get_run_by_id(run_id)
        if run is None:
            return sentence
        if run.is_finished:
            instance.report_engine_event(sentence, run)
        else:
            instance.report_run_failed(run, message=sentence)
    except Exception as exc:  # noqa: BLE001 - see the docstring
        log.warning("worker %s: could not fail run %s (%s): %s: %s", worker, run_id, sentence, type(exc).__name__, exc)
    return sentence


def run_child_ended(instance: Any, run_id: str, worker: str, kill_reason: str | None, limit: Limit | None) -> None:
    """After a run child ended: a killed run left CANCELING is ended CANCELED, one killed at its
    hard time limit is failed naming it. Never raises."""
    try:
        run = instance.get_run_by_id(run_id)
        if kill_reason and run is not None and run.status == DagsterRunStatus.CANCELING:
            instance.report_run_canceled(run, message=f"Run process stopped by worker {worker}: {kill_reason}.")
        elif limit is not None and limit.kind == HARD:
            fail_run(instance, run_id, limit, worker)
    except Exception as exc:  # noqa: BLE001 - a failed run update must not stop the message from settling
        log.warning("worker %s: could not read or update run %s: %s", worker, run_id, exc)
