"""What bin/bench reads around a timed run besides its wall time: the worker's memory, CPU seconds
of process trees, SQS and S3 requests at a counting proxy (taskiq), Redis commands (celery)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from typing import Any

from .services import ROOT, ServiceError, Services, _die_with_parent

# --- memory ---------------------------------------------------------------------------------------


class MemorySampler(threading.Thread):
    """Peak RSS of a worker process and peak PSS of its whole process tree while a run goes on.

    Reading PSS walks every page table of the tree: at 20 reads a second the bench itself took
    ~15% of a core during a 6-minute fanout-1000, competing with the contenders on 2 cores; 5 a
    second still sees every step (each takes several hundred ms in a fan-out).

    A worker is not dumpable (README: Security model): reading its PSS takes root with
    CAP_SYS_PTRACE, and a sampler that could not read it says so rather than undercount."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        import psutil

        self.proc = psutil.Process(pid)
        self.interval = interval
        self.peak_rss = 0
        self.peak_tree_pss = 0
        self.unreadable: set[int] = set()  # pids whose PSS the kernel refused
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
                    except psutil.NoSuchProcess:
                        pass
                    except psutil.AccessDenied:
                        self.unreadable.add(proc.pid)
                self.peak_tree_pss = max(self.peak_tree_pss, total)
            except psutil.NoSuchProcess:
                return
            self.done.wait(self.interval)

    def stop(self) -> tuple[int, int]:
        self.done.set()
        self.join(5)
        if self.proc.pid in self.unreadable:
            raise RuntimeError(
                f"the PSS of worker pid {self.proc.pid} could not be read (workers are not dumpable); "
                "run the benchmark as root."
            )
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
    the endpoint down): one proxy port for the taskiq orchestrator, one for its worker; ``more``
    sides get ports whose requests are forwarded but not reported by :meth:`counts`."""

    SIDES = ("orchestrator", "worker")

    def __init__(self, services: Services, target_port: int, more: tuple[str, ...] = ()) -> None:
        log = open(services.workdir / "request-counter.log", "ab")
        command = [sys.executable, "-m", "benchmarks.request_counter", str(target_port), *self.SIDES, *more]
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
        """Requests so far of the taskiq contender's sides (``SIDES``), by side and operation."""
        self.proc.stdin.write("counts\n")
        self.proc.stdin.flush()
        counts = self._read()
        return {side: counts.get(side, {}) for side in self.SIDES}


def redis_commands(port: int) -> dict[str, dict[str, int]]:
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


# --- one timed run --------------------------------------------------------------------------------


class RunProbes:
    """Every reading of one timed run outside its orchestrating process, taken just before and
    just after it: CPU of the worker's, the broker server's and the counting proxy's process trees,
    the counting proxy's SQS and S3 requests (taskiq) and Redis' commands (celery)."""

    def __init__(
        self, worker_pid: int | None, broker_pid: int | None, counter: RequestCounter | None, redis_port: int | None
    ) -> None:
        self.worker_pid, self.broker_pid = worker_pid, broker_pid
        self.counter, self.redis_port = counter, redis_port
        self.counts_before: dict[str, dict[str, int]] | None = None
        self.counts_after: dict[str, dict[str, int]] | None = None
        self.redis_before: dict[str, dict[str, int]] | None = None
        self.redis_after: dict[str, dict[str, int]] | None = None
        self.cpu_before = self.cpu_after = (0.0, 0.0, 0.0)

    def _cpu(self) -> tuple[float, float, float]:
        counter = self.counter
        return (tree_cpu(self.worker_pid), tree_cpu(self.broker_pid), tree_cpu(counter.proc.pid) if counter else 0.0)

    def before(self) -> None:
        self.counts_before = self.counter.counts() if self.counter else None
        self.redis_before = redis_commands(self.redis_port) if self.redis_port else None
        self.cpu_before = self._cpu()

    def after(self) -> None:
        self.cpu_after = self._cpu()
        self.counts_after = self.counter.counts() if self.counter else None
        self.redis_after = redis_commands(self.redis_port) if self.redis_port else None

    def cpu(self, answer: dict[str, Any], contender: str, steps: int) -> dict[str, Any]:
        """CPU seconds of the run by part (None where a part does not apply to the contender)."""
        before, after = self.cpu_before, self.cpu_after
        return {
            "steps": steps,
            "orchestrator": answer["cpu"]["self"],
            # multiprocess_executor's step processes are the orchestrator's children
            "workers": (answer["cpu"]["children"] + (after[0] - before[0]) if contender != "in_process" else None),
            "broker": after[1] - before[1] if self.broker_pid else None,
            "request_counter": after[2] - before[2] if self.counter else None,
        }

    def requests(self) -> dict[str, int] | None:
        """SQS and S3 requests during the run, or None without a counting proxy."""
        if self.counts_before is None or self.counts_after is None:
            return None
        return count_difference(self.counts_after, self.counts_before)

    def redis(self) -> dict[str, int] | None:
        """Redis commands during the run, or None for a contender without Redis."""
        if self.redis_before is None or self.redis_after is None:
            return None
        return count_difference(self.redis_after, self.redis_before)
