"""bin/bench: taskiq_executor against dagster-celery, multiprocess and in_process, side by side.

One invocation sets up every contender on this machine (a local SQS endpoint and a
``dagster-taskiq-sync`` worker; Redis and a ``dagster-celery`` worker; nothing for Dagster's own
executors), runs the same jobs with the same total concurrency against the same Dagster instance
storage (sqlite in a temp DAGSTER_HOME, and PostgreSQL on loopback), and reports medians of
repeated runs as ratios, so the machine's speed cancels out. The orchestrator is this process:
each run is ``execute_job`` on a reconstructable job, timed from the call to its return.

Besides single runs (``chain-N``, ``fanout-N``, ``fanout-N-sleep``) there are workloads of several
runs at once: ``runs-R-chain-N`` (R runs submitted together; throughput and the slowest run) and
``backfill-N+chain-M`` (a chain run started while a fan-out run is in flight on the same queue;
each run's time against its solo time, measured in the same invocation). Per step, every workload
also reports CPU seconds of the orchestrator, the workers and the broker server, and for the
taskiq contender the SQS and S3 requests counted at the endpoint (a counting proxy in front of
it). Every figure is also given as a ratio to the baselines (dagster-celery, in_process)
measured in the same invocation. A contender is skipped where it would take far too long
(multiprocess on 1000-step runs), with a note in the report.

``--quick`` runs small workloads once each so CI keeps the script working; its numbers are not
the ones to quote.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .jobs import Workload, job_steps, workload_spec
from .orchestrator import SEGMENTS as SEGMENT_NAMES
from .services import BIN, ROOT, ServiceError, Services, postgres_server, redis_server, wait_until

CONTENDERS = ("taskiq", "celery", "multiprocess", "in_process")
LABELS = {
    "taskiq": "taskiq_executor (SQS)",
    "celery": "dagster-celery (Redis)",
    "multiprocess": "multiprocess_executor",
    "in_process": "in_process_executor",
}
FULL_WORKLOADS = (
    "chain-20",
    "fanout-100",
    "fanout-100-sleep",
    "fanout-1000",
    "chain-5",
    "runs-10",
    "backfill+interactive",
)
QUICK_WORKLOADS = ("chain-3", "fanout-4", "fanout-4-sleep", "fanout-20", "runs-3-chain-3", "backfill-small")
BASELINES = ("celery", "in_process")  # every new figure is also shown as a ratio to these
# multiprocess_executor starts a Python process per step (fanout-100: ~1.7 s of wall time per
# step on the 2-core reference machine): a 1000-step run takes ~30 min. Measurements with more
# steps than this skip it (--run-skipped runs them).
MULTIPROCESS_MAX_STEPS = 200
QUICK_MULTIPROCESS_MAX_STEPS = 8  # --quick: the three original smoke workloads only
STORAGES = ("sqlite", "postgres")
CONCURRENCY = 4
# Labels of the links orchestrator.step_segments measures, in its order.
SEGMENTS = tuple(
    zip(
        SEGMENT_NAMES,
        (
            "ready -> message sent (orchestrator)",
            "sent -> received by a worker (SQS)",
            "received -> STEP_WORKER_STARTED (worker, step child)",
            "STEP_WORKER_STARTED -> STEP_START (Dagster step setup)",
            "STEP_START -> STEP_SUCCESS (op + outputs)",
            "STEP_SUCCESS -> seen by orchestrator (event log poll)",
        ),
        strict=True,
    )
)


def skip_reason(contender: str, spec: Workload, quick: bool = False) -> str | None:
    """Why ``contender`` does not run ``spec`` by default (printed in the report), or None."""
    if contender == "multiprocess" and quick and spec.steps > QUICK_MULTIPROCESS_MAX_STEPS:
        return (
            f"{spec.steps} steps: --quick keeps multiprocess_executor (a process per step, ~1.7 s each) to "
            f"measurements of at most {QUICK_MULTIPROCESS_MAX_STEPS} steps; `--run-skipped` runs it anyway"
        )
    if contender == "multiprocess" and spec.steps > MULTIPROCESS_MAX_STEPS:
        return (
            f"{spec.steps} steps: multiprocess_executor starts a process per step (fanout-100 took "
            f"~1.7 s of wall time per step here), so ~{spec.steps * 1.7 / 60:.0f} min per measurement; "
            "`--run-skipped` runs it anyway"
        )
    return None


@dataclass
class Measurement:
    storage: str
    workload: str
    contender: str
    walls: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.walls)


# --- memory ---------------------------------------------------------------------------------------


class MemorySampler(threading.Thread):
    """Peak RSS of a worker process and peak PSS of its whole process tree while a run goes on.

    Reading PSS walks every page table of the tree: at 20 reads a second the bench itself took
    ~15% of a core during a 6-minute fanout-1000, competing with the contenders on 2 cores; 5 a
    second still sees every step (each takes several hundred ms in a fan-out)."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        import psutil

        self.proc = psutil.Process(pid)
        self.interval = interval
        self.peak_rss = 0
        self.peak_tree_pss = 0
        self.done = threading.Event()

    def run(self) -> None:
        import psutil

        while not self.done.is_set():
            try:
                self.peak_rss = max(self.peak_rss, self.proc.memory_info().rss)
                total = 0
                for proc in [self.proc, *self.proc.children(recursive=True)]:
                    try:
                        total += proc.memory_full_info().pss
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        pass
                self.peak_tree_pss = max(self.peak_tree_pss, total)
            except psutil.NoSuchProcess:
                return
            self.done.wait(self.interval)

    def stop(self) -> tuple[int, int]:
        self.done.set()
        self.join(5)
        return self.peak_rss, self.peak_tree_pss


# --- CPU ------------------------------------------------------------------------------------------


def tree_cpu(pid: int | None) -> float:
    """CPU seconds (user + system) used so far by a process and all its descendants, live or
    exited and reaped (a process's reaped children are in its ``children_*`` times)."""
    import psutil

    if pid is None:
        return 0.0
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        total += times.user + times.system + times.children_user + times.children_system
    return total


# --- SQS requests ---------------------------------------------------------------------------------


