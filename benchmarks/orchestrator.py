"""One contender's orchestrating process for bin/bench.

Each contender gets its own long-lived process, so one executor's leftovers (a Celery app and its
threads, a broker client) cannot slow another's runs, and no run pays for interpreter start-up or
imports. It reads one JSON request per line on stdin and answers one JSON line on stdout::

    {"workload": "chain-20", "run_config": {...}}  ->  {"wall": 1.23, "run_id": "...", "segments": {...}}

Each run is ``execute_job`` on a reconstructable job, timed from the call to its return. The runs
of ``runs-R-chain-N`` (see ``jobs.workload_spec``) run each in its own thread of this process.
Of ``backfill-N+chain-M``, the interactive chain runs in a second, long-lived process of the same
kind (:class:`RunProcess`, warmed by one untimed run of that job when it starts): in a Dagster
deployment every run has its own run worker process, so a backfill's orchestration never holds
the GIL an interactive run's orchestration waits for; here it would, and that cost is the
bench's, not any contender's. The backfill's run carries ``dagster/backfill`` as Dagster's
backfill daemon tags the runs it launches. ``wall`` is from the first start to the last end
(``perf_counter``: the machine's monotonic clock, the same in every process), and ``walls`` has
each run's own time.
The answer also has this process's CPU seconds over the runs (``cpu``: its own threads, and its
reaped children: multiprocess_executor's step processes). For taskiq runs it includes the
per-step latency breakdown (labels in ``bench_plan.SEGMENTS``) and each step message's size.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
import uuid

SEGMENTS = (
    "ready_to_sent",
    "sent_to_received",
    "received_to_child",
    "child_to_start",
    "start_to_finish",
    "finish_to_seen",
)
_SEEN_AT: dict[tuple[str, str], float] = {}
_SENT_AT: dict[tuple[str, str], float] = {}


class _StepMarks(logging.Handler):
    """Keeps the sent_at / seen_at marks the package's sender and executor put on their DEBUG
    records, and passes every other record at WARNING or above on to stderr as before."""

    def emit(self, record: logging.LogRecord) -> None:
        key = (getattr(record, "run_id", None), getattr(record, "step_key", None))
        if hasattr(record, "sent_at"):
            _SENT_AT[key] = record.sent_at
        elif hasattr(record, "seen_at"):
            _SEEN_AT.setdefault(key, record.seen_at)
        elif record.levelno >= logging.WARNING:
            sys.stderr.write(self.format(record) + "\n")


def instrument_taskiq() -> None:
    """Note when the sender has each step on SQS and when the orchestrator reads each step's
    result: the first and last links of a step's latency, which no event records. Both are DEBUG
    records of the package's own loggers (no hooks, no monkeypatching)."""
    handler = _StepMarks()
    for name in ("dagster_taskiq_sync.sender", "dagster_taskiq_sync.executor"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.DEBUG)
        logger.addHandler(handler)
        logger.propagate = False  # the DEBUG records stay here; the handler prints warnings itself


def step_segments(
    instance, run_id: str, payload_bytes: list[int] | None = None, span: tuple[float, float] | None = None
) -> dict[str, list[float]]:
    """Seconds spent in each link of each step's path, from the run's event log and the marks
    above; appends each step message's payload size to ``payload_bytes``."""
    from dagster import DagsterEventType

    marks: dict[str, dict[str, float]] = {}
    for record in instance.all_logs(run_id):
        event = record.dagster_event
        if event is None or not event.step_key:
            continue
        mark = marks.setdefault(event.step_key, {})
        kind = event.event_type
        if kind == DagsterEventType.STEP_WORKER_STARTING:
            metadata = event.event_specific_data.metadata
            launch_ms = float(metadata["launch_ms"].value)
            mark["ready"] = record.timestamp - launch_ms / 1000
            if payload_bytes is not None and "payload_bytes" in metadata:
                payload_bytes.append(int(metadata["payload_bytes"].value))
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
            for name, a, b in zip(SEGMENTS, order, order[1:], strict=False):
                segments[name].append(mark[b] - mark[a])
    if span is not None and marks:  # the run's own start and end around its steps (wall clock)
        readies = [m["ready"] for m in marks.values() if "ready" in m]
        seens = [m["seen"] for m in marks.values() if "seen" in m]
        if readies and seens:
            segments["run_start"] = [min(readies) - span[0]]
            segments["run_end"] = [span[1] - max(seens)]
    return segments


