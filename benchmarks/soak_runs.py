"""bin/soak's stream of runs: ``--runs-at-once`` ``dagster job execute`` processes at a time, each
a random soak job with random op sleeps, killed if it outlives ``--run-timeout``."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .services import BIN, ROOT
from .soak_fleet import Fleet, Violations, log

DAGSTER = str(BIN / "dagster")
JOBS_FILE = ROOT / "benchmarks" / "soak_jobs.py"


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


class RunStream:
    def __init__(
        self,
        opts: argparse.Namespace,
        rng: random.Random,
        fleet: Fleet,
        violations: Violations,
        markers: Path,
        run_dir: Path,
    ) -> None:
        self.opts = opts
        self.rng = rng
        self.fleet = fleet
        self.violations = violations
        self.markers = markers
        self.run_dir = run_dir
        self.runs: list[RunProc] = []

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
            str(self.fleet.config_path),
            "-c",
            str(cfg),
            "--tags",
            json.dumps({"soak/seq": str(seq)}),
        ]
        proc, path = self.fleet.spawn(f"runs/run-{seq:04d}", command, self.fleet.env)
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
                if self._ended(run, now):
                    active.remove(run)
            if now < until and len(active) < self.opts.runs_at_once and now >= next_launch:
                seq += 1
                active.append(self.launch(seq))
                next_launch = now + self.rng.uniform(0.5, 3.0)  # staggered, not in lock-step
            if now >= until and not active:
                return
            time.sleep(0.2)

    def _ended(self, run: RunProc, now: float) -> bool:
        """Whether ``run`` has ended (its orchestrator killed if it has been going too long)."""
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
            log(f"run #{run.seq} ({run.job}) ended: exit code {code} after {run.end - run.start:.0f} s")
            return True
        return False
