"""bin/soak: a chaos soak of taskiq_executor and its workers.

A stream of runs (``soak_fanout``: 1 -> 8 -> 1 and ``soak_chain``: 6 in a row, on two queues, some
ops with a ``RetryPolicy``; see ``benchmarks/soak_jobs.py``), each its own ``dagster job execute``
process (several at once), against two ``dagster-taskiq-sync worker start -c 2`` processes (one
serving both queues, one serving the first), all on a PostgreSQL instance (dagster-postgres) and
a local SQS endpoint (moto) reached through a TCP proxy that can be paused. Meanwhile a chaos loop,
at random intervals (``--seed`` makes them reproducible), does one of:

* ``kill``: SIGKILL a random worker process, check that its step processes die with it, and start
  it again 1-2 s later, as a supervisor would;
* ``sqs_pause``: cut the SQS endpoint (the proxy every worker and orchestrator use) for 10 s;
* ``pg_restart``: restart PostgreSQL (fast shutdown: sessions are terminated).

At the end it checks and reports (``soak.md`` and ``soak.json`` in ``--out``):

* runs started / succeeded / failed, each failure explained (its step, its error message and the
  chaos event that caused it). Allowed: a step whose worker was SIGKILLed mid-step and which has
  no RetryPolicy (or used up its retries that way); a run whose orchestrator started while SQS was
  paused and failed connecting to it, before sending anything (README, Failure modes: "the
  endpoint is unreachable at start: run fails within seconds"). Anything else is a violation;
* steps whose user code ran more than once (from the ops' start/end markers); only a retry after
  a SIGKILL mid-step is allowed, and every Dagster retry (STEP_UP_FOR_RETRY) must be such a kill's
  (none of the ops fails by itself);
* redelivered messages of attempts whose outcome was already in the event log must not be
  reported as lost (in the worker's log and the run's);
* messages lost: every step message sent (STEP_WORKER_STARTING in the run's event log) either
  started on a worker, was dropped with a reason (workers' logs), or belongs to a failed run; the
  queues are empty at the end;
* messages in the dead-letter queues (must be 0);
* the longest stall (longest time no step made progress while runs were pending);
* the rows left under ``dagster-taskiq-sync/`` in the instance's key-value store, by kind (must be
  O(runs), not O(step attempts));
* workers that did not come back, exited by themselves, or left step processes behind.

It exits 1 on any violation, 0 otherwise. Everything binds to 127.0.0.1 and dies with this process
(PR_SET_PDEATHSIG, process groups).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .services import BIN, ROOT, ServiceError, Services

CLI = str(BIN / "dagster-taskiq-sync")
DAGSTER = str(BIN / "dagster")
JOBS_FILE = ROOT / "benchmarks" / "soak_jobs.py"
QUEUES = ("soak_a", "soak_b")
# name -> queues; one worker serves both queues, one serves only the first
WORKERS = {"soak-1": ("soak_a", "soak_b"), "soak-2": ("soak_a",)}
CONCURRENCY = 2
HEARTBEAT = 2  # --heartbeat-interval: worker_lost_timeout (10) is 5 heartbeats
EXECUTOR = {"health_check_interval": 1, "worker_lost_timeout": 10}
VISIBILITY = 10
WAIT_TIME = 1
MAX_RECEIVE = 5
SQS_PAUSE = 10.0
PG_DOWN = (2.0, 8.0)  # seconds PostgreSQL stays down in a restart
CHAOS_KINDS = ("kill", "sqs_pause", "pg_restart")
ORPHAN_GRACE = 15.0  # seconds a killed worker's step processes get to die with it
READY_TIMEOUT = 180.0  # a restarted worker that is not ready by then "did not come back"
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
PER_ATTEMPT_KINDS = ("step", "queued", "cancel", "probe")

STARTED_RE = re.compile(
    r"worker (\S+): step (\S+) \(attempt (\d+)\) of run ([0-9a-f-]{36}) started \(queue (\S+), pid (\d+)\)"
)
DROPPED_RE = re.compile(r"worker (\S+): dropping message (\S+) \(delivered (\d+) times\): (.*); not running it")
LABEL_RE = re.compile(r"step (\S+) \(attempt (\d+)\) of run ([0-9a-f-]{36})")
NEVER_RE = re.compile(r"worker (\S+): message (\S+) on queue (\S+) can never run: (.*)")
RELEASE_RE = re.compile(r"worker (\S+): releasing message (\S+) back to queue (\S+) \((.*)\)")


def log(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", flush=True)


@dataclass
class ChaosEvent:
    kind: str
    start: float
    end: float = 0.0
    worker: str | None = None
    incarnation: int | None = None
    pid: int | None = None
    killed_at: float | None = None  # just before the SIGKILL
    gone_at: float | None = None  # when its process tree was gone (or ORPHAN_GRACE later)
    pids: list[int] = field(default_factory=list)  # the killed worker's process tree at the kill
    orphans: list[str] = field(default_factory=list)  # processes of it still alive ORPHAN_GRACE s later
    killed_steps: list[str] = field(default_factory=list)  # steps its incarnation had in user code
    children_gone_after: float | None = None  # seconds from the kill until its step processes were gone
    back_after: float | None = None  # seconds from the kill until the restarted worker was ready
    note: str = ""


@dataclass
class RunProc:
    seq: int
    job: str
    start: float
    log: str
    end: float = 0.0
    exit_code: int | None = None
    timed_out: bool = False
    proc: Any = None


@dataclass
class WorkerSlot:
    name: str
    queues: tuple[str, ...]
    incarnation: int = 0
    proc: Any = None
    pid: int | None = None
    started: float = 0.0
    log: Path | None = None
    pids: dict[int, int] = field(default_factory=dict)  # pid of each incarnation
    lock: threading.Lock = field(default_factory=threading.Lock)
    unexpected_exits: list[dict] = field(default_factory=list)


class Violations:
    def __init__(self) -> None:
        self.items: list[dict] = []
        self._lock = threading.Lock()

    def add(self, kind: str, what: str, **details: Any) -> None:
        with self._lock:
            self.items.append({"kind": kind, "what": what, **details})
        log(f"VIOLATION ({kind}): {what}")


class Soak:
    def __init__(self, opts: argparse.Namespace, workdir: Path) -> None:
        self.opts = opts
        self.rng = random.Random(opts.seed)
        self.chaos_rng = random.Random(opts.seed * 7919 + 1)
        self.workdir = workdir
        self.markers = workdir / "markers"
        self.markers.mkdir()
        self.run_dir = workdir / "runs"
        self.run_dir.mkdir()
        self.services = Services(workdir)
        self._spawner = ThreadPoolExecutor(1, thread_name_prefix="soak-spawner")  # PDEATHSIG: one long-lived thread
        self.violations = Violations()
        self.chaos: list[ChaosEvent] = []
        self.runs: list[RunProc] = []
        self.slots = {name: WorkerSlot(name, queues) for name, queues in WORKERS.items()}
        self.stop_chaos = threading.Event()
        self.stop_supervising = threading.Event()
        self.env: dict[str, str] = {}
        self.config_path = workdir / "executor.yaml"
        self.endpoint = self.proxy = self.pg = None
        self.home = workdir / "dagster_home"

    # --- set-up -------------------------------------------------------------------------------

    def spawn(self, name: str, command: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, Path]:
        return self._spawner.submit(self.services.spawn, name, command, env).result()

    def setup(self, stack: contextlib.ExitStack) -> None:
        from dagster_taskiq_sync.local_endpoint import LocalEndpoint, aws_env
        from tests.helpers import PausableProxy
        from tests.postgres import PostgresCluster, PostgresUnavailable

        try:
            self.pg = stack.enter_context(PostgresCluster())
        except PostgresUnavailable as exc:
            raise ServiceError(str(exc)) from None
        self.pg.write_dagster_yaml(self.home)
        self.endpoint = stack.enter_context(LocalEndpoint(log_path=str(self.workdir / "moto.log")))
        self.proxy = PausableProxy(self.endpoint.port)
        stack.callback(self.proxy.pause)
        # Closed first: workers and orchestrators stop while PostgreSQL and SQS are still there.
        stack.callback(self.services.close)
        stack.callback(self.stop_chaos.set)
        stack.callback(self.stop_supervising.set)
        config = {
            "broker": self.proxy.broker_url,
            **EXECUTOR,
            "config_source": {
                "task_default_queue": QUEUES[0],
                "broker_transport_options": {
                    "region": "us-east-1",
                    "visibility_timeout": VISIBILITY,
                    "wait_time_seconds": WAIT_TIME,
                },
            },
        }
        self.config_path.write_text(yaml.safe_dump({"execution": {"config": config}}))
        self.env = aws_env(self.endpoint) | {
            "DAGSTER_HOME": str(self.home),
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
            "PYTHONUNBUFFERED": "1",
        }
        self.env.pop("AWS_ENDPOINT_URL", None)
        out = subprocess.run(
            [
                CLI,
                "queues",
                "create",
                "-y",
                str(self.config_path),
                *(arg for q in QUEUES for arg in ("-q", q)),
                "--max-receive-count",
                str(MAX_RECEIVE),
            ],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if out.returncode != 0:
            raise ServiceError(f"queues create failed: {out.stderr.strip()}")
        for slot in self.slots.values():
            self.start_worker(slot)
        for slot in self.slots.values():
            if not self.wait_ready(slot, 0):
                raise ServiceError(f"worker {slot.name} not ready; its log:\n{tail(slot.log)}")

    def start_worker(self, slot: WorkerSlot) -> int:
        slot.incarnation += 1
        env = self.env | {"SOAK_WORKER": slot.name, "SOAK_INCARNATION": str(slot.incarnation)}
        offset = slot.log.stat().st_size if slot.log and slot.log.exists() else 0
        command = [
            CLI,
            "worker",
            "start",
            "-y",
            str(self.config_path),
            "-n",
            slot.name,
            *(arg for q in slot.queues for arg in ("-q", q)),
            "-c",
            str(CONCURRENCY),
            "--heartbeat-interval",
            str(HEARTBEAT),
            "--shutdown-timeout",
            "30",
        ]
        proc, path = self.spawn(f"worker-{slot.name}", command, env)
        slot.proc, slot.pid, slot.log, slot.started = proc, proc.pid, path, time.time()
        slot.pids[slot.incarnation] = proc.pid
        with path.open("ab") as fh:  # one line per incarnation, for whoever reads the log
            fh.write(f"--- soak: incarnation {slot.incarnation} of {slot.name}, pid {proc.pid} ---\n".encode())
        return offset

    def wait_ready(self, slot: WorkerSlot, offset: int, timeout: float = READY_TIMEOUT) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with slot.log.open("rb") as fh:
                fh.seek(offset)
                if b" ready: " in fh.read():
                    return True
            if slot.proc.poll() is not None:
                return False
            time.sleep(0.1)
        return False

    # --- the run stream -----------------------------------------------------------------------

    def run_config(self, job: str) -> dict:
        from .soak_jobs import op_names

        ops = {
            name: {"config": {"marker_dir": str(self.markers), "sleep": round(self.rng.uniform(0.2, 2.5), 2)}}
            for name in op_names(job)
        }
        return {"ops": ops}

    def launch(self, seq: int) -> RunProc:
        job = self.rng.choice(("soak_fanout", "soak_chain"))
        cfg = self.run_dir / f"run-{seq:04d}.yaml"
        cfg.write_text(yaml.safe_dump(self.run_config(job)))
        command = [
            DAGSTER,
            "job",
            "execute",
            "-f",
            str(JOBS_FILE),
            "-a",
            job,
            "-c",
            str(self.config_path),
            "-c",
            str(cfg),
            "--tags",
            json.dumps({"soak/seq": str(seq)}),
        ]
        proc, path = self.spawn(f"runs/run-{seq:04d}", command, self.env)
        run = RunProc(seq, job, time.time(), str(path), proc=proc)
        self.runs.append(run)
        return run

    def stream(self, until: float) -> None:
        """Keep ``--runs-at-once`` runs going until ``until``, then let the last ones end."""
        active: list[RunProc] = []
        seq = 0
        next_launch = 0.0
        while True:
            now = time.time()
            for run in list(active):
                code = run.proc.poll()
                if code is None and now - run.start > self.opts.run_timeout:
                    run.timed_out = True
                    self.violations.add(
                        "hang",
                        f"run #{run.seq} ({run.job}) did not end within "
                        f"{self.opts.run_timeout:g} s; its orchestrator was killed",
                        seq=run.seq,
                        log=run.log,
                    )
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(run.proc.pid, signal.SIGKILL)
                    code = run.proc.wait()
                if code is not None:
                    run.exit_code, run.end = code, time.time()
                    active.remove(run)
                    log(f"run #{run.seq} ({run.job}) ended: exit code {code} after {run.end - run.start:.0f} s")
            if now < until and len(active) < self.opts.runs_at_once and now >= next_launch:
                seq += 1
                active.append(self.launch(seq))
                next_launch = now + self.rng.uniform(0.5, 3.0)  # staggered, not in lock-step
            if now >= until and not active:
                return
            time.sleep(0.2)

    # --- chaos --------------------------------------------------------------------------------

    def chaos_plan(self, start: float, until: float) -> list[tuple[float, str]]:
        """When and what: random gaps; --quick has one event of each kind, in random order."""
        rng = self.chaos_rng
        if self.opts.quick:
            kinds = list(CHAOS_KINDS)
            rng.shuffle(kinds)
            span = until - start
            return [(start + span * (i + rng.uniform(0.25, 0.6)) / len(kinds), kind) for i, kind in enumerate(kinds)]
        plan, at = [], start + rng.uniform(*self.opts.chaos_gap)
        while at < until - 20:
            plan.append((at, rng.choice(CHAOS_KINDS)))
            at += rng.uniform(*self.opts.chaos_gap)
        return plan

    def chaos_loop(self, plan: list[tuple[float, str]]) -> None:
        for at, kind in plan:
            while time.time() < at:
                if self.stop_chaos.wait(min(0.5, max(0.0, at - time.time()))):
                    return
            try:
                getattr(self, f"chaos_{kind}")()
            except Exception as exc:
                self.violations.add("soak-error", f"chaos event {kind} failed: {type(exc).__name__}: {exc}")

    def chaos_kill(self) -> None:
        import psutil

        # A random worker, preferring those running user code (a kill mid-step is the interesting one).
        busy = sorted(self.busy_workers())
        name = self.chaos_rng.choice(busy or sorted(self.slots))
        slot = self.slots[name]
        with slot.lock:
            event = ChaosEvent("kill", time.time(), worker=name, incarnation=slot.incarnation, pid=slot.pid)
            try:
                tree = [slot.pid] + [p.pid for p in psutil.Process(slot.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                tree = [slot.pid]
            event.pids = tree
            log(
                f"chaos: SIGKILL worker {name} (incarnation {slot.incarnation}, pid {slot.pid}, {len(tree) - 1} children)"
            )
            event.killed_at = time.time()
            os.kill(slot.pid, signal.SIGKILL)
            slot.proc.wait()
            self.chaos.append(event)
            # Its step processes watch the worker's pid and must die with it.
            deadline = time.monotonic() + ORPHAN_GRACE
            alive = tree[1:]
            while alive and time.monotonic() < deadline:
                alive = [pid for pid in alive if _alive(pid)]
                time.sleep(0.05)
            event.gone_at = time.time()
            if not alive:
                event.children_gone_after = event.gone_at - event.killed_at
            else:
                event.orphans = [_describe(pid) for pid in alive]
                self.violations.add(
                    "orphan",
                    f"{len(alive)} process(es) of worker {name} (pid {slot.pid}) were still "
                    f"alive {ORPHAN_GRACE:g} s after its SIGKILL: {event.orphans}",
                    worker=name,
                    pid=slot.pid,
                )
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(slot.pid, signal.SIGKILL)  # what a supervisor's cgroup kill would do
            self.services._procs = [(n, p) for n, p in self.services._procs if p is not slot.proc]
            time.sleep(self.chaos_rng.uniform(1.0, 2.0))  # the supervisor's restart delay
            offset = self.start_worker(slot)
            if self.wait_ready(slot, offset):
                event.back_after = time.time() - event.start
                log(f"chaos: worker {name} back (incarnation {slot.incarnation}) after {event.back_after:.1f} s")
            else:
                self.violations.add(
                    "worker-not-back",
                    f"worker {name} did not come back within {READY_TIMEOUT:g} s "
                    f"of its restart; its log ends:\n{tail(slot.log)}",
                    worker=name,
                )
            event.end = time.time()

    def busy_workers(self) -> set[str]:
        """Workers whose current incarnation has a step in user code now (a start marker, no end)."""
        open_starts: dict[tuple, str] = {}
        for path in self.markers.glob("*.log"):
            for line in path.read_text().splitlines():
                what, step, retry, pid, worker, inc, _ts = line.split()
                key = (path.name, step, retry, pid)
                if what == "start":
                    open_starts[key] = f"{worker}#{inc}"
                else:
                    open_starts.pop(key, None)
        current = {f"{s.name}#{s.incarnation}": s.name for s in self.slots.values()}
        return {current[w] for w in open_starts.values() if w in current}

    def chaos_sqs_pause(self) -> None:
        event = ChaosEvent("sqs_pause", time.time())
        log(f"chaos: SQS endpoint paused for {SQS_PAUSE:g} s")
        self.proxy.pause()
        self.chaos.append(event)
        time.sleep(SQS_PAUSE)
        self.proxy.resume()
        event.end = time.time()
        log("chaos: SQS endpoint back")

    def chaos_pg_restart(self) -> None:
        event = ChaosEvent("pg_restart", time.time())
        log("chaos: restarting PostgreSQL")
        self.chaos.append(event)
        self.pg.stop()
        # Down for a few seconds, as a real restart or a managed database's reboot is (a bare stop and
        # start of this fsync-off cluster takes 0.3 s, too short to be in anyone's way).
        time.sleep(self.chaos_rng.uniform(*PG_DOWN))
        self.pg.start()
        event.end = time.time()
        log(f"chaos: PostgreSQL back after {event.end - event.start:.1f} s")

    def supervise(self) -> None:
        """Restart a worker that exited by itself (not by chaos), as a supervisor would, and say so."""
        while not self.stop_supervising.wait(1.0):
            for slot in self.slots.values():
                if not slot.lock.acquire(blocking=False):
                    continue
                try:
                    code = slot.proc.poll()
                    if code is None:
                        continue
                    what = (
                        f"worker {slot.name} (incarnation {slot.incarnation}, pid {slot.pid}) exited by itself "
                        f"with code {code}; its log ends:\n{tail(slot.log)}"
                    )
                    slot.unexpected_exits.append({"incarnation": slot.incarnation, "code": code, "at": time.time()})
                    self.violations.add("worker-exit", what, worker=slot.name)
                    self.services._procs = [(n, p) for n, p in self.services._procs if p is not slot.proc]
                    offset = self.start_worker(slot)
                    if not self.wait_ready(slot, offset):
                        self.violations.add(
                            "worker-not-back", f"worker {slot.name} did not come back after exiting", worker=slot.name
                        )
                finally:
                    slot.lock.release()

    # --- the whole soak -----------------------------------------------------------------------

    def run(self) -> dict:
        started = time.time()
        until = started + self.opts.duration * 60
        plan = self.chaos_plan(started, until)
        log(
            f"soak for {self.opts.duration:g} min (seed {self.opts.seed}): {len(plan)} chaos events planned, "
            f"{self.opts.runs_at_once} runs at once; work dir {self.workdir}"
        )
        supervisor = threading.Thread(target=self.supervise, name="supervisor", daemon=True)
        supervisor.start()
        chaos = threading.Thread(target=self.chaos_loop, args=(plan,), name="chaos", daemon=True)
        chaos.start()
        self.stream(until)
        stream_end = time.time()
        self.stop_chaos.set()
        chaos.join(READY_TIMEOUT + 60)
        log("runs done; waiting for the queues to drain")
        drained = self.drain()
        self.stop_supervising.set()
        supervisor.join(READY_TIMEOUT + 10)
        queues = self.queue_counts()
        stops = self.stop_workers()
        rows = self.state_rows()
        return self.analyse(started, stream_end, drained, queues, stops, rows)

    def queue_counts(self) -> dict[str, tuple[int, int]]:
        from tests.helpers import queue_counts

        names = [*QUEUES, *(f"{q}-dlq" for q in QUEUES)]
        return {name: queue_counts(self.endpoint.url, name) for name in names}

    def drain(self) -> float | None:
        """Seconds until both queues were empty (visible and in flight), or None if they were not."""
        start = time.monotonic()
        deadline = start + 3 * VISIBILITY + 120
        while time.monotonic() < deadline:
            counts = self.queue_counts()
            if all(counts[q] == (0, 0) for q in QUEUES):
                return time.monotonic() - start
            time.sleep(1.0)
        return None

    def stop_workers(self) -> dict[str, int | None]:
        codes = {}
        for slot in self.slots.values():
            with contextlib.suppress(ProcessLookupError):
                slot.proc.send_signal(signal.SIGTERM)
        for slot in self.slots.values():
            try:
                codes[slot.name] = slot.proc.wait(60)
            except subprocess.TimeoutExpired:
                codes[slot.name] = None
                self.violations.add(
                    "worker-stop", f"worker {slot.name} did not stop within 60 s of SIGTERM", worker=slot.name
                )
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(slot.pid, signal.SIGKILL)
            if codes[slot.name] not in (0, None):
                self.violations.add(
                    "worker-stop",
                    f"worker {slot.name} exited {codes[slot.name]} on SIGTERM; its log ends:\n{tail(slot.log)}",
                    worker=slot.name,
                )
        self.services._procs = [
            (n, p) for n, p in self.services._procs if all(p is not s.proc for s in self.slots.values())
        ]
        return codes

    def state_rows(self) -> dict[str, Any]:
        db = yaml.safe_load((self.home / "dagster.yaml").read_text())["storage"]["postgres"]["postgres_db"]["db_name"]
        out = self.pg.psql("SELECT key, value FROM kvs WHERE key LIKE 'dagster-taskiq-sync/%' ORDER BY id", db)
        rows = [line.split("|", 1) for line in out.splitlines() if line.strip()]
        kinds = Counter(key.split("/")[1] for key, _ in rows)
        per_attempt = [
            {"key": key, "value": value[:300]} for key, value in rows if key.split("/")[1] in PER_ATTEMPT_KINDS
        ]
        return {"total": len(rows), "by_kind": dict(sorted(kinds.items())), "per_attempt_rows": per_attempt}

    # --- analysis -----------------------------------------------------------------------------

    def worker_logs(self) -> dict[str, Any]:
        started: dict[tuple, list[dict]] = defaultdict(list)
        dropped: dict[tuple, list[dict]] = defaultdict(list)
        never: list[dict] = []
        releases: Counter = Counter()
        for slot in self.slots.values():
            text = slot.log.read_text(errors="replace") if slot.log else ""
            for line in text.splitlines():
                if m := STARTED_RE.search(line):
                    started[(m[4], m[2], int(m[3]))].append({"worker": m[1], "queue": m[5], "pid": int(m[6])})
                elif m := DROPPED_RE.search(line):
                    if lm := LABEL_RE.search(m[4]):
                        dropped[(lm[3], lm[1], int(lm[2]))].append(
                            {"worker": m[1], "message": m[2], "delivered": int(m[3]), "why": m[4], "ts": log_time(line)}
                        )
                elif m := NEVER_RE.search(line):
                    never.append({"worker": m[1], "message": m[2], "queue": m[3], "why": m[4]})
                elif m := RELEASE_RE.search(line):
                    releases[m[4]] += 1
        return {"started": started, "dropped": dropped, "never": never, "releases": releases}

    def markers_of(self, run_id: str) -> list[dict]:
        path = self.markers / f"{run_id}.log"
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            what, step, retry, pid, worker, inc, ts = line.split()
            out.append(
                {
                    "what": what,
                    "step": step,
                    "retry": int(retry),
                    "pid": int(pid),
                    "worker": worker,
                    "incarnation": int(inc) if inc.isdigit() else None,
                    "ts": float(ts),
                }
            )
        return out

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

    def analyse(
        self, started: float, stream_end: float, drained: float | None, queues: dict, stops: dict, rows: dict
    ) -> dict:
        from dagster import DagsterEventType, DagsterInstance

        from .soak_jobs import RETRIES

        logs = self.worker_logs()
        self.killed_steps()
        by_seq: dict[int, Any] = {}
        with DagsterInstance.from_config(str(self.home)) as instance:
            for record in instance.get_runs():
                seq = record.tags.get("soak/seq")
                if seq is not None:
                    by_seq[int(seq)] = record
            runs_out, failures, reruns, progress, pending = [], [], [], [], []
            sent_attempts = ran = dropped_only = failed_run_only = 0
            lost: list[dict] = []
            misleading: list[dict] = []
            odd_retries: list[dict] = []
            step_attempts = 0
            for run in self.runs:
                dagster_run = by_seq.get(run.seq)
                entry = {
                    "seq": run.seq,
                    "job": run.job,
                    "exit_code": run.exit_code,
                    "timed_out": run.timed_out,
                    "wall": round(run.end - run.start, 1),
                    "run_id": dagster_run.run_id if dagster_run else None,
                    "status": dagster_run.status.value if dagster_run else "NO RUN",
                }
                runs_out.append(entry)
                if dagster_run is None:
                    failures.append(self.explain_no_run(run))
                    continue
                run_id = dagster_run.run_id
                events = [r for r in instance.all_logs(run_id) if r.dagster_event is not None]
                run_start = next((r.timestamp for r in events if r.dagster_event.event_type.name == "RUN_START"), None)
                run_end = next((r.timestamp for r in events if r.dagster_event.event_type.name in RUN_END), None)
                if run_start is not None:
                    pending.append((run_start, run_end or time.time()))
                progress.extend(r.timestamp for r in events if r.dagster_event.event_type.name in PROGRESS)
                markers = self.markers_of(run_id)
                # messages: every attempt sent was started, dropped with a reason, or belongs to a failed run
                sent = [
                    (r.dagster_event.step_key, int(r.dagster_event.event_specific_data.metadata["attempt"].value))
                    for r in events
                    if r.dagster_event.event_type == DagsterEventType.STEP_WORKER_STARTING
                ]
                step_attempts += len(sent)
                failed = dagster_run.status.value != "SUCCESS"
                for step_key, attempt in sent:
                    sent_attempts += 1
                    key = (run_id, step_key, attempt)
                    if logs["started"].get(key):
                        ran += 1
                    elif logs["dropped"].get(key):
                        dropped_only += 1
                    elif failed:
                        failed_run_only += 1
                    else:
                        lost.append({"run": run_id, "seq": run.seq, "step": step_key, "attempt": attempt})
                    if len(logs["started"].get(key, [])) > 1:
                        self.violations.add(
                            "double-start",
                            f"step {step_key} (attempt {attempt}) of run {run_id} was "
                            f"started {len(logs['started'][key])} times: {logs['started'][key]}",
                            run=run_id,
                            step=step_key,
                        )
                reruns.extend(self.check_reruns(run, run_id, markers, RETRIES))
                misleading.extend(self.finished_called_lost(run, run_id, events, markers, logs["dropped"]))
                odd_retries.extend(self.retries_not_by_kills(run, run_id, events))
                if failed or run.exit_code != 0:
                    failures.append(self.explain_failure(run, dagster_run, events, markers, RETRIES))
        for item in lost:
            self.violations.add(
                "lost",
                f"step {item['step']} (attempt {item['attempt']}) of run #{item['seq']} "
                f"{item['run']} was sent but no worker started or dropped it, and its run succeeded",
                **item,
            )
        stall = longest_stall(sorted(progress), pending)
        if stall:
            stall["chaos"] = [
                self.describe_event(e)
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
        for name in QUEUES:
            if queues[name] != (0, 0):
                self.violations.add(
                    "queue-not-empty",
                    f"queue {name} still holds {queues[name][0]} visible and "
                    f"{queues[name][1]} in-flight messages at the end",
                    messages=self.peek(name),
                )
            dlq = f"{name}-dlq"
            if queues[dlq] != (0, 0):
                self.violations.add(
                    "dead-letter",
                    f"dead-letter queue {dlq} holds {sum(queues[dlq])} message(s)",
                    messages=self.peek(dlq),
                )
        for item in logs["never"]:
            self.violations.add(
                "dead-letter",
                f"worker {item['worker']} dead-lettered message {item['message']} on {item['queue']}: {item['why']}",
                **item,
            )
        leftover = len(rows["per_attempt_rows"])
        if leftover > len(self.runs):
            self.violations.add(
                "state",
                f"{leftover} per-step-attempt rows left in the key-value store after "
                f"{len(self.runs)} runs ({step_attempts} step attempts): not O(runs)",
            )
        for item in odd_retries:
            self.violations.add(
                "retry",
                f"step {item['step']} of run #{item['seq']} was retried at +{item['at']} s "
                f"without its worker being killed: {item['error']}",
                **item,
            )
        for item in misleading:
            self.violations.add(
                "called-lost",
                f"step {item['step']} (attempt {item['attempt']}) of run #{item['seq']} "
                f"had its outcome in the event log at +{item['ended_at']} s, yet its "
                f"redelivered message was dropped as lost at +{item['dropped_at']} s: "
                f"{item['why']}",
                **item,
            )
        for failure in failures:
            if not failure["explained"]:
                self.violations.add(
                    "failure",
                    f"run #{failure['seq']} failed without an allowed cause: {failure['why']}",
                    seq=failure["seq"],
                )
        for item in reruns:
            if not item["allowed"]:
                self.violations.add(
                    "ran-twice",
                    f"step {item['step']} of run #{item['seq']} ran user code {item['starts']} times: {item['why']}",
                    **item,
                )
        statuses = Counter(r["status"] for r in runs_out)
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
                for name, s in self.slots.items()
            },
            "settings": {
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
            },
            "runs": {
                "started": len(self.runs),
                "succeeded": statuses.get("SUCCESS", 0),
                "failed": len(self.runs) - statuses.get("SUCCESS", 0),
                "by_job": dict(Counter(r["job"] for r in runs_out)),
                "statuses": dict(statuses),
            },
            "failures": failures,
            "step_attempts_sent": sent_attempts,
            "messages": {
                "sent": sent_attempts,
                "started": ran,
                "dropped_with_reason": dropped_only,
                "of_failed_runs_only": failed_run_only,
                "lost": len(lost),
                "lost_list": lost,
                "drops_by_reason": drop_reasons(logs["dropped"]),
                "releases_by_reason": dict(logs["releases"]),
                "queues_at_end": {k: list(v) for k, v in queues.items()},
                "drained_after_seconds": None if drained is None else round(drained, 1),
            },
            "reruns": reruns,
            "finished_attempts_called_lost": misleading,
            "retries_not_by_kills": odd_retries,
            "dead_lettered": sum(sum(queues[f"{q}-dlq"]) for q in QUEUES),
            "longest_stall": stall,
            "state_rows": rows,
            "chaos": {"counts": dict(chaos_counts), "events": [self.describe_event(e) for e in self.chaos]},
            "violations": self.violations.items,
            "runs_list": runs_out,
            "workdir": str(self.workdir),
        }

    def killed_steps(self) -> None:
        """For each kill: the steps its incarnation had in user code (start marker, no end)."""
        open_starts: dict[tuple, dict] = {}
        for path in self.markers.glob("*.log"):
            for m in self.markers_of(path.stem):
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

    def describe_event(self, e: ChaosEvent) -> dict:
        d = {k: v for k, v in asdict(e).items() if v not in (None, [], "")}
        d["at"] = round(e.start - self.t0, 1)
        d["seconds"] = round((e.end or e.start) - e.start, 1)
        return d

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

    def kill_in(self, message: str) -> ChaosEvent | None:
        """The kill a health-check failure names ("worker W (host H, pid P) running step X stopped
        heartbeating N s ago"), matched by the worker's pid."""
        if re.search(r"running step \S+ stopped heartbeating", message):
            pid = re.search(r"pid (\d+)\)", message)
            if pid:
                return self.kill_of(None, pid=int(pid.group(1)))
        return None

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
        steps = []
        explained_all = True
        for record in events:
            event = record.dagster_event
            if event.event_type.name != "STEP_FAILURE":
                continue
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
            explained_all &= explained
            steps.append(
                {
                    "step": step,
                    "error": message,
                    "attempts_with_user_code": len(attempts),
                    "retry_policy": retries.get(step, 0),
                    "caused_by": cause,
                    "allowed": explained,
                    "at": round(record.timestamp - self.t0, 1),
                }
            )
        why = ""
        if not steps:
            explained_all = False
            started_in_pause = self.start_in_sqs_pause(run, events)
            if started_in_pause is not None:
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
                    f"(sqs_pause at +{started_in_pause['at']} s for {started_in_pause['seconds']} s): "
                    '"cannot reach the SQS endpoint ... while connecting to SQS", before any step was sent '
                    "(documented: a run whose endpoint is unreachable at start fails within seconds)",
                }
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
            why = (
                f"run {dagster_run.status.value} with no step failure; exit code {run.exit_code}"
                f"{' (timed out)' if run.timed_out else ''}; events: {msgs}; chaos during the run: "
                f"{[self.describe_event(e) for e in near]}; its output ends: {tail(Path(run.log), 8)[-1200:]}"
            )
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

    def peek(self, queue: str) -> list[dict]:
        """What is left on a queue (received with visibility 0: nothing is consumed)."""
        from tests.helpers import sqs_client

        client = sqs_client(self.endpoint.url)
        url = client.get_queue_url(QueueName=queue)["QueueUrl"]
        got = client.receive_message(
            QueueUrl=url,
            MaxNumberOfMessages=10,
            VisibilityTimeout=0,
            WaitTimeSeconds=1,
            MessageAttributeNames=["All"],
            AttributeNames=["All"],
        )
        out = []
        for m in got.get("Messages", []):
            label = LABEL_RE.search(m["Body"]) or None
            body = m["Body"][:300]
            out.append(
                {
                    "id": m["MessageId"],
                    "receives": m["Attributes"].get("ApproximateReceiveCount"),
                    "reason": m.get("MessageAttributes", {}).get("dts-dead-letter-reason", {}).get("StringValue"),
                    "body": label[0] if label else body,
                }
            )
        return out


