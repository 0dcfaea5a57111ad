"""bin/soak's checks at the end: every run's event log against the workers' logs, the ops' markers
and the chaos events; what is left on the queues and in the key-value store; the longest stall.
Each finding that is not allowed is a violation; everything goes into soak.json."""

from __future__ import annotations

import argparse
import itertools
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .soak_chaos import PG_DOWN, SQS_PAUSE, ChaosEvent
from .soak_explain import Explainer
from .soak_fleet import (
    CONCURRENCY,
    EXECUTOR,
    HEARTBEAT,
    MAX_RECEIVE,
    QUEUES,
    VISIBILITY,
    WAIT_TIME,
    Fleet,
    Violations,
)
from .soak_logs import drop_reasons, markers_of, worker_logs
from .soak_runs import RunProc

# DagsterEventType names (their values are the legacy PIPELINE_* strings)
PROGRESS = (
    "STEP_START",
    "STEP_SUCCESS",
    "STEP_FAILURE",
    "STEP_UP_FOR_RETRY",
    "STEP_RESTARTED",
    "RUN_START",
    "RUN_SUCCESS",
    "RUN_FAILURE",
    "RUN_CANCELED",
)
RUN_END = ("RUN_SUCCESS", "RUN_FAILURE", "RUN_CANCELED")


@dataclass
class Tally:
    """What the walk over every run's event log found."""

    runs_out: list[dict] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)
    reruns: list[dict] = field(default_factory=list)
    progress: list[float] = field(default_factory=list)  # timestamps of step and run progress
    pending: list[tuple[float, float]] = field(default_factory=list)  # (start, end) of each run
    lost: list[dict] = field(default_factory=list)
    misleading: list[dict] = field(default_factory=list)  # finished attempts dropped as lost
    odd_retries: list[dict] = field(default_factory=list)  # retries not caused by a kill
    sent_attempts: int = 0
    ran: int = 0
    dropped_only: int = 0
    failed_run_only: int = 0
    step_attempts: int = 0


