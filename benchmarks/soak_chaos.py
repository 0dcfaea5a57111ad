"""bin/soak's chaos: at random times, SIGKILL a worker (and check its step processes die with it,
then restart it), cut the SQS endpoint for a while, or restart PostgreSQL."""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .soak_fleet import READY_TIMEOUT, Fleet, Violations, WorkerSlot, log, tail

SQS_PAUSE = 10.0
PG_DOWN = (2.0, 8.0)  # seconds PostgreSQL stays down in a restart
CHAOS_KINDS = ("kill", "sqs_pause", "pg_restart")
ORPHAN_GRACE = 15.0  # seconds a killed worker's step processes get to die with it


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


class Chaos:
    def __init__(
        self, opts: argparse.Namespace, rng: random.Random, fleet: Fleet, violations: Violations, markers: Path
    ) -> None:
        self.opts = opts
        self.rng = rng
        self.fleet = fleet
        self.violations = violations
        self.markers = markers
        self.events: list[ChaosEvent] = []
        self.stop = threading.Event()

    def plan(self, start: float, until: float) -> list[tuple[float, str]]:
        """When and what: random gaps; --quick has one event of each kind, in random order."""
        rng = self.rng
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

    def loop(self, plan: list[tuple[float, str]]) -> None:
        for at, kind in plan:
            while time.time() < at:
                if self.stop.wait(min(0.5, max(0.0, at - time.time()))):
                    return
            try:
                getattr(self, f"chaos_{kind}")()
            except Exception as exc:
                self.violations.add("soak-error", f"chaos event {kind} failed: {type(exc).__name__}: {exc}")

    # --- kill ---------------------------------------------------------------------------------

    def chaos_kill(self) -> None:
        import psutil

        # A random worker, preferring those running user code (a kill mid-step is the interesting one).
        busy = sorted(self.busy_workers())
        name = self.rng.choice(busy or sorted(self.fleet.slots))
        slot = self.fleet.slots[name]
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
            self.events.append(event)
            self._check_children_die(event, slot, tree[1:])
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(slot.pid, signal.SIGKILL)  # what a supervisor's cgroup kill would do
            self.fleet.forget(slot.proc)
            time.sleep(self.rng.uniform(1.0, 2.0))  # the supervisor's restart delay
            self._restart(event, slot)
            event.end = time.time()

    def _check_children_die(self, event: ChaosEvent, slot: WorkerSlot, alive: list[int]) -> None:
        """Its step processes watch the worker's pid and must die with it."""
        deadline = time.monotonic() + ORPHAN_GRACE
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
                f"{len(alive)} process(es) of worker {slot.name} (pid {slot.pid}) were still "
                f"alive {ORPHAN_GRACE:g} s after its SIGKILL: {event.orphans}",
                worker=slot.name,
                pid=slot.pid,
            )

    def _restart(self, event: ChaosEvent, slot: WorkerSlot) -> None:
        offset = self.fleet.start_worker(slot)
        if self.fleet.wait_ready(slot, offset):
            event.back_after = time.time() - event.start
            log(f"chaos: worker {slot.name} back (incarnation {slot.incarnation}) after {event.back_after:.1f} s")
        else:
            self.violations.add(
                "worker-not-back",
                f"worker {slot.name} did not come back within {READY_TIMEOUT:g} s "
                f"of its restart; its log ends:\n{tail(slot.log)}",
                worker=slot.name,
            )

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
        current = {f"{s.name}#{s.incarnation}": s.name for s in self.fleet.slots.values()}
        return {current[w] for w in open_starts.values() if w in current}

    # --- SQS and PostgreSQL -------------------------------------------------------------------

    def chaos_sqs_pause(self) -> None:
        event = ChaosEvent("sqs_pause", time.time())
        log(f"chaos: SQS endpoint paused for {SQS_PAUSE:g} s")
        self.fleet.proxy.pause()
        self.events.append(event)
        time.sleep(SQS_PAUSE)
        self.fleet.proxy.resume()
        event.end = time.time()
        log("chaos: SQS endpoint back")

    def chaos_pg_restart(self) -> None:
        event = ChaosEvent("pg_restart", time.time())
        log("chaos: restarting PostgreSQL")
        self.events.append(event)
        self.fleet.pg.stop()
        # Down for a few seconds, as a real restart or a managed database's reboot is (a bare stop and
        # start of this fsync-off cluster takes 0.3 s, too short to be in anyone's way).
        time.sleep(self.rng.uniform(*PG_DOWN))
        self.fleet.pg.start()
        event.end = time.time()
        log(f"chaos: PostgreSQL back after {event.end - event.start:.1f} s")


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
