"""Why things happened in a bin/soak run: which chaos event explains a failed step, a step whose
user code ran twice, a Dagster retry, or a finished attempt dropped as lost."""

from __future__ import annotations

import re
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .soak_chaos import ChaosEvent
from .soak_fleet import tail
from .soak_logs import markers_of
from .soak_runs import RunProc


class Explainer:
    """Matches what the runs' event logs, the workers' logs and the ops' markers show against the
    chaos events (``t0``: the soak's start, for the ``+N s`` times of the report)."""

    def __init__(self, chaos: list[ChaosEvent], t0: float, markers: Path) -> None:
        self.chaos = chaos
        self.t0 = t0
        self.markers = markers

    # --- the chaos events ---------------------------------------------------------------------

    def kill_of(self, worker: str | None, incarnation: int | None = None, pid: int | None = None) -> ChaosEvent | None:
        for event in self.chaos:
            if event.kind != "kill" or (event.worker != worker and worker is not None):
                continue
            if incarnation is not None and event.incarnation == incarnation and event.worker == worker:
                return event
            if pid is not None and event.pid == pid:
                return event
        return None

    def chaos_near(self, ts: float, before: float = 40.0) -> list[ChaosEvent]:
        return [e for e in self.chaos if e.start - 2 <= ts and (e.end or e.start) >= ts - before]

    def kill_in(self, message: str) -> ChaosEvent | None:
        """The kill a health-check failure names ("worker W (host H, pid P) running step X stopped
        heartbeating N s ago"), matched by the worker's pid."""
        if re.search(r"running step \S+ stopped heartbeating", message):
            pid = re.search(r"pid (\d+)\)", message)
            if pid:
                return self.kill_of(None, pid=int(pid.group(1)))
        return None

    def describe_event(self, e: ChaosEvent) -> dict:
        d = {k: v for k, v in asdict(e).items() if v not in (None, [], "")}
        d["at"] = round(e.start - self.t0, 1)
        d["seconds"] = round((e.end or e.start) - e.start, 1)
        return d

    def killed_steps(self) -> None:
        """For each kill: the steps its incarnation had in user code (start marker, no end)."""
        open_starts: dict[tuple, dict] = {}
        for path in self.markers.glob("*.log"):
            for m in markers_of(self.markers, path.stem):
                key = (path.stem, m["step"], m["retry"], m["pid"])
                if m["what"] == "start":
                    open_starts[key] = m
                else:
                    open_starts.pop(key, None)
        for event in self.chaos:
            if event.kind == "kill":
                event.killed_steps = sorted(
                    f"{k[1]} (retry {k[2]}) of {k[0][:8]}"
                    for k, m in open_starts.items()
                    if m["worker"] == event.worker and m["incarnation"] == event.incarnation
                )

    # --- one run's findings -------------------------------------------------------------------

    def check_reruns(self, run: RunProc, run_id: str, markers: list[dict], retries: dict[str, int]) -> list[dict]:
        """Steps whose user code started more than once, and whether each extra start is allowed:
        only a Dagster retry (a higher retry number) after an attempt killed mid-step with its worker."""
        out = []
        by_step: dict[str, list[dict]] = defaultdict(list)
        for m in markers:
            by_step[m["step"]].append(m)
        for step, lines in by_step.items():
            starts = [m for m in lines if m["what"] == "start"]
            if len(starts) <= 1:
                continue
            reasons, allowed = [], True
            for i, start in enumerate(starts):
                ended = any(
                    m["what"] == "end" and m["retry"] == start["retry"] and m["pid"] == start["pid"] for m in lines
                )
                same_retry = [s for s in starts if s["retry"] == start["retry"]]
                if len(same_retry) > 1:
                    allowed = False
                    reasons.append(
                        f"retry number {start['retry']} started {len(same_retry)} times "
                        f"(pids {[s['pid'] for s in same_retry]})"
                    )
                    continue
                if i == len(starts) - 1:
                    continue
                kill = self.kill_of(start["worker"], start["incarnation"])
                # The attempt started before its killed worker's processes were gone (a step child may
                # enter user code in the moment between its worker's death and its own), and the
                # retry after the kill.
                if kill is None or not (start["ts"] <= kill.gone_at and kill.killed_at <= starts[i + 1]["ts"]):
                    allowed = False
                    reasons.append(
                        f"retry {start['retry']} on {start['worker']}#{start['incarnation']} "
                        f"{'ran to its end' if ended else 'did not end'}, its worker was not killed "
                        "while it ran, and yet it ran again"
                    )
                else:
                    # killed mid-step: in user code, or after it returned but before the step's result
                    # was in the event log (the step process dies with its worker either way)
                    where = "after its user code returned" if ended else "in its user code"
                    reasons.append(
                        f"retry {start['retry']} killed mid-step ({where}) by the SIGKILL of "
                        f"{start['worker']} at +{kill.start - self.t0:.1f} s"
                    )
            out.append(
                {
                    "seq": run.seq,
                    "run": run_id,
                    "step": step,
                    "starts": len(starts),
                    "allowed": allowed,
                    "why": "; ".join(dict.fromkeys(reasons)),
                }
            )
        return out

    def finished_called_lost(
        self, run: RunProc, run_id: str, events: list, markers: list[dict], dropped: dict
    ) -> list[dict]:
        """Redelivered messages of attempts whose outcome was already in the run's event log, dropped
        as "already started ... (lost)": the worker's log (and the note it writes in the run's own
        log) then say a finished step's worker was lost. Each attempt ends in one STEP_SUCCESS,
        STEP_FAILURE or STEP_UP_FOR_RETRY, so attempt N's outcome is the step's N-th of those."""
        out = []
        outcomes: dict[str, list[float]] = defaultdict(list)
        for r in events:
            if r.dagster_event.event_type.name in ("STEP_SUCCESS", "STEP_FAILURE", "STEP_UP_FOR_RETRY"):
                outcomes[r.dagster_event.step_key].append(r.timestamp)
        for (rid, step, attempt), items in dropped.items():
            if rid != run_id or len(outcomes[step]) < attempt:
                continue
            ended_at = sorted(outcomes[step])[attempt - 1]
            for item in items:
                if "(lost)" in item["why"] and ended_at <= (item["ts"] or 0):
                    notes = [
                        r
                        for r in events
                        if r.dagster_event.event_type.name == "ENGINE_EVENT"
                        and r.dagster_event.step_key == step
                        and "is not run again" in (r.dagster_event.message or "")
                    ]
                    out.append(
                        {
                            "seq": run.seq,
                            "run": run_id,
                            "step": step,
                            "attempt": attempt,
                            "ended_at": round(ended_at - self.t0, 1),
                            "dropped_at": round((item["ts"] or 0) - self.t0, 1),
                            "by": item["worker"],
                            "why": item["why"],
                            "run_log_says": [(r.dagster_event.message or "")[:300] for r in notes],
                        }
                    )
        return out

    def retries_not_by_kills(self, run: RunProc, run_id: str, events: list) -> list[dict]:
        """Dagster retries (STEP_UP_FOR_RETRY) not caused by a SIGKILL of the step's worker: none of
        the soak's ops fails by itself, so any other retry is a fault the soak did not inject
        (a worker wrongly taken for lost, say)."""
        out = []
        for record in events:
            event = record.dagster_event
            if event.event_type.name != "STEP_UP_FOR_RETRY":
                continue
            error = getattr(event.event_specific_data, "error", None)
            message = " ".join((error.message.strip() if error else event.message or "").splitlines())[:600]
            if self.kill_in(message) is None:
                out.append(
                    {
                        "seq": run.seq,
                        "run": run_id,
                        "step": event.step_key,
                        "error": message,
                        "at": round(record.timestamp - self.t0, 1),
                        "chaos": [self.describe_event(e) for e in self.chaos_near(record.timestamp)],
                    }
                )
        return out

    # --- failed runs --------------------------------------------------------------------------

    def explain_no_run(self, run: RunProc) -> dict:
        text = tail(Path(run.log), 15)
        near = self.chaos_near(run.start, before=5) + [
            e for e in self.chaos if run.start <= e.start <= (run.end or run.start)
        ]
        return {
            "seq": run.seq,
            "run": None,
            "job": run.job,
            "explained": False,
            "steps": [],
            "why": f"`dagster job execute` exited {run.exit_code} without creating a run; chaos at the time: "
            f"{[self.describe_event(e) for e in near]}; its output ends: {text[-1500:]}",
        }

    def explain_failure(
        self, run: RunProc, dagster_run: Any, events: list, markers: list[dict], retries: dict[str, int]
    ) -> dict:
        """Why a run failed: each failed step, its error, and the chaos event that caused it."""
        steps = [
            self._failed_step(record, events, markers, retries)
            for record in events
            if record.dagster_event.event_type.name == "STEP_FAILURE"
        ]
        explained_all = all(s["allowed"] for s in steps)
        if not steps:
            started_in_pause = self.start_in_sqs_pause(run, events)
            if started_in_pause is not None:
                return self._fail_fast(run, dagster_run, started_in_pause)
            explained_all, why = False, self._why_no_step_failed(run, dagster_run, events)
        elif dagster_run.status.value == "SUCCESS" and run.exit_code != 0:
            explained_all = False
            why = f"run succeeded but its orchestrator exited {run.exit_code}"
        else:
            why = "; ".join(f"{s['step']}: {s['error'][:200]}" for s in steps)
        return {
            "seq": run.seq,
            "run": dagster_run.run_id,
            "job": run.job,
            "status": dagster_run.status.value,
            "exit_code": run.exit_code,
            "steps": steps,
            "explained": explained_all,
            "why": why,
        }

    def _failed_step(self, record: Any, events: list, markers: list[dict], retries: dict[str, int]) -> dict:
        """A STEP_FAILURE, its error, and the kill that caused it (``allowed``) or the chaos near it."""
        event = record.dagster_event
        error = getattr(event.event_specific_data, "error", None)
        message = (error.message.strip() if error else event.message or "").splitlines()
        message = " ".join(message)[:600]
        step = event.step_key
        attempts = [m for m in markers if m["step"] == step and m["what"] == "start"]
        sent = sum(
            1
            for r in events
            if r.dagster_event.event_type.name == "STEP_WORKER_STARTING" and r.dagster_event.step_key == step
        )
        cause, explained = None, False
        kill = self.kill_in(message)
        if kill is not None:
            cause = self.describe_event(kill)
            # Allowed: no RetryPolicy, or every retry it allows was used up (each earlier attempt's
            # own kill is checked with every STEP_UP_FOR_RETRY, in retries_not_by_kills).
            explained = retries.get(step, 0) == 0 or sent > retries.get(step, 0)
            if not explained:
                cause["note"] = (
                    f"op has RetryPolicy(max_retries={retries.get(step, 0)}) but only {sent} attempt(s) were sent"
                )
        if cause is None:
            near = self.chaos_near(record.timestamp)
            cause = [self.describe_event(e) for e in near] or "no chaos event in the 40 s before"
        return {
            "step": step,
            "error": message,
            "attempts_with_user_code": len(attempts),
            "retry_policy": retries.get(step, 0),
            "caused_by": cause,
            "allowed": explained,
            "at": round(record.timestamp - self.t0, 1),
        }

    def _fail_fast(self, run: RunProc, dagster_run: Any, pause: dict) -> dict:
        # README, Failure modes: "the endpoint is unreachable at start: run fails within seconds"
        return {
            "seq": run.seq,
            "run": dagster_run.run_id,
            "job": run.job,
            "status": dagster_run.status.value,
            "exit_code": run.exit_code,
            "steps": [],
            "explained": True,
            "documented_fail_fast": True,
            "why": "its orchestrator connected to SQS while the endpoint was paused "
            f"(sqs_pause at +{pause['at']} s for {pause['seconds']} s): "
            '"cannot reach the SQS endpoint ... while connecting to SQS", before any step was sent '
            "(documented: a run whose endpoint is unreachable at start fails within seconds)",
        }

    def _why_no_step_failed(self, run: RunProc, dagster_run: Any, events: list) -> str:
        """A failed run without a failed step: its errors, the chaos during it, its output's end."""
        msgs = [
            f"{r.dagster_event.event_type.name}: {(r.dagster_event.message or '')[:400]}"
            for r in events
            if (
                r.dagster_event.event_type.name in ("RUN_FAILURE", "ENGINE_EVENT")
                and getattr(r.dagster_event.event_specific_data, "error", None) is not None
            )
            or r.dagster_event.event_type.name == "RUN_FAILURE"
        ]
        near = self.chaos_near(run.end or time.time(), before=run.end - run.start if run.end else 60)
        return (
            f"run {dagster_run.status.value} with no step failure; exit code {run.exit_code}"
            f"{' (timed out)' if run.timed_out else ''}; events: {msgs}; chaos during the run: "
            f"{[self.describe_event(e) for e in near]}; its output ends: {tail(Path(run.log), 8)[-1200:]}"
        )

    def start_in_sqs_pause(self, run: RunProc, events: list) -> dict | None:
        """The sqs_pause during which this run's executor failed to connect to SQS, if that is why it
        failed (its log's error is the executor's start-up connection, and no step was sent)."""
        if any(r.dagster_event.event_type.name == "STEP_WORKER_STARTING" for r in events):
            return None
        text = Path(run.log).read_text(errors="replace")
        if "cannot reach the SQS endpoint" not in text or "while connecting to SQS" not in text:
            return None
        failed_at = next((r.timestamp for r in events if r.dagster_event.event_type.name == "RUN_FAILURE"), run.end)
        for event in self.chaos:
            if event.kind == "sqs_pause" and event.start <= failed_at <= (event.end or failed_at) + 2:
                return self.describe_event(event)
        return None