def no_logging_reconfiguration(instance) -> None:
    """Let runs share this process's threads without deadlocking.

    Dagster builds each run's log manager with ``instance.get_yaml_python_handlers()``, which,
    whenever dagster.yaml has any setting (the bench's has ``telemetry``), calls
    ``logging.config.dictConfig``: that takes the logging module's lock and then closes every
    handler in the process, while another run's thread holds its handler's lock and waits for
    the module's lock (seen as a hang of runs-3-chain-3). With no ``python_logs`` handlers
    configured the call always returns ``[]``, so it is skipped here; every contender's
    orchestrator gets the same.
    """
    if not instance.get_python_log_dagster_handler_config():
        instance.get_yaml_python_handlers = lambda: []


class RunProcess:
    """A second orchestrating process (this module, started by :class:`Runner`) that runs one job
    at a time when asked: ``{"execute": job, "run_config": ..., "tags": ...}`` -> what
    :meth:`Runner.execute` returns, with that run's step segments and this process's CPU seconds."""

    def __init__(self, contender: str, home: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.orchestrator", contender, home],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )  # stderr: this process's, the contender's log
        self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the second orchestrating process ended (exit code {self.proc.poll()})")
        return json.loads(line)

    def execute(self, job: str, run_config: dict, tags: dict[str, str] | None = None) -> dict:
        self.proc.stdin.write(json.dumps({"execute": job, "run_config": run_config, "tags": tags}) + "\n")
        self.proc.stdin.flush()
        answer = self._read()
        if "error" in answer:
            raise RuntimeError(answer["error"])
        return answer

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(60)


class Runner:
    """Runs one workload's runs in this process (a backfill's interactive run in a second one) and
    times them."""

    def __init__(self, contender: str, instance, home: str = "") -> None:
        self.contender = contender
        self.instance = instance
        self.home = home
        self.second: RunProcess | None = None
        self.side_segments: dict[str, dict[str, list[float]]] = {}  # run id -> segments of a second-process run
        self.side_cpu = 0.0

    def execute(self, job: str, run_config: dict, tags: dict[str, str] | None = None) -> dict:
        from dagster import execute_job

        from .jobs import reconstructable_job

        profile_dir = os.environ.get("BENCH_PROFILE_DIR")  # cProfile of each run's orchestrating thread
        profiler = None
        if profile_dir:
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
        started, wall_started = time.perf_counter(), time.time()
        result = execute_job(
            reconstructable_job(job, self.contender),
            instance=self.instance,
            run_config=run_config,
            raise_on_error=False,
            tags=tags,
        )
        ended, wall_ended = time.perf_counter(), time.time()
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(os.path.join(profile_dir, f"{self.contender}-{job}-{result.run_id[:8]}.prof"))
        return {
            "job": job,
            "run_id": result.run_id,
            "success": result.success,
            "start": started,
            "end": ended,
            "span": (wall_started, wall_ended),
        }

    def in_threads(self, calls: list[tuple], barrier: threading.Barrier | None = None) -> list[threading.Thread]:
        """Start ``execute(*call)`` for each call in its own thread; results land in ``self.results``."""
        threads = []
        for index, call in enumerate(calls):

            def target(index=index, call=call):
                try:
                    if barrier is not None:
                        barrier.wait()
                    self.results[index] = self.execute(*call)
                except BaseException:
                    self.results[index] = {"error": traceback.format_exc()}

            thread = threading.Thread(target=target, name=f"run-{index}", daemon=True)
            thread.start()
            threads.append(thread)
        return threads

    def run(self, workload: str, run_config: dict) -> dict:
        from .jobs import workload_spec

        spec = workload_spec(workload)
        self.results: dict[int, dict] = {}
        extra: dict = {}
        before = os.times()
        if spec.kind == "single":
            self.results[0] = self.execute(spec.jobs[0], run_config)
        elif spec.kind == "runs":
            # Submitted at once: every run's thread is released by one barrier.
            barrier = threading.Barrier(spec.count)
            for thread in self.in_threads([(spec.jobs[0], run_config)] * spec.count, barrier):
                thread.join()
        else:
            extra = self.backfill(spec, run_config)
        after = os.times()
        side_cpu, self.side_cpu = self.side_cpu, 0.0
        errors = [r["error"] for r in self.results.values() if "error" in r]
        if errors:
            raise RuntimeError(errors[0])
        runs = [self.results[i] for i in sorted(self.results)]
        start, end = min(r["start"] for r in runs), max(r["end"] for r in runs)
        failed = [r for r in runs if not r["success"]]
        answer = {
            "wall": end - start,
            "walls": [r["end"] - r["start"] for r in runs],
            "run_ids": [r["run_id"] for r in runs],
            "spans": [r["span"] for r in runs],
            "run_id": (failed or runs)[0]["run_id"],
            "success": not failed,
            "cpu": {
                "self": (after.user - before.user) + (after.system - before.system) + side_cpu,
                "children": (after.children_user - before.children_user)
                + (after.children_system - before.children_system),
            },
            **extra,
        }
        return answer

    def backfill(self, spec, run_config: dict) -> dict:
        """The fan-out run (backfill) first; once its fan-out is in flight (root done and 5% of
        its branches started), the chain run (interactive), timed on its own."""
        from dagster import DagsterEventType, RunsFilter

        big, small = spec.jobs
        token = uuid.uuid4().hex
        if self.second is None:
            self.second = RunProcess(self.contender, self.home)
            # Untimed: a process's first run pays for imports and loading the job, as the warm-up
            # paid for this one.
            self.second.execute(small, run_config)
        # Tagged as Dagster's backfill daemon tags the runs it launches.
        (thread,) = self.in_threads([(big, run_config, {"bench/request": token, "dagster/backfill": token[:8]})])
        branches = int(big.split("-")[1])
        wanted = 1 + math.ceil(branches / 20)  # STEP_STARTs: root and 5% of the branches
        big_run_id, started = None, 0
        while thread.is_alive():
            if big_run_id is None:
                runs = self.instance.get_runs(filters=RunsFilter(tags={"bench/request": token}), limit=1)
                big_run_id = runs[0].run_id if runs else None
            if big_run_id is not None:
                started = len(
                    self.instance.get_records_for_run(
                        big_run_id, of_type=DagsterEventType.STEP_START, limit=wanted
                    ).records
                )
                if started >= wanted:
                    break
            time.sleep(0.1)
        in_flight = started >= wanted
        done_at_start = self._steps_done(big_run_id)
        answer = self.second.execute(small, run_config)
        self.side_segments[answer["run_id"]] = answer.pop("segments", {})
        self.side_cpu += answer.pop("cpu", 0.0)
        self.results[1] = answer
        done_at_end = self._steps_done(big_run_id)
        thread.join()
        return {
            "backfill": {
                "big_steps_started_when_small_started": started,
                "big_steps_done_when_small_started": done_at_start,
                "big_steps_done_when_small_ended": done_at_end,
                # False: the backfill ended before its fan-out was seen in flight; the small run ran alone
                "small_started_during_backfill": in_flight,
            }
        }

    def _steps_done(self, run_id: str | None) -> int | None:
        if run_id is None:
            return None
        return self.instance.get_run_stats(run_id).steps_succeeded


def main() -> int:
    contender, home = sys.argv[1], sys.argv[2]
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID`: every thread's stack, in the log
    # Started from a shell's background job (`bin/bench ... &`), this process inherits SIGINT
    # ignored, and Dagster maps SIGTERM to SIGINT's handler: SIGTERM would be ignored as well, and so
    # by the `tail -F` processes of in-process compute-log capture, which Dagster stops with SIGTERM
    # and then waits up to 30 s for (measured: in_process's fanout-300 took 73 s instead of 10 s).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # The answers go on the real stdout; everything else (Dagster's and Celery's chatter) to stderr.
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    logging.getLogger("dagster").setLevel(logging.WARNING)

    from dagster import DagsterInstance

    if contender.startswith("taskiq"):  # both taskiq contenders' orchestrators do the same work
        instrument_taskiq()
    instance = DagsterInstance.from_config(home)
    no_logging_reconfiguration(instance)
    runner = Runner(contender, instance, home)
    print(json.dumps({"ready": True}), file=answers)
    for line in sys.stdin:
        request = json.loads(line)
        try:
            run_config = request["run_config"] | {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
            if "execute" in request:  # this is a RunProcess: one run, timed, with its segments
                before = os.times()
                answer = runner.execute(request["execute"], run_config, request.get("tags"))
                after = os.times()
                answer["cpu"] = (after.user - before.user) + (after.system - before.system)
                if contender == "taskiq":
                    answer["segments"] = step_segments(instance, answer["run_id"], span=answer["span"])
            else:
                answer = runner.run(request["workload"], run_config)
            if contender == "taskiq" and "execute" not in request:
                segments: dict[str, list[float]] = {name: [] for name in SEGMENTS}
                payload_bytes: list[int] = []
                for run_id, span in zip(answer["run_ids"], answer.pop("spans"), strict=True):
                    side = runner.side_segments.pop(run_id, None)
                    if side is not None:  # the interactive run of a backfill workload: its own row
                        answer["interactive_segments"] = side
                        continue
                    for name, values in step_segments(instance, run_id, payload_bytes, span).items():
                        segments.setdefault(name, []).extend(values)
                answer["segments"], answer["payload_bytes"] = segments, payload_bytes
        except Exception:
            answer = {"error": traceback.format_exc()}
        print(json.dumps(answer), file=answers)
    if runner.second is not None:
        runner.second.close()
    instance.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