class RequestCounter:
    """benchmarks/request_counter.py in its own process (so the bench's own threads never slow
    the endpoint down): one proxy port for the taskiq orchestrator, one for its worker."""

    SIDES = ("orchestrator", "worker")

    def __init__(self, services: Services, target_port: int) -> None:
        import subprocess

        from .services import _die_with_parent

        log = open(services.workdir / "request-counter.log", "ab")
        command = [sys.executable, "-m", "benchmarks.request_counter", str(target_port), *self.SIDES]
        self.proc = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            cwd=ROOT,
            preexec_fn=_die_with_parent,
            text=True,
        )
        log.close()
        services._procs.append(("request-counter", self.proc))
        self.ports: dict[str, int] = self._read()["ports"]

    def _read(self) -> dict[str, Any]:
        import select

        ready, _, _ = select.select([self.proc.stdout], [], [], 30)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise ServiceError(f"the SQS request counter did not answer (exit code {self.proc.poll()})")
        return json.loads(line)

    def counts(self) -> dict[str, dict[str, int]]:
        self.proc.stdin.write("counts\n")
        self.proc.stdin.flush()
        return self._read()


def redis_commands(port: int) -> dict[str, int]:
    """Commands Redis has served so far, by name (``INFO commandstats``; the INFO calls excluded)."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"INFO commandstats\r\n")
        data = b""
        while b"\r\n" not in data:
            data += sock.recv(65536)
        header, _, body = data.partition(b"\r\n")
        size = int(header[1:])  # bulk string: $<size>
        while len(body) < size:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    counts = {}
    for line in body[:size].decode().splitlines():
        if line.startswith("cmdstat_"):
            name, _, stats = line[len("cmdstat_") :].partition(":")
            calls = dict(item.split("=", 1) for item in stats.split(","))["calls"]
            if name != "info":
                counts[name] = int(calls)
    return {"redis": counts}


def count_difference(after: dict[str, dict[str, int]], before: dict[str, dict[str, int]]) -> dict[str, int]:
    """``{"orchestrator SQS SendMessage": n, ...}``: requests between two counter snapshots."""
    diff = {}
    for side, counts in after.items():
        for operation, n in counts.items():
            delta = n - before.get(side, {}).get(operation, 0)
            if delta:
                diff[f"{side} {operation}"] = delta
    return diff


# --- contenders -----------------------------------------------------------------------------------


class Orchestrator:
    """A contender's own orchestrating process (benchmarks/orchestrator.py), driven over pipes."""

    def __init__(self, services: Services, contender: str, home: Path, env: dict[str, str]) -> None:
        import subprocess

        from .services import _die_with_parent

        self.contender = contender
        self.log_path = services.workdir / f"orchestrator-{contender}-{home.name}.log"
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.orchestrator", contender, str(home)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            env=env,
            cwd=ROOT,
            preexec_fn=_die_with_parent,
            text=True,
        )
        log.close()
        services._procs.append((f"orchestrator-{contender}", self.proc))
        self._read(120)

    def _read(self, timeout: float) -> dict[str, Any]:
        import select

        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise ServiceError(
                f"the {self.contender} orchestrator did not answer within {timeout:g} s "
                f"(exit code {self.proc.poll()}); see {self.log_path}"
            )
        return json.loads(line)

    def run(self, workload: str, run_config: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        if timeout is None:  # generous: a stuck run still ends the bench, a slow contender does not
            timeout = 900 + 3 * workload_spec(workload).steps
        self.proc.stdin.write(json.dumps({"workload": workload, "run_config": run_config}) + "\n")
        self.proc.stdin.flush()
        answer = self._read(timeout)
        if "error" in answer:
            raise RuntimeError(f"the {self.contender} orchestrator failed running {workload}:\n{answer['error']}")
        return answer


class Bench:
    def __init__(self, opts: argparse.Namespace, workdir: Path) -> None:
        self.opts = opts
        self.workdir = workdir
        self.services = Services(workdir)
        self.env = dict(os.environ)
        self.env.update(
            {
                "AWS_ACCESS_KEY_ID": "local",
                "AWS_SECRET_ACCESS_KEY": "local",
                "AWS_DEFAULT_REGION": "us-east-1",
                "PYTHONPATH": str(ROOT),
                "DAGSTER_DISABLE_TELEMETRY": "1",
                "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            }
        )
        os.environ.update(
            {k: self.env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
        )
        self.run_config: dict[str, dict[str, Any]] = {
            "multiprocess": {"execution": {"config": {"max_concurrent": CONCURRENCY}}},
            "in_process": {},
        }

        self.worker_pids: dict[str, int] = {}
        self.endpoint = None
        self.included: list[tuple[Path, list[str]]] = []
        self.storages_run: tuple[str, ...] = tuple(opts.storages)
        self.measurements: dict[tuple[str, str, str], Measurement] = {}
        self.segments: dict[tuple[str, str], dict[str, list[float]]] = {}
        self.memory: dict[tuple[str, str], dict[str, float]] = {}
        # (storage, workload, contender) -> one dict per timed measurement
        self.details: dict[tuple[str, str, str], list[dict[str, Any]]] = {}  # several-run workloads
        self.cpu: dict[tuple[str, str, str], list[dict[str, float]]] = {}
        self.requests: dict[tuple[str, str], list[dict[str, Any]]] = {}  # taskiq only
        self.redis_commands: dict[tuple[str, str], list[dict[str, Any]]] = {}  # celery only
        self.redis_port: int | None = None
        self.payload_bytes: dict[tuple[str, str], list[int]] = {}  # taskiq only
        self.skipped: dict[tuple[str, str], str] = {}  # (workload, contender) -> why
        self.counter: RequestCounter | None = None
        self.broker_pids: dict[str, int] = {}

    def log(self, message: str) -> None:
        print(message, flush=True)

    # -- shared infrastructure --

    def start_brokers(self) -> None:
        if "taskiq" in self.opts.contenders:
            from dagster_taskiq_sync.local_endpoint import LocalEndpoint

            self.endpoint = LocalEndpoint(log_path=str(self.workdir / "sqs-endpoint.log")).start()
            self.broker_pids["taskiq"] = self.endpoint._proc.pid
            self.run_config["taskiq"] = self._taskiq_config(self.endpoint.port)
            self._write_config("taskiq")  # direct: queue creation is not counted
            self._cli(BIN / "dagster-taskiq-sync", "queues", "create", "-y", self.workdir / "taskiq.yaml")
            self.log(f"local SQS endpoint {self.endpoint.url}")
            worker_config = self.run_config["taskiq"]
            if self.opts.count_requests:
                self.counter = RequestCounter(self.services, self.endpoint.port)
                self.run_config["taskiq"] = self._taskiq_config(self.counter.ports["orchestrator"])
                worker_config = self._taskiq_config(self.counter.ports["worker"])
                self.log(
                    f"SQS request counter: orchestrator -> 127.0.0.1:{self.counter.ports['orchestrator']}, "
                    f"worker -> 127.0.0.1:{self.counter.ports['worker']}"
                )
            (self.workdir / "taskiq-worker.yaml").write_text(yaml.safe_dump(worker_config))
        if "celery" in self.opts.contenders:
            redis = redis_server(self.services)
            self.run_config["celery"] = {
                "execution": {
                    "config": {
                        "broker": f"{redis}/0",
                        "backend": f"{redis}/1",
                    }
                }
            }
            self._write_config("celery")
            self.broker_pids["celery"] = next(proc.pid for name, proc in self.services._procs if name == "redis")
            self.redis_port = int(redis.rsplit(":", 1)[1])
            self.log(f"redis {redis}")

    @staticmethod
    def _taskiq_config(port: int) -> dict[str, Any]:
        return {
            "execution": {
                "config": {
                    "broker": f"sqs://127.0.0.1:{port}",
                    "config_source": {
                        "broker_transport_options": {"region": "us-east-1"},
                        "task_default_queue": "bench",
                    },
                }
            }
        }

    def _write_config(self, contender: str) -> None:
        (self.workdir / f"{contender}.yaml").write_text(yaml.safe_dump(self.run_config[contender]))

    def _cli(self, *command) -> None:
        import subprocess

        out = subprocess.run([str(c) for c in command], env=self.env, capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise ServiceError(f"{' '.join(map(str, command))} failed:\n{out.stderr}")

    def make_home(self, storage: str) -> Path:
        home = self.workdir / f"home-{storage}"
        home.mkdir()
        config: dict[str, Any] = {"telemetry": {"enabled": False}}
        if storage == "postgres":
            db = postgres_server(self.services)
            db["password"] = "postgres"  # trust auth on loopback; dagster-postgres wants a value
            # SQLAlchemy 2.1 defaults postgresql:// to psycopg 3, which dagster-postgres' NOTIFY
            # statement does not work with; name the psycopg2 driver dagster-postgres installs.
            db["scheme"] = "postgresql+psycopg2"
            config["storage"] = {"postgres": {"postgres_db": db}}
            self.log(f"postgres on 127.0.0.1:{db['port']}")
        (home / "dagster.yaml").write_text(yaml.safe_dump(config))
        return home

    def start_workers(self, home: Path) -> list:
        env = self.env | {"DAGSTER_HOME": str(home)}
        started = []
        if "taskiq" in self.opts.contenders:
            proc, log = self.services.spawn(
                f"taskiq-worker-{home.name}",
                [
                    BIN / "dagster-taskiq-sync",
                    "worker",
                    "start",
                    "-y",
                    self.workdir / "taskiq-worker.yaml",
                    "-c",
                    str(CONCURRENCY),
                    "-n",
                    "bench",
                    "-i",
                    "benchmarks.jobs",
                ],
                env=env,
            )
            wait_until(lambda: " ready: " in log.read_text(errors="replace"), proc, "taskiq worker", log)
            self.worker_pids["taskiq"] = proc.pid
            started.append(proc)
        if "celery" in self.opts.contenders:
            proc, log = self.services.spawn(
                f"celery-worker-{home.name}",
                [
                    BIN / "dagster-celery",
                    "worker",
                    "start",
                    "-A",
                    "dagster_celery.app",
                    "-y",
                    self.workdir / "celery.yaml",
                    "-n",
                    "bench@%h",
                    "-i",
                    "benchmarks.jobs",
                    "--",
                    "-c",
                    str(CONCURRENCY),
                    "--without-gossip",
                    "--without-mingle",
                ],
                env=env,
            )
            wait_until(lambda: "ready." in log.read_text(errors="replace"), proc, "dagster-celery worker", log)
            self.worker_pids["celery"] = proc.pid
            started.append(proc)
        return started

    # -- runs --

    def run_once(
        self, orchestrator: Orchestrator, storage: str, workload: str, record: bool = True, sample_memory: bool = False
    ) -> float:
        contender = orchestrator.contender
        spec = workload_spec(workload)
        sampler = None
        if sample_memory and contender in self.worker_pids:
            sampler = MemorySampler(self.worker_pids[contender])
            sampler.start()
        worker_pid, broker_pid = self.worker_pids.get(contender), self.broker_pids.get(contender)
        counter = self.counter if contender == "taskiq" else None
        counts_before = counter.counts() if counter else None
        redis_port = self.redis_port if contender == "celery" else None
        redis_before = redis_commands(redis_port) if redis_port else None
        cpu_before = (tree_cpu(worker_pid), tree_cpu(broker_pid), tree_cpu(counter.proc.pid) if counter else 0.0)
        answer = orchestrator.run(workload, self.run_config[contender])
        cpu_after = (tree_cpu(worker_pid), tree_cpu(broker_pid), tree_cpu(counter.proc.pid) if counter else 0.0)
        counts_after = counter.counts() if counter else None
        redis_after = redis_commands(redis_port) if redis_port else None
        wall = answer["wall"]
        if sampler is not None:
            rss, pss = sampler.stop()
            previous = self.memory.get((storage, contender), {"worker_rss_mib": 0.0, "tree_pss_mib": 0.0})
            self.memory[(storage, contender)] = {
                "worker_rss_mib": max(previous["worker_rss_mib"], rss / 2**20),
                "tree_pss_mib": max(previous["tree_pss_mib"], pss / 2**20),
            }
        if not answer["success"]:
            raise RuntimeError(
                f"{contender} run {answer['run_id']} of {workload} on {storage} did not succeed; "
                f"see its event log in {self.workdir}/home-{storage}"
            )
        if record:
            key = (storage, workload, contender)
            self.measurements.setdefault(key, Measurement(storage, workload, contender)).walls.append(wall)
            if "segments" in answer:
                segments = self.segments.setdefault((storage, workload), {name: [] for name, _ in SEGMENTS})
                for name, values in answer["segments"].items():
                    segments[name].extend(values)
            if "payload_bytes" in answer:
                self.payload_bytes.setdefault((storage, workload), []).extend(answer["payload_bytes"])
            self.cpu.setdefault(key, []).append(
                {
                    "steps": spec.steps,
                    "orchestrator": answer["cpu"]["self"],
                    # multiprocess_executor's step processes are the orchestrator's children
                    "workers": (
                        answer["cpu"]["children"] + (cpu_after[0] - cpu_before[0])
                        if contender != "in_process"
                        else None
                    ),
                    "broker": cpu_after[1] - cpu_before[1] if broker_pid else None,
                    "request_counter": cpu_after[2] - cpu_before[2] if counter else None,
                }
            )
            if spec.kind != "single":
                self.details.setdefault(key, []).append(
                    {
                        "steps": spec.steps,
                        "makespan": wall,
                        "walls": answer["walls"],
                        **answer.get("backfill", {}),
                    }
                )
            if counts_before is not None:
                self.requests.setdefault((storage, workload), []).append(
                    {"steps": spec.steps, "counts": count_difference(counts_after, counts_before)}
                )
            if redis_before is not None:
                self.redis_commands.setdefault((storage, workload), []).append(
                    {"steps": spec.steps, "counts": count_difference(redis_after, redis_before)}
                )
        return wall

    def run_storage(self, storage: str) -> None:
        home = self.make_home(storage)
        workers = self.start_workers(home)
        env = self.env | {"DAGSTER_HOME": str(home)}
        orchestrators = {c: Orchestrator(self.services, c, home, env) for c in self.opts.contenders}
        try:
            self.log(f"\n== {storage}: warm-up (untimed) ==")
            for contender in self.opts.contenders:
                for job in self.warm_up_jobs(contender):
                    wall = self.run_once(orchestrators[contender], storage, job, record=False)
                    self.log(f"  warm-up {job:<22} {contender:<13} {wall:7.2f} s")
            self.log(f"== {storage}: {self.opts.repeats} repeat(s), contenders interleaved ==")
            for repeat in range(self.opts.repeats):
                for workload in self.opts.workloads:
                    for contender in self.opts.contenders:
                        if (workload, contender) in self.skipped:
                            continue
                        memory = workload.startswith("fanout") and not workload.endswith("sleep")
                        wall = self.run_once(orchestrators[contender], storage, workload, sample_memory=memory)
                        self.log(f"  #{repeat + 1} {workload:<22} {contender:<13} {wall:7.2f} s")
                        self.save_progress()
        finally:
            for orchestrator in orchestrators.values():
                orchestrator.proc.stdin.close()
                self.services.stop(orchestrator.proc)
            for proc in workers:
                self.services.stop(proc)

    def warm_up_jobs(self, contender: str) -> list[str]:
        """One untimed run of each job the contender's measurements use (so workers hold its
        plan and step children are up); --quick warms up the first workload only. Nothing stays
        warm between multiprocess runs (a process per step)."""
        if contender == "multiprocess":
            return []
        jobs: list[str] = []
        for workload in self.opts.workloads[:1] if self.opts.quick else self.opts.workloads:
            if (workload, contender) not in self.skipped:
                jobs.extend(job for job in workload_spec(workload).jobs if job not in jobs)
        return jobs

    # -- report --

    def ratio(self, storage: str, workload: str, a: str, b: str) -> float | None:
        ma, mb = self.measurements.get((storage, workload, a)), self.measurements.get((storage, workload, b))
        if ma is None or mb is None:
            return None
        return ma.median / mb.median

    def targets(self) -> list[dict[str, Any]]:
        rows = []
        chain = next((w for w in self.opts.workloads if w.startswith("chain")), None)
        fanout = next((w for w in self.opts.workloads if w.startswith("fanout") and not w.endswith("sleep")), None)
        for storage in self.opts.storages:
            for workload, other, limit in (
                (chain, "celery", 0.3),
                (chain, "in_process", 2.5),
                (fanout, "celery", 0.6),
                (fanout, "multiprocess", 0.3),
            ):
                value = self.ratio(storage, workload, "taskiq", other) if workload else None
                if value is not None:
                    rows.append(
                        {
                            "storage": storage,
                            "what": f"{workload}: taskiq / {other}",
                            "value": value,
                            "target": limit,
                            "met": value <= limit,
                        }
                    )
            for workload in self.opts.workloads:
                seg = self.segments.get((storage, workload))
                if not seg or not seg["ready_to_sent"]:
                    continue
                overhead = [a + b for a, b in zip(seg["ready_to_sent"], seg["finish_to_seen"], strict=False)]
                value = statistics.median(overhead) * 1000
                rows.append(
                    {
                        "storage": storage,
                        "what": f"{workload}: orchestrator overhead per step p50 (ms)",
                        "value": value,
                        "target": 50.0,
                        "met": value <= 50.0,
                    }
                )
        return rows

    def report(self) -> str:
        # The repeats of what is reported (an included invocation's, with --report-only).
        counts = sorted({len(m.walls) for m in self.measurements.values()}) or [self.opts.repeats]
        repeats = "-".join(str(n) for n in (counts[0], counts[-1]) if n) if counts[0] != counts[-1] else str(counts[0])
        lines = [
            f"Machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}; concurrency {CONCURRENCY}; "
            f"{repeats} repeat(s), median wall seconds of `execute_job` (min-max).",
            "",
        ]
        versions = _versions()
        lines.append("Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
        for path, storages in self.included:
            lines += [
                "",
                f"{', '.join(storages)}: from the invocation that wrote {path.name} (all contenders side by "
                "side in that one invocation; ratios never mix invocations).",
            ]
        for storage in self.opts.storages:
            lines += [
                "",
                f"### {storage}",
                "",
                "| workload | "
                + " | ".join(LABELS[c] for c in self.opts.contenders)
                + " | taskiq / celery | taskiq / multiprocess | taskiq / in_process |",
                "|---|" + "---:|" * (len(self.opts.contenders) + 3),
            ]
            for workload in self.opts.workloads:
                cells = []
                for contender in self.opts.contenders:
                    m = self.measurements.get((storage, workload, contender))
                    skipped = "skipped" if (workload, contender) in self.skipped else "-"
                    cells.append(f"{m.median:.2f} ({min(m.walls):.2f}-{max(m.walls):.2f})" if m else skipped)
                for other in ("celery", "multiprocess", "in_process"):
                    r = self.ratio(storage, workload, "taskiq", other)
                    cells.append(f"{r:.2f}x" if r is not None else "-")
                lines.append(f"| {workload} | " + " | ".join(cells) + " |")
        several = [w for w in self.opts.workloads if workload_spec(w).kind != "single"]
        if several:
            lines += ["", "Workloads of several runs: the time from the first run's start to the last run's end."]
        if self.skipped:
            lines += ["", "Skipped (not measured, by default):", ""]
            lines += [
                f"- {workload}, {LABELS[contender]}: {why}." for (workload, contender), why in self.skipped.items()
            ]
        lines += self.report_runs() + self.report_backfill()
        lines += ["", "### Targets", "", "| storage | ratio | measured | target | met |", "|---|---|---:|---:|---|"]
        for row in self.targets():
            lines.append(
                f"| {row['storage']} | {row['what']} | {row['value']:.2f} | <= {row['target']:g} | "
                f"{'yes' if row['met'] else 'NO'} |"
            )
        lines += [
            "",
            "### Where a taskiq step's time goes (ms, p50 / p95 over every step of every timed run)",
            "",
            "| storage | workload | " + " | ".join(label for _, label in SEGMENTS) + " |",
            "|---|---|" + "---:|" * len(SEGMENTS),
        ]
        for (storage, workload), seg in sorted(self.segments.items()):
            cells = []
            for name, _ in SEGMENTS:
                values = sorted(seg[name])
                cells.append(f"{_pct(values, 50) * 1000:.0f} / {_pct(values, 95) * 1000:.0f}" if values else "-")
            lines.append(f"| {storage} | {workload} | " + " | ".join(cells) + " |")
        lines += self.report_cpu() + self.report_requests()
        if self.memory:
            lines += [
                "",
                f"### Worker memory, {CONCURRENCY} threads/processes, fan-out run (MiB)",
                "",
                "| storage | worker | peak RSS of the worker process | peak PSS of worker + children |",
                "|---|---|---:|---:|",
            ]
            for (storage, contender), mem in sorted(self.memory.items()):
                lines.append(
                    f"| {storage} | {LABELS[contender]} | {mem['worker_rss_mib']:.0f} | {mem['tree_pss_mib']:.0f} |"
                )
        return "\n".join(lines) + "\n"

    # -- the sections for several-run workloads, CPU and SQS requests --

    def contenders_in(self, storage: str) -> list[str]:
        return [c for c in CONTENDERS if any(k[0] == storage and k[2] == c for k in self.measurements)]

    def with_ratios(self, figure, storage: str, workload: str, contender: str, digits: int = 2) -> str:
        """``value · r1 / r2``: the figure and its ratio to each baseline (same storage, same
        invocation); ``=`` where the contender is that baseline, ``-`` where it was not measured."""
        value = figure(storage, workload, contender)
        if value is None:
            return "-"
        ratios = []
        for base in BASELINES:
            if base == contender:
                ratios.append("=")
                continue
            other = figure(storage, workload, base)
            ratios.append(f"{value / other:.2f}x" if other else "-")
        return f"{value:.{digits}f} · " + " / ".join(ratios)

    def _ratio_note(self, figure: str = "the figure (median over repeats)") -> str:
        return (
            f"Each cell: {figure} · its ratio to "
            + " / ".join(LABELS[b] for b in BASELINES)
            + " on the same workload and storage in this invocation (`=`: the baseline itself; `-`: not measured "
            "or not applicable)."
        )

    def _detail(self, key: str):
        """A figure of several-run workloads: the median over repeats of ``key(detail)``."""

        def figure(storage, workload, contender):
            values = [key(d) for d in self.details.get((storage, workload, contender), [])]
            values = [v for v in values if v is not None]
            return statistics.median(values) if values else None

        return figure

    def _solo(self, index: int):
        """Median solo wall of a backfill workload's run ``index`` (0: the fan-out, 1: the chain)."""

        def figure(storage, workload, contender):
            m = self.measurements.get((storage, workload_spec(workload).jobs[index], contender))
            return m.median if m else None

        return figure

    def _runs_figures(self) -> list[tuple]:
        """(JSON name, report label, figure, digits) of runs-R-chain-N workloads."""
        return [
            ("all_runs_done_s", "all runs done (s)", self._detail(lambda d: d["makespan"]), 2),
            ("runs_per_min", "runs/min", self._detail(lambda d: 60 * len(d["walls"]) / d["makespan"]), 1),
            ("steps_per_s", "steps/s", self._detail(lambda d: d["steps"] / d["makespan"]), 2),
            ("slowest_run_s", "slowest run (s)", self._detail(lambda d: max(d["walls"])), 2),
            ("median_run_s", "median run (s)", self._detail(lambda d: statistics.median(d["walls"])), 2),
        ]

    def _backfill_figures(self) -> list[tuple]:
        """(JSON name, report label, figure, digits) of backfill-N+chain-M workloads."""
        small_during = self._detail(lambda d: d["walls"][1])
        big_during = self._detail(lambda d: d["walls"][0])
        small_solo, big_solo = self._solo(1), self._solo(0)

        def slowdown(during, solo):
            def figure(storage, workload, contender):
                a, b = during(storage, workload, contender), solo(storage, workload, contender)
                return a / b if a is not None and b else None

            return figure

        return [
            ("interactive_solo_s", "interactive run solo (s)", small_solo, 2),
            ("interactive_during_backfill_s", "interactive run during the backfill (s)", small_during, 2),
            ("interactive_slowdown", "interactive slowdown (x)", slowdown(small_during, small_solo), 2),
            ("backfill_solo_s", "backfill run solo (s)", big_solo, 2),
            ("backfill_with_interactive_s", "backfill run with the interactive one (s)", big_during, 2),
            ("backfill_slowdown", "backfill slowdown (x)", slowdown(big_during, big_solo), 2),
        ]

    def figures(self) -> list[dict[str, Any]]:
        """Every figure of the report with its ratios to the baselines, for benchmark.json."""

        def wall(storage, workload, contender):
            m = self.measurements.get((storage, workload, contender))
            return m.median if m else None

        rows = []
        keys = sorted({*self.measurements, *self.cpu}, key=self._row_order)
        for storage, workload, contender in keys:
            kind = workload_spec(workload).kind
            named = [("wall_s", wall)]
            named += [
                (f"cpu_ms_per_step_{part}", self._cpu_figure(part))
                for part in ("orchestrator", "workers", "broker", "total")
            ]
            if kind == "runs":
                named += [(name, fig) for name, _, fig, _ in self._runs_figures()]
            if kind == "backfill":
                named += [(name, fig) for name, _, fig, _ in self._backfill_figures()]
            for name, fig in named:
                value = fig(storage, workload, contender)
                if value is None:
                    continue
                row = {"storage": storage, "workload": workload, "contender": contender, "figure": name, "value": value}
                for base in BASELINES:
                    other = fig(storage, workload, base)
                    row[f"ratio_to_{base}"] = value / other if other else None
                rows.append(row)
        for (storage, workload), records in sorted(self.requests.items(), key=lambda kv: self._row_order((*kv[0], ""))):
            steps = sum(r["steps"] for r in records)
            per_op: dict[str, float] = {}
            for record in records:
                for op, n in record["counts"].items():
                    per_op[op] = per_op.get(op, 0) + n / steps
            rows.append(
                {
                    "storage": storage,
                    "workload": workload,
                    "contender": "taskiq",
                    "figure": "sqs_requests_per_step",
                    "value": sum(per_op.values()),
                    "by_operation": per_op,
                    **{f"ratio_to_{base}": None for base in BASELINES},
                }
            )  # no SQS baseline
        return rows

    def report_runs(self) -> list[str]:
        rows = [(s, w, c) for (s, w, c) in self.details if workload_spec(w).kind == "runs"]
        if not rows:
            return []
        figures = [(label, fig, digits) for _, label, fig, digits in self._runs_figures()]
        lines = [
            "",
            "### Several runs submitted at once",
            "",
            "R runs of a chain, started together from one orchestrating process (a thread per run). "
            + self._ratio_note(),
            "",
            "| storage | workload | contender | " + " | ".join(f[0] for f in figures) + " |",
            "|---|---|---|" + "---:|" * len(figures),
        ]
        for storage, workload, contender in sorted(rows, key=self._row_order):
            cells = [self.with_ratios(fig, storage, workload, contender, digits) for _, fig, digits in figures]
            lines.append(f"| {storage} | {workload} | {LABELS[contender]} | " + " | ".join(cells) + " |")
        return lines

    def report_backfill(self) -> list[str]:
        rows = [(s, w, c) for (s, w, c) in self.details if workload_spec(w).kind == "backfill"]
        if not rows:
            return []
        figures = [(label, fig, digits) for _, label, fig, digits in self._backfill_figures()]
        lines = [
            "",
            "### Interactive run during a backfill",
            "",
            "backfill-N+chain-M: a fanout-N run starts; once its root step is done and 5% of its branches "
            "have started, a chain-M run starts on the same queue (same orchestrating process, its own "
            "thread). Solo times are the fanout-N and chain-M rows of the table above. " + self._ratio_note(),
            "",
            "| storage | workload | contender | "
            + " | ".join(f[0] for f in figures)
            + " | backfill steps done when the interactive run started / ended |",
            "|---|---|---|" + "---:|" * (len(figures) + 1),
        ]
        for storage, workload, contender in sorted(rows, key=self._row_order):
            cells = [self.with_ratios(fig, storage, workload, contender, digits) for _, fig, digits in figures]
            details = self.details[(storage, workload, contender)]
            big_steps = job_steps(workload_spec(workload).jobs[0])
            progress = ", ".join(
                f"{d.get('big_steps_done_when_small_started')} / {d.get('big_steps_done_when_small_ended')}"
                + ("" if d.get("small_started_during_backfill", True) else " (backfill ended first)")
                for d in details
            )
            cells.append(f"{progress} of {big_steps}")
            lines.append(f"| {storage} | {workload} | {LABELS[contender]} | " + " | ".join(cells) + " |")
        return lines

    def _cpu_figure(self, part: str):
        """CPU milliseconds per step of ``part`` (orchestrator, workers, broker, total), summed
        over every timed measurement and divided by their steps."""

        def figure(storage, workload, contender):
            records = self.cpu.get((storage, workload, contender))
            if not records:
                return None
            parts = ("orchestrator", "workers", "broker") if part == "total" else (part,)
            if part != "total" and any(r.get(part) is None for r in records):
                return None  # not applicable: in_process has no workers, no contender but taskiq a proxy
            steps = sum(r["steps"] for r in records)
            return 1000 * sum(r.get(p) or 0.0 for r in records for p in parts) / steps

        return figure

    def report_cpu(self) -> list[str]:
        if not self.cpu:
            return []
        figures = [
            ("orchestrator", "orchestrator"),
            ("workers / step processes", "workers"),
            ("broker server (moto / redis)", "broker"),
            ("total", "total"),
        ]
        lines = [
            "",
            "### CPU per step (ms of user + system time)",
            "",
            "psutil, before and after each timed measurement: the orchestrating process (in_process: it also "
            "runs the steps), the worker's whole process tree (multiprocess: the orchestrator's step "
            "processes), and the broker's server process (the local SQS endpoint, moto; Redis). Summed over "
            "the repeats, divided by their steps (the kernel counts in 10 ms ticks: small runs are coarse). "
            "The counting proxy in front of the SQS endpoint is the bench's own and not in the total. The local "
            "SQS endpoint (moto) looks through every message of a queue on each receive, so its CPU per step "
            "grows with the queue's depth (the big fan-outs); that is the stand-in's cost, not SQS's. In "
            "backfill workloads the orchestrator column includes the bench's own look at the backfill's "
            "progress (one event-log read per 0.1 s until the interactive run starts). "
            + self._ratio_note("CPU ms per step"),
            "",
            "| storage | workload | contender | " + " | ".join(f[0] for f in figures) + " | counting proxy |",
            "|---|---|---|" + "---:|" * (len(figures) + 1),
        ]
        for storage, workload, contender in sorted(self.cpu, key=self._row_order):
            cells = [self.with_ratios(self._cpu_figure(part), storage, workload, contender, 1) for _, part in figures]
            proxy = self._cpu_figure("request_counter")(storage, workload, contender)
            cells.append(f"{proxy:.1f}" if proxy is not None else "-")
            lines.append(f"| {storage} | {workload} | {LABELS[contender]} | " + " | ".join(cells) + " |")
        return lines

    def report_requests(self) -> list[str]:
        return self._report_requests() + self._report_redis()

    def _report_redis(self) -> list[str]:
        if not self.redis_commands:
            return []
        lines = [
            "",
            "For comparison, the broker round trips of dagster-celery: Redis commands per step (`INFO "
            "commandstats` before and after each timed measurement, its own INFO calls excluded; the "
            "orchestrator's result polling included). A Redis command is far cheaper than an SQS HTTP request; this counts round "
            "trips, it does not compare cost.",
            "",
            "| storage | workload | steps | all commands | most frequent |",
            "|---|---|---:|---:|---|",
        ]
        for (storage, workload), records in sorted(
            self.redis_commands.items(), key=lambda kv: self._row_order((*kv[0], ""))
        ):
            steps = sum(r["steps"] for r in records)
            totals: dict[str, int] = {}
            for record in records:
                for command, n in record["counts"].items():
                    totals[command] = totals.get(command, 0) + n
            top = sorted(totals.items(), key=lambda kv: -kv[1])[:5]
            lines.append(
                f"| {storage} | {workload} | {steps // len(records)} | {sum(totals.values()) / steps:.1f} | "
                + ", ".join(f"{name.removeprefix('redis ')} {n / steps:.1f}" for name, n in top)
                + " |"
            )
        return lines

    def _report_requests(self) -> list[str]:
        if not self.requests:
            return []
        operations: list[str] = []
        for records in self.requests.values():
            for record in records:
                operations.extend(op for op in record["counts"] if op not in operations)
        # orchestrator first, then the worker's receives, its other calls, and S3 last
        operations.sort(
            key=lambda op: (
                not op.startswith("orchestrator"),
                "S3" in op,
                op.startswith("worker") and "Receive" not in op,
                op,
            )
        )
        lines = [
            "",
            "### SQS and S3 requests per step (taskiq, counted at the endpoint)",
            "",
            "A counting proxy in front of the local endpoint reads each HTTP request's head (X-Amz-Target or "
            "Action=; S3 method and path); the orchestrator and the worker use separate proxy ports. Requests "
            "from the start to the end of each timed measurement (idle long polls included), summed over the "
            "repeats, divided by their steps. There is no SQS baseline: dagster-celery talks to Redis, the "
            "in-process executors to nothing. Message bytes: the serialized step arguments each message "
            "carries (p50 / max).",
            "",
            "| storage | workload | steps | all requests | " + " | ".join(operations) + " | message bytes |",
            "|---|---|---:|---:|" + "---:|" * (len(operations) + 1),
        ]
        for (storage, workload), records in sorted(self.requests.items(), key=lambda kv: self._row_order((*kv[0], ""))):
            steps = sum(r["steps"] for r in records)
            totals = {op: sum(r["counts"].get(op, 0) for r in records) / steps for op in operations}
            cells = [f"{steps // len(records)}", f"{sum(totals.values()):.2f}"]
            cells += [f"{totals[op]:.3f}" if totals[op] else "-" for op in operations]
            sizes = sorted(self.payload_bytes.get((storage, workload), []))
            cells.append(f"{_pct(sizes, 50):.0f} / {sizes[-1]}" if sizes else "-")
            lines.append(f"| {storage} | {workload} | " + " | ".join(cells) + " |")
        return lines

    def _row_order(self, key: tuple[str, str, str]) -> tuple:
        storage, workload, contender = key
        return (
            STORAGES.index(storage) if storage in STORAGES else 9,
            self.opts.workloads.index(workload) if workload in self.opts.workloads else 99,
            workload,
            CONTENDERS.index(contender) if contender in CONTENDERS else 9,
        )

    def raw(self) -> dict[str, Any]:
        return {
            "measurements": [asdict(m) for m in self.measurements.values()],
            "segments": {f"{s}/{w}": v for (s, w), v in self.segments.items()},
            "memory": {f"{s}/{c}": v for (s, c), v in self.memory.items()},
            "several_runs": {f"{s}/{w}/{c}": v for (s, w, c), v in self.details.items()},
            "cpu": {f"{s}/{w}/{c}": v for (s, w, c), v in self.cpu.items()},
            "sqs_requests": {f"{s}/{w}": v for (s, w), v in self.requests.items()},
            "redis_commands": {f"{s}/{w}": v for (s, w), v in self.redis_commands.items()},
            "payload_bytes": {f"{s}/{w}": v for (s, w), v in self.payload_bytes.items()},
            "skipped": [{"workload": w, "contender": c, "why": why} for (w, c), why in self.skipped.items()],
            # derived from the above (recomputed, not read, by --include): each figure and its ratios
            "figures": self.figures(),
            "targets": self.targets(),
            "versions": _versions(),
        }

    def include(self, path: Path) -> None:
        """Results of an earlier invocation for storages this one does not run."""
        raw = json.loads(path.read_text())
        added = set()
        for m in raw["measurements"]:
            if m["storage"] not in self.opts.storages:
                self.measurements[(m["storage"], m["workload"], m["contender"])] = Measurement(**m)
                added.add(m["storage"])
        for key, value in raw.get("segments", {}).items():
            storage, workload = key.split("/", 1)
            if storage in added:
                self.segments[(storage, workload)] = value
        for key, value in raw.get("memory", {}).items():
            storage, contender = key.split("/", 1)
            if storage in added:
                self.memory[(storage, contender)] = value
        for name, target in (("several_runs", self.details), ("cpu", self.cpu)):
            for key, value in raw.get(name, {}).items():
                storage, rest = key.split("/", 1)
                workload, contender = rest.rsplit("/", 1)
                if storage in added:
                    target[(storage, workload, contender)] = value
        for name, target in (
            ("sqs_requests", self.requests),
            ("redis_commands", self.redis_commands),
            ("payload_bytes", self.payload_bytes),
        ):
            for key, value in raw.get(name, {}).items():
                storage, workload = key.split("/", 1)
                if storage in added:
                    target[(storage, workload)] = value
        for item in raw.get("skipped", []):
            self.skipped.setdefault((item["workload"], item["contender"]), item["why"])
        if not added:
            raise ValueError("it has no storage this invocation does not run")
        self.included.append((path, sorted(added)))
        self.opts.storages = tuple(sorted(set(self.opts.storages) | added, key=STORAGES.index))

    def save_progress(self) -> None:
        """Raw results so far, so a long run that is interrupted still leaves its numbers."""
        (self.workdir / "progress.json").write_text(json.dumps(self.raw(), indent=1))

    def write(self, out: Path, text: str) -> None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "benchmark.md").write_text("# Benchmark results (`bin/bench`)\n\n" + text)
        (out / "benchmark.json").write_text(json.dumps(self.raw(), indent=1))
        chart(self, out / "benchmark.png")
        self.log(f"\nwrote {out / 'benchmark.md'}, {out / 'benchmark.json'} and {out / 'benchmark.png'}")


def _pct(values: list[float], pct: float) -> float:
    if not values:
        return float("nan")
    index = min(len(values) - 1, max(0, round(pct / 100 * (len(values) - 1))))
    return values[index]


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in (
        "dagster",
        "dagster-taskiq-sync",
        "taskiq",
        "taskiq-aio-sqs",
        "dagster-celery",
        "celery",
        "dagster-postgres",
        "moto",
    ):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


def chart(bench: Bench, path: Path) -> None:
    """Grouped bars: median wall time per workload and contender, one panel per storage (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    storages = bench.opts.storages
    workloads = bench.opts.workloads
    width_per_panel = max(6.5, 1.1 * len(workloads))
    fig, axes = plt.subplots(1, len(storages), figsize=(width_per_panel * len(storages), 4.6), squeeze=False)
    width = 0.8 / len(bench.opts.contenders)
    for ax, storage in zip(axes[0], storages, strict=False):
        skipped_at = []
        for i, contender in enumerate(bench.opts.contenders):
            values = [
                bench.measurements[(storage, w, contender)].median
                if (storage, w, contender) in bench.measurements
                else float("nan")
                for w in workloads
            ]
            xs = [x + (i - (len(bench.opts.contenders) - 1) / 2) * width for x in range(len(workloads))]
            bars = ax.bar(xs, values, width, label=LABELS[contender])
            ax.bar_label(
                bars, labels=["" if v != v else f"{v:.1f}" if v >= 1 else f"{v:.2f}" for v in values], fontsize=7
            )
            skipped_at += [
                x for x, w, v in zip(xs, workloads, values, strict=True) if v != v and (w, contender) in bench.skipped
            ]
        ax.set_xticks(range(len(workloads)), workloads, rotation=20, ha="right")
        ax.set_yscale("log")
        for x in skipped_at:  # no bar to label: say so at the bottom of the panel
            ax.text(
                x, ax.get_ylim()[0] * 1.1, "skipped", rotation=90, ha="center", va="bottom", fontsize=7, color="grey"
            )
        ax.set_ylabel("wall time, s (median, log scale;\nseveral runs: until the last one ends)")
        ax.set_title(f"{storage} instance, concurrency {CONCURRENCY}")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bin/bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small workloads, one repeat: a smoke run (CI)")
    parser.add_argument("--repeats", type=int, help="timed runs per contender and workload (default 3; --quick 1)")
    parser.add_argument("--storages", default=",".join(STORAGES), help="comma-separated: sqlite,postgres")
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated: " + ",".join(CONTENDERS))
    parser.add_argument(
        "--workloads",
        help="comma-separated chain-N / fanout-N / fanout-N-sleep / runs-R-chain-N / "
        "backfill-N+chain-M, or runs-10 (= runs-10-chain-10), backfill+interactive "
        "(= backfill-1000+chain-5), backfill-small (= backfill-20+chain-3); a backfill's fanout-N and "
        "chain-M solo runs are added if not listed (default "
        + ",".join(FULL_WORKLOADS)
        + "; --quick "
        + ",".join(QUICK_WORKLOADS)
        + ")",
    )
    parser.add_argument(
        "--run-skipped",
        action="store_true",
        help=f"also run what is skipped by default (multiprocess on more than {MULTIPROCESS_MAX_STEPS} "
        f"steps per measurement; with --quick, more than {QUICK_MULTIPROCESS_MAX_STEPS})",
    )
    parser.add_argument(
        "--no-request-count",
        dest="count_requests",
        action="store_false",
        help="no counting proxy in front of the SQS endpoint (taskiq talks to it directly)",
    )
    parser.add_argument(
        "--include",
        metavar="RESULTS.json",
        action="append",
        default=[],
        help="also report the storages of an earlier invocation (its benchmark.json or progress.json) "
        "that this one did not run; each storage's ratios still come from one invocation (repeatable)",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: write the report, JSON and chart from the --include files",
    )
    parser.add_argument("--out", help="where benchmark.md/.json/.png go (default docs/; --quick: the work dir)")
    opts = parser.parse_args(argv)
    workloads_given = opts.workloads is not None
    opts.repeats = opts.repeats or (1 if opts.quick else 3)
    opts.workloads = tuple((opts.workloads or ",".join(QUICK_WORKLOADS if opts.quick else FULL_WORKLOADS)).split(","))
    opts.storages = tuple(opts.storages.split(","))
    opts.contenders = tuple(opts.contenders.split(","))
    workloads: list[str] = []
    for workload in opts.workloads:
        try:
            spec = workload_spec(workload)
        except ValueError as exc:
            parser.error(f"--workloads: {exc}")
        if spec.kind == "backfill":  # its runs' solo times come from these, in the same invocation
            for job in spec.jobs:
                if job not in opts.workloads and job not in workloads:
                    print(f"bin/bench: adding {job} (the solo run {workload} is compared with)", file=sys.stderr)
                    workloads.append(job)
        if workload not in workloads:
            workloads.append(workload)
    opts.workloads = tuple(workloads)
    for name, values, allowed in (
        ("--storages", opts.storages, STORAGES),
        ("--contenders", opts.contenders, CONTENDERS),
    ):
        unknown = [v for v in values if v not in allowed]
        if unknown or not values:
            parser.error(f"{name}: {', '.join(unknown) or 'nothing given'} not one of {', '.join(allowed)}")
    if opts.repeats < 1:
        parser.error("--repeats must be at least 1")

    if opts.report_only and not opts.include:
        parser.error("--report-only needs at least one --include RESULTS.json")
    workdir = Path(tempfile.mkdtemp(prefix="dagster-taskiq-bench-"))
    bench = Bench(opts, workdir)
    for workload in () if opts.report_only else opts.workloads:
        for contender in opts.contenders:
            reason = None if opts.run_skipped else skip_reason(contender, workload_spec(workload), opts.quick)
            if reason:
                bench.skipped[(workload, contender)] = reason
    if opts.report_only:
        bench.storages_run = ()
        opts.storages = ()
    for path in opts.include:
        try:
            bench.include(Path(path))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            parser.error(f"--include {path}: not a bin/bench results file ({exc})")
    if opts.report_only and not workloads_given:  # the included files' workloads, in their order
        opts.workloads = tuple(dict.fromkeys(m.workload for m in bench.measurements.values()))

    def on_signal(signum, _frame):  # stop every server and worker on Ctrl-C / SIGTERM too
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    bench.log(f"work dir {workdir} (logs of every server and worker)")
    try:
        if bench.storages_run:
            bench.start_brokers()
        for storage in bench.storages_run:
            bench.run_storage(storage)
    except (ServiceError, RuntimeError) as exc:
        print(f"bin/bench: {exc}", file=sys.stderr)
        return 1
    finally:
        bench.services.close()
        if bench.endpoint is not None:
            bench.endpoint.stop()
    text = bench.report()
    print("\n" + text)
    out = Path(opts.out) if opts.out else (workdir if opts.quick else ROOT / "docs")
    bench.write(out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
