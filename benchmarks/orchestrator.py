"""One contender's orchestrating process for bin/bench.

Each contender gets its own long-lived process, so one executor's leftovers (a Celery app and its
threads, a broker client) cannot slow another's runs, and no run pays for interpreter start-up or
imports. It reads one JSON request per line on stdin and answers one JSON line on stdout::

    {"workload": "chain-20", "run_config": {...}}  ->  {"wall": 1.23, "run_id": "...", "segments": {...}}

Each run is ``execute_job`` on a reconstructable job, timed from the call to its return.
For taskiq runs the answer includes the per-step latency breakdown (labels in ``bench.SEGMENTS``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback

SEGMENTS = ("ready_to_sent", "sent_to_received", "received_to_child", "child_to_start", "start_to_finish",
            "finish_to_seen")
_SEEN_AT: dict[tuple[str, str], float] = {}
_SENT_AT: dict[tuple[str, str], float] = {}


def instrument_taskiq() -> None:
    """Note when the sender has each step on SQS and when the orchestrator reads each step's
    result: the first and last links of a step's latency, which no event records. Uses the
    package's observer hooks (no monkeypatching)."""
    from dagster_taskiq_sync.executor import observe_results
    from dagster_taskiq_sync.sender import observe_sends

    observe_sends(lambda item, at: _SENT_AT.__setitem__((item.run_id, item.step_key), at))
    observe_results(lambda run_id, step_key, at: _SEEN_AT.setdefault((run_id, step_key), at))


def step_segments(instance, run_id: str) -> dict[str, list[float]]:
    """Seconds spent in each link of each step's path, from the run's event log and the marks above."""
    from dagster import DagsterEventType

    marks: dict[str, dict[str, float]] = {}
    for record in instance.all_logs(run_id):
        event = record.dagster_event
        if event is None or not event.step_key:
            continue
        mark = marks.setdefault(event.step_key, {})
        kind = event.event_type
        if kind == DagsterEventType.STEP_WORKER_STARTING:
            launch_ms = float(event.event_specific_data.metadata["launch_ms"].value)
            mark["ready"] = record.timestamp - launch_ms / 1000
        elif kind == DagsterEventType.STEP_WORKER_STARTED and "picked up by worker" in (event.message or ""):
            mark["received"] = float(event.event_specific_data.metadata["received_at"].value)
            mark["child"] = record.timestamp
        elif kind == DagsterEventType.STEP_START:
            mark["start"] = record.timestamp
        elif kind == DagsterEventType.STEP_SUCCESS:
            mark["finish"] = record.timestamp
    segments: dict[str, list[float]] = {name: [] for name in SEGMENTS}
    order = ("ready", "sent", "received", "child", "start", "finish", "seen")
    for step_key, mark in marks.items():
        if (run_id, step_key) in _SENT_AT:
            mark["sent"] = _SENT_AT[(run_id, step_key)]
        if (run_id, step_key) in _SEEN_AT:
            mark["seen"] = _SEEN_AT[(run_id, step_key)]
        if all(k in mark for k in order):
            for name, a, b in zip(SEGMENTS, order, order[1:]):
                segments[name].append(mark[b] - mark[a])
    return segments


def main() -> int:
    contender, home = sys.argv[1], sys.argv[2]
    # The answers go on the real stdout; everything else (Dagster's and Celery's chatter) to stderr.
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    logging.getLogger("dagster").setLevel(logging.WARNING)

    from dagster import DagsterInstance, execute_job

    from .jobs import reconstructable_job

    if contender == "taskiq":
        instrument_taskiq()
    instance = DagsterInstance.from_config(home)
    print(json.dumps({"ready": True}), file=answers)
    for line in sys.stdin:
        request = json.loads(line)
        try:
            run_config = request["run_config"] | {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
            started = time.perf_counter()
            result = execute_job(reconstructable_job(request["workload"], contender), instance=instance,
                                 run_config=run_config, raise_on_error=False)
            wall = time.perf_counter() - started
            answer = {"wall": wall, "run_id": result.run_id, "success": result.success}
            if contender == "taskiq":
                answer["segments"] = step_segments(instance, result.run_id)
        except Exception:  # noqa: BLE001 - reported to the bench, which stops
            answer = {"error": traceback.format_exc()}
        print(json.dumps(answer), file=answers)
    instance.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