def log_time(line: str) -> float | None:
    """Wall-clock time of a worker log line ("2026-12-01 16:53:57,024 ..."; local time)."""
    try:
        return time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")) + int(line[20:23]) / 1000
    except (ValueError, IndexError):
        return None


def drop_reasons(dropped: dict) -> dict[str, int]:
    counts: Counter = Counter()
    for items in dropped.values():
        for item in items:
            why = item["why"]
            if "and has ended (the run's event log has its outcome)" in why:
                kind = "already started and ended (its outcome in the event log; its record was stale)"
            elif " already started " in why or " already ran " in why:
                kind = (
                    "already started (lost worker)"
                    if "(lost)" in why
                    else ("already ran" if " already ran " in why else "already started")
                )
            elif re.search(r"run \S+ is \w+, so", why):
                kind = "run is over: " + re.search(r"run \S+ is (\w+), so", why).group(1)
            else:
                kind = why[:80]
            counts[kind] += 1
    return dict(counts)


def longest_stall(progress: list[float], pending: list[tuple[float, float]]) -> dict | None:
    """The longest gap between two progress events during which some run was pending."""
    best = None
    for a, b in itertools.pairwise(progress):
        if any(s <= a and b <= e for s, e in pending) and (best is None or b - a > best["seconds"]):
            best = {"seconds": round(b - a, 1), "from": a, "to": b}
    return best


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _describe(pid: int) -> str:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        cmd = "?"
    return f"{pid}: {cmd[:120]}"