class Analysis:
    def __init__(
        self,
        opts: argparse.Namespace,
        fleet: Fleet,
        runs: list[RunProc],
        chaos: list[ChaosEvent],
        violations: Violations,
        explain: Explainer,
    ) -> None:
        self.opts = opts
        self.fleet = fleet
        self.runs = runs
        self.chaos = chaos
        self.violations = violations
        self.explain = explain

    def analyse(
        self, started: float, stream_end: float, drained: float | None, queues: dict, stops: dict, rows: dict
    ) -> dict:
        from dagster import DagsterInstance

        logs = worker_logs([slot.log for slot in self.fleet.slots.values()])
        self.explain.killed_steps()
        by_seq: dict[int, Any] = {}
        tally = Tally()
        with DagsterInstance.from_config(str(self.fleet.home)) as instance:
            for record in instance.get_runs():
                seq = record.tags.get("soak/seq")
                if seq is not None:
                    by_seq[int(seq)] = record
            for run in self.runs:
                self._walk(instance, run, by_seq.get(run.seq), logs, tally)
        for item in tally.lost:
            self.violations.add(
                "lost",
                f"step {item['step']} (attempt {item['attempt']}) of run #{item['seq']} "
                f"{item['run']} was sent but no worker started or dropped it, and its run succeeded",
                **item,
            )
        stall = self._stall(tally)
        self._check_queues(queues, logs["never"])
        self._check_findings(tally, rows)
        return self._result(started, stream_end, drained, queues, stops, rows, logs, tally, stall)

    # --- one run ------------------------------------------------------------------------------

    def _walk(self, instance: Any, run: RunProc, dagster_run: Any, logs: dict, tally: Tally) -> None:
        """One run of the stream: its progress, its messages, and its findings."""
        from .soak_jobs import RETRIES

        tally.runs_out.append(
            {
                "seq": run.seq,
                "job": run.job,
                "exit_code": run.exit_code,
                "timed_out": run.timed_out,
                "wall": round(run.end - run.start, 1),
                "run_id": dagster_run.run_id if dagster_run else None,
                "status": dagster_run.status.value if dagster_run else "NO RUN",
            }
        )
        if dagster_run is None:
            tally.failures.append(self.explain.explain_no_run(run))
            return
        run_id = dagster_run.run_id
        events = [r for r in instance.all_logs(run_id) if r.dagster_event is not None]
        run_start = next((r.timestamp for r in events if r.dagster_event.event_type.name == "RUN_START"), None)
        run_end = next((r.timestamp for r in events if r.dagster_event.event_type.name in RUN_END), None)
        if run_start is not None:
            tally.pending.append((run_start, run_end or time.time()))
        tally.progress.extend(r.timestamp for r in events if r.dagster_event.event_type.name in PROGRESS)
        markers = markers_of(self.explain.markers, run_id)
        failed = dagster_run.status.value != "SUCCESS"
        self._count_messages(run, run_id, events, failed, logs, tally)
        tally.reruns.extend(self.explain.check_reruns(run, run_id, markers, RETRIES))
        tally.misleading.extend(self.explain.finished_called_lost(run, run_id, events, markers, logs["dropped"]))
        tally.odd_retries.extend(self.explain.retries_not_by_kills(run, run_id, events))
        if failed or run.exit_code != 0:
            tally.failures.append(self.explain.explain_failure(run, dagster_run, events, markers, RETRIES))

    def _count_messages(self, run: RunProc, run_id: str, events: list, failed: bool, logs: dict, tally: Tally) -> None:
        """Every attempt sent was started, dropped with a reason, or belongs to a failed run."""
        from dagster import DagsterEventType

        sent = [
            (r.dagster_event.step_key, int(r.dagster_event.event_specific_data.metadata["attempt"].value))
            for r in events
            if r.dagster_event.event_type == DagsterEventType.STEP_WORKER_STARTING
        ]
        tally.step_attempts += len(sent)
        for step_key, attempt in sent:
            tally.sent_attempts += 1
            key = (run_id, step_key, attempt)
            if logs["started"].get(key):
                tally.ran += 1
            elif logs["dropped"].get(key):
                tally.dropped_only += 1
            elif failed:
                tally.failed_run_only += 1
            else:
                tally.lost.append({"run": run_id, "seq": run.seq, "step": step_key, "attempt": attempt})
            if len(logs["started"].get(key, [])) > 1:
                self.violations.add(
                    "double-start",
                    f"step {step_key} (attempt {attempt}) of run {run_id} was "
                    f"started {len(logs['started'][key])} times: {logs['started'][key]}",
                    run=run_id,
                    step=step_key,
                )

    # --- the whole soak -----------------------------------------------------------------------

    def _stall(self, tally: Tally) -> dict | None:
        stall = longest_stall(sorted(tally.progress), tally.pending)
        if stall:
            stall["chaos"] = [
                self.explain.describe_event(e)
                for e in self.chaos
                if e.start <= stall["to"] and (e.end or e.start) >= stall["from"] - 30
            ]
            if stall["seconds"] > self.opts.stall_limit:
                self.violations.add(
                    "stall",
                    f"no step made progress for {stall['seconds']:.0f} s "
                    f"(limit {self.opts.stall_limit:g} s) while runs were pending",
                    **stall,
                )
        return stall

    def _check_queues(self, queues: dict, never: list[dict]) -> None:
        for name in QUEUES:
            if queues[name] != (0, 0):
                self.violations.add(
                    "queue-not-empty",
                    f"queue {name} still holds {queues[name][0]} visible and "
                    f"{queues[name][1]} in-flight messages at the end",
                    messages=self.fleet.peek(name),
                )
            dlq = f"{name}-dlq"
            if queues[dlq] != (0, 0):
                self.violations.add(
                    "dead-letter",
                    f"dead-letter queue {dlq} holds {sum(queues[dlq])} message(s)",
                    messages=self.fleet.peek(dlq),
                )
        for item in never:
            self.violations.add(
                "dead-letter",
                f"worker {item['worker']} dead-lettered message {item['message']} on {item['queue']}: {item['why']}",
                **item,
            )

    def _check_findings(self, tally: Tally, rows: dict) -> None:
        leftover = len(rows["per_attempt_rows"])
        if leftover > len(self.runs):
            self.violations.add(
                "state",
                f"{leftover} per-step-attempt rows left in the key-value store after "
                f"{len(self.runs)} runs ({tally.step_attempts} step attempts): not O(runs)",
            )
        for item in tally.odd_retries:
            self.violations.add(
                "retry",
                f"step {item['step']} of run #{item['seq']} was retried at +{item['at']} s "
                f"without its worker being killed: {item['error']}",
                **item,
            )
        for item in tally.misleading:
            self.violations.add(
                "called-lost",
                f"step {item['step']} (attempt {item['attempt']}) of run #{item['seq']} "
                f"had its outcome in the event log at +{item['ended_at']} s, yet its "
                f"redelivered message was dropped as lost at +{item['dropped_at']} s: "
                f"{item['why']}",
                **item,
            )
        for failure in tally.failures:
            if not failure["explained"]:
                self.violations.add(
                    "failure",
                    f"run #{failure['seq']} failed without an allowed cause: {failure['why']}",
                    seq=failure["seq"],
                )
        for item in tally.reruns:
            if not item["allowed"]:
                self.violations.add(
                    "ran-twice",
                    f"step {item['step']} of run #{item['seq']} ran user code {item['starts']} times: {item['why']}",
                    **item,
                )

    # --- soak.json ----------------------------------------------------------------------------

    def _result(
        self,
        started: float,
        stream_end: float,
        drained: float | None,
        queues: dict,
        stops: dict,
        rows: dict,
        logs: dict,
        tally: Tally,
        stall: dict | None,
    ) -> dict:
        statuses = Counter(r["status"] for r in tally.runs_out)
        chaos_counts = Counter(e.kind for e in self.chaos)
        return {
            "seed": self.opts.seed,
            "quick": self.opts.quick,
            "duration_minutes": self.opts.duration,
            "runs_at_once": self.opts.runs_at_once,
            "soak_seconds": round(stream_end - started, 1),
            "workers": {
                name: {
                    "queues": list(s.queues),
                    "concurrency": CONCURRENCY,
                    "incarnations": s.incarnation,
                    "exit_code_on_sigterm": stops.get(name),
                }
                for name, s in self.fleet.slots.items()
            },
            "settings": self._settings(),
            "runs": {
                "started": len(self.runs),
                "succeeded": statuses.get("SUCCESS", 0),
                "failed": len(self.runs) - statuses.get("SUCCESS", 0),
                "by_job": dict(Counter(r["job"] for r in tally.runs_out)),
                "statuses": dict(statuses),
            },
            "failures": tally.failures,
            "step_attempts_sent": tally.sent_attempts,
            "messages": self._messages(tally, logs, queues, drained),
            "reruns": tally.reruns,
            "finished_attempts_called_lost": tally.misleading,
            "retries_not_by_kills": tally.odd_retries,
            "dead_lettered": sum(sum(queues[f"{q}-dlq"]) for q in QUEUES),
            "longest_stall": stall,
            "state_rows": rows,
            "chaos": {"counts": dict(chaos_counts), "events": [self.explain.describe_event(e) for e in self.chaos]},
            "violations": self.violations.items,
            "runs_list": tally.runs_out,
            "workdir": str(self.fleet.workdir),
        }

    def _settings(self) -> dict[str, Any]:
        return {
            **EXECUTOR,
            "visibility_timeout": VISIBILITY,
            "wait_time_seconds": WAIT_TIME,
            "heartbeat_interval": HEARTBEAT,
            "max_receive_count": MAX_RECEIVE,
            "sqs_pause": SQS_PAUSE,
            "pg_down": list(PG_DOWN),
            "chaos_gap": list(self.opts.chaos_gap),
            "stall_limit": self.opts.stall_limit,
            "run_timeout": self.opts.run_timeout,
        }

    @staticmethod
    def _messages(tally: Tally, logs: dict, queues: dict, drained: float | None) -> dict[str, Any]:
        return {
            "sent": tally.sent_attempts,
            "started": tally.ran,
            "dropped_with_reason": tally.dropped_only,
            "of_failed_runs_only": tally.failed_run_only,
            "lost": len(tally.lost),
            "lost_list": tally.lost,
            "drops_by_reason": drop_reasons(logs["dropped"]),
            "releases_by_reason": dict(logs["releases"]),
            "queues_at_end": {k: list(v) for k, v in queues.items()},
            "drained_after_seconds": None if drained is None else round(drained, 1),
        }


def longest_stall(progress: list[float], pending: list[tuple[float, float]]) -> dict | None:
    """The longest gap between two progress events during which some run was pending."""
    best = None
    for a, b in itertools.pairwise(progress):
        if any(s <= a and b <= e for s, e in pending) and (best is None or b - a > best["seconds"]):
            best = {"seconds": round(b - a, 1), "from": a, "to": b}
    return best
