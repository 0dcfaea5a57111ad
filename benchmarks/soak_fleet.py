"""bin/soak's servers and workers: a PostgreSQL instance, a local SQS endpoint behind a pausable
proxy, the soak's queues, and two ``dagster-taskiq-sync worker start`` processes restarted as a
supervisor would. Also what every part of the soak shares: its log line and its violations."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .services import BIN, ROOT, ServiceError, Services
from .soak_logs import LABEL_RE

CLI = str(BIN / "dagster-taskiq-sync")
QUEUES = ("soak_a", "soak_b")
# name -> queues; one worker serves both queues, one serves only the first
WORKERS = {"soak-1": ("soak_a", "soak_b"), "soak-2": ("soak_a",)}
CONCURRENCY = 2
HEARTBEAT = 2  # --heartbeat-interval: worker_lost_timeout (10) is 5 heartbeats
EXECUTOR = {"health_check_interval": 1, "worker_lost_timeout": 10}
VISIBILITY = 10
WAIT_TIME = 1
MAX_RECEIVE = 5
READY_TIMEOUT = 180.0  # a restarted worker that is not ready by then "did not come back"
PER_ATTEMPT_KINDS = ("step", "queued", "cancel", "probe")


def log(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def tail(path: Path | None, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path else "(no log)"
    except OSError:
        return "(no log)"


class Violations:
    def __init__(self) -> None:
        self.items: list[dict] = []
        self._lock = threading.Lock()

    def add(self, kind: str, what: str, **details: Any) -> None:
        with self._lock:
            self.items.append({"kind": kind, "what": what, **details})
        log(f"VIOLATION ({kind}): {what}")


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


class Fleet:
    def __init__(self, workdir: Path, violations: Violations) -> None:
        self.workdir = workdir
        self.violations = violations
        self.services = Services(workdir)
        self.spawner = ThreadPoolExecutor(1, thread_name_prefix="soak-spawner")  # PDEATHSIG: one long-lived thread
        self.slots = {name: WorkerSlot(name, queues) for name, queues in WORKERS.items()}
        self.env: dict[str, str] = {}
        self.config_path = workdir / "executor.yaml"
        self.endpoint = self.proxy = self.pg = None
        self.home = workdir / "dagster_home"

    # --- set-up -------------------------------------------------------------------------------

    def spawn(self, name: str, command: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, Path]:
        return self.spawner.submit(self.services.spawn, name, command, env).result()

    def start_servers(self, stack: contextlib.ExitStack) -> None:
        """PostgreSQL, the SQS endpoint and its proxy; ``stack`` stops the workers, then them."""
        from dagster_taskiq_sync.ops.local_endpoint import LocalEndpoint

        from .local_sqs import PausableProxy
        from .postgres import PostgresCluster, PostgresUnavailable

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

    def start_workers(self) -> None:
        """The executor config, the queues, and every worker, ready."""
        from dagster_taskiq_sync.ops.local_endpoint import aws_env

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
        self._create_queues()
        for slot in self.slots.values():
            self.start_worker(slot)
        for slot in self.slots.values():
            if not self.wait_ready(slot, 0):
                raise ServiceError(f"worker {slot.name} not ready; its log:\n{tail(slot.log)}")

    def _create_queues(self) -> None:
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

    # --- workers ------------------------------------------------------------------------------

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

    def forget(self, *procs: subprocess.Popen) -> None:
        """Ended processes (a killed or exited worker's): not for :meth:`Services.close` to stop."""
        self.services._procs = [(n, p) for n, p in self.services._procs if all(p is not q for q in procs)]

    def supervise(self, stop: threading.Event) -> None:
        """Restart a worker that exited by itself (not by chaos), as a supervisor would, and say so."""
        while not stop.wait(1.0):
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
                    self.forget(slot.proc)
                    offset = self.start_worker(slot)
                    if not self.wait_ready(slot, offset):
                        self.violations.add(
                            "worker-not-back", f"worker {slot.name} did not come back after exiting", worker=slot.name
                        )
                finally:
                    slot.lock.release()

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
        self.forget(*(s.proc for s in self.slots.values()))
        return codes

    # --- what is left at the end --------------------------------------------------------------

    def queue_counts(self) -> dict[str, tuple[int, int]]:
        from .local_sqs import queue_counts

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

    def state_rows(self) -> dict[str, Any]:
        db = yaml.safe_load((self.home / "dagster.yaml").read_text())["storage"]["postgres"]["postgres_db"]["db_name"]
        out = self.pg.psql("SELECT key, value FROM kvs WHERE key LIKE 'dagster-taskiq-sync/%' ORDER BY id", db)
        rows = [line.split("|", 1) for line in out.splitlines() if line.strip()]
        kinds = Counter(key.split("/")[1] for key, _ in rows)
        per_attempt = [
            {"key": key, "value": value[:300]} for key, value in rows if key.split("/")[1] in PER_ATTEMPT_KINDS
        ]
        return {"total": len(rows), "by_kind": dict(sorted(kinds.items())), "per_attempt_rows": per_attempt}

    def peek(self, queue: str) -> list[dict]:
        """What is left on a queue (received with visibility 0: nothing is consumed)."""
        from .local_sqs import sqs_client

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