def tail(path: Path | None, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path else "(no log)"
    except OSError:
        return "(no log)"


# --- the report ---------------------------------------------------------------------------------------


def report_md(r: dict, t0: float) -> str:
    out = []
    mode = "--quick" if r["quick"] else f"--duration {r['duration_minutes']:g}"
    ok = "PASS" if not r["violations"] else f"FAIL ({len(r['violations'])} violation(s))"
    runs, msgs = r["runs"], r["messages"]
    out += [
        f"# Chaos soak: {ok}",
        "",
        f"`bin/soak {mode} --seed {r['seed']}`: {r['soak_seconds']:.0f} s of runs ({r['runs_at_once']} at once, each a "
        "`dagster job execute` process) against workers "
        + ", ".join(
            f"`{n}` (`-q {' -q '.join(w['queues'])} -c {w['concurrency']}`, {w['incarnations']} incarnation(s))"
            for n, w in r["workers"].items()
        )
        + ", on a PostgreSQL instance and a local SQS endpoint behind a pausable proxy. Chaos: "
        + ", ".join(f"{v} x {k}" for k, v in sorted(r["chaos"]["counts"].items()))
        + ". Settings: "
        + ", ".join(f"{k} {v}" for k, v in r["settings"].items())
        + ".",
        "",
        "| figure | value |",
        "|---|---|",
        f"| runs started / succeeded / failed | {runs['started']} / {runs['succeeded']} / {runs['failed']} |",
        f"| failures explained (allowed cause) | {sum(f['explained'] for f in r['failures'])} of {len(r['failures'])}: "
        f"{sum(f['explained'] and not f.get('documented_fail_fast') for f in r['failures'])} a step's worker SIGKILLed "
        f"mid-step (no RetryPolicy, or its retries used up), {sum(bool(f.get('documented_fail_fast')) for f in r['failures'])} "
        "started while SQS was paused (documented fail-fast at run start) |",
        f"| step messages sent (attempts) | {msgs['sent']} |",
        f"| ... started on a worker / dropped with a reason / of a failed run only | {msgs['started']} / "
        f"{msgs['dropped_with_reason']} / {msgs['of_failed_runs_only']} |",
        f"| messages lost | **{msgs['lost']}** |",
        f"| messages in dead-letter queues | **{r['dead_lettered']}** |",
        f"| queues at the end (visible, in flight) | {', '.join(f'{k}: {tuple(v)}' for k, v in msgs['queues_at_end'].items())} |",
        f"| steps whose user code ran more than once | {len(r['reruns'])} ({sum(not x['allowed'] for x in r['reruns'])} not allowed) |",
        f"| longest stall | {r['longest_stall']['seconds'] if r['longest_stall'] else 0:.1f} s |",
        f"| state rows left under `dagster-taskiq-sync/` | {r['state_rows']['total']} "
        f"({', '.join(f'{k}: {v}' for k, v in r['state_rows']['by_kind'].items()) or 'none'}) after "
        f"{r['step_attempts_sent']} step attempts |",
        f"| violations | **{len(r['violations'])}** |",
        "",
    ]
    if r["violations"]:
        out += ["## Violations", ""]
        for v in r["violations"]:
            out.append(f"- **{v['kind']}**: {v['what']}")
        out.append("")
    out += ["## Failed runs", ""]
    if not r["failures"]:
        out.append("None.")
    for f in r["failures"]:
        label = (
            "explained (documented fail-fast at run start)"
            if f.get("documented_fail_fast")
            else "explained"
            if f["explained"]
            else "**not explained**"
        )
        out.append(f"- run #{f['seq']} `{f.get('run')}` ({f['job']}, {f.get('status', 'no run')}): {label}")
        for s in f["steps"]:
            cause = s["caused_by"]
            if isinstance(cause, dict):
                cause = (
                    f"{cause['kind']} of {cause.get('worker')} (incarnation {cause.get('incarnation')}, pid "
                    f"{cause.get('pid')}) at +{cause['at']} s" + (f"; {cause['note']}" if cause.get("note") else "")
                )
            out.append(
                f"  - step `{s['step']}` at +{s['at']} s (RetryPolicy max_retries {s['retry_policy']}, "
                f"{s['attempts_with_user_code']} attempt(s) ran user code): {s['error']}  \n"
                f"    caused by: {cause}"
            )
        if not f["steps"]:
            out.append(f"  - {f['why']}")
    out += ["", "## Steps whose user code ran more than once", ""]
    if not r["reruns"]:
        out.append("None.")
    for x in r["reruns"]:
        out.append(
            f"- run #{x['seq']} step `{x['step']}`: {x['starts']} starts, "
            f"{'allowed' if x['allowed'] else '**not allowed**'}: {x['why']}"
        )
    out += [
        "",
        "## Finished step attempts reported as lost",
        "",
        "Redelivered messages of attempts whose outcome was already in the run's event log (their delete "
        'failed during an outage), dropped by a worker as "already started ... (lost)": the drop is right, '
        'the word "lost" (and the note it writes in the run\'s own log) is not.',
        "",
    ]
    if not r["finished_attempts_called_lost"]:
        out.append("None.")
    for x in r["finished_attempts_called_lost"]:
        out.append(
            f"- run #{x['seq']} step `{x['step']}` (attempt {x['attempt']}): ended at +{x['ended_at']} s, "
            f"dropped at +{x['dropped_at']} s by {x['by']}: {x['why']}"
            + (f"; the run's log says: {x['run_log_says']}" if x["run_log_says"] else "")
        )
    stall = r["longest_stall"]
    out += ["", "## Longest stall", ""]
    if stall:
        out.append(
            f"{stall['seconds']:.1f} s with runs pending and no step event, from +{stall['from'] - t0:.1f} s "
            f"to +{stall['to'] - t0:.1f} s. Chaos then: "
            + (
                "; ".join(
                    f"{e['kind']} at +{e['at']} s ({e['seconds']} s"
                    + (f", {e['worker']}" if e.get("worker") else "")
                    + ")"
                    for e in stall["chaos"]
                )
                or "none"
            )
            + "."
        )
    out += ["", "## Messages dropped by workers (with their reason)", ""]
    for k, v in sorted(msgs["drops_by_reason"].items(), key=lambda kv: -kv[1]):
        out.append(f"- {k}: {v}")
    if not msgs["drops_by_reason"]:
        out.append("None.")
    out += ["", "## State rows left", "", f"By kind: {r['state_rows']['by_kind'] or 'none'}."]
    for row in r["state_rows"]["per_attempt_rows"][:20]:
        out.append(f"- `{row['key']}`: `{row['value'][:200]}`")
    out += ["", "## Chaos events", "", "| at (s) | event | seconds | detail |", "|---:|---|---:|---|"]
    for e in r["chaos"]["events"]:
        detail = ""
        if e["kind"] == "kill":
            detail = (
                f"{e['worker']} incarnation {e['incarnation']} (pid {e['pid']}, {len(e.get('pids', [])) - 1} "
                f"child processes, gone after {e.get('children_gone_after', float('nan')):.1f} s); "
                f"ready again after {e.get('back_after', float('nan')):.1f} s; killed mid-step: "
                f"{', '.join(e.get('killed_steps', [])) or 'none'}"
                + (f"; ORPHANS: {e['orphans']}" if e.get("orphans") else "")
            )
        out.append(f"| {e['at']} | {e['kind']} | {e['seconds']} | {detail} |")
    out += ["", f"Runs by job: {r['runs']['by_job']}; statuses: {r['runs']['statuses']}.", ""]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bin/soak", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--duration", type=float, default=15.0, metavar="MINUTES", help="minutes of runs and chaos (default 15)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="about 2 minutes in all, one chaos event of each kind (CI); writes its report to the work dir "
        "unless --out is given, so it never overwrites the committed full run's",
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="seed of the runs and the chaos (default: random, printed)"
    )
    parser.add_argument("--out", help="where soak.md and soak.json go (default docs/; --quick: the work dir)")
    parser.add_argument("--runs-at-once", type=int, default=None, help="concurrent runs (default 3; --quick 2)")
    parser.add_argument("--chaos-gap", default="15,45", help="seconds between chaos events: MIN,MAX (default 15,45)")
    parser.add_argument(
        "--stall-limit",
        type=float,
        default=180.0,
        help="a stall longer than this (no step progress while runs are pending) is a violation (default 180 s)",
    )
    parser.add_argument(
        "--run-timeout", type=float, default=600.0, help="a run longer than this is a hang (default 600 s)"
    )
    opts = parser.parse_args(argv)
    if opts.quick:
        opts.duration = 1.25 if "--duration" not in (argv if argv is not None else sys.argv) else opts.duration
        opts.runs_at_once = opts.runs_at_once or 2
    opts.runs_at_once = opts.runs_at_once or 3
    opts.seed = opts.seed if opts.seed is not None else random.SystemRandom().randrange(1, 10**6)
    try:
        lo, hi = (float(x) for x in opts.chaos_gap.split(","))
        assert 0 < lo <= hi
    except (ValueError, AssertionError):
        parser.error(f"--chaos-gap {opts.chaos_gap!r} must be MIN,MAX seconds, e.g. 15,45")
    opts.chaos_gap = (lo, hi)

    for key, value in (
        ("AWS_ACCESS_KEY_ID", "local"),
        ("AWS_SECRET_ACCESS_KEY", "local"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ):
        os.environ.setdefault(key, value)  # this process reads the local endpoint's queues too
    workdir = Path(tempfile.mkdtemp(prefix="dagster-taskiq-soak-"))
    out_dir = Path(opts.out) if opts.out else (workdir if opts.quick else ROOT / "docs")
    soak = Soak(opts, workdir)
    soak.t0 = time.time()
    wall = time.monotonic()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with contextlib.ExitStack() as stack:
        stack.callback(soak._spawner.shutdown, wait=True)
        try:
            soak.setup(stack)
            soak.t0 = time.time()
            result = soak.run()
        except ServiceError as exc:
            print(f"bin/soak: {exc}", file=sys.stderr)
            return 2
    result["total_seconds"] = round(time.monotonic() - wall, 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "soak.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    md = report_md(result, soak.t0)
    (out_dir / "soak.md").write_text(md)
    print(md)
    log(
        f"wrote {out_dir / 'soak.md'} and {out_dir / 'soak.json'}; logs in {workdir}; "
        f"{result['total_seconds']:.0f} s in all"
    )
    return 1 if result["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
