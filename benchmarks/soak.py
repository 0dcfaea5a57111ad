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
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from .services import ROOT, ServiceError
from .soak_analysis import Analysis
from .soak_chaos import Chaos
from .soak_explain import Explainer
from .soak_fleet import READY_TIMEOUT, Fleet, Violations, log
from .soak_report import report_md
from .soak_runs import RunStream


class Soak:
    """The servers and workers, the run stream, the chaos and the checks at the end, in order."""

    def __init__(self, opts: argparse.Namespace, workdir: Path) -> None:
        self.opts = opts
        self.workdir = workdir
        self.markers = workdir / "markers"
        self.markers.mkdir()
        run_dir = workdir / "runs"
        run_dir.mkdir()
        self.violations = Violations()
        self.fleet = Fleet(workdir, self.violations)
        self.stream = RunStream(opts, random.Random(opts.seed), self.fleet, self.violations, self.markers, run_dir)
        self.chaos = Chaos(opts, random.Random(opts.seed * 7919 + 1), self.fleet, self.violations, self.markers)
        self.stop_supervising = threading.Event()
        self.t0 = time.time()  # the soak's start, for the +N s times of the report

    def setup(self, stack: contextlib.ExitStack) -> None:
        self.fleet.start_servers(stack)
        stack.callback(self.chaos.stop.set)
        stack.callback(self.stop_supervising.set)
        self.fleet.start_workers()

    def run(self) -> dict:
        started = time.time()
        until = started + self.opts.duration * 60
        plan = self.chaos.plan(started, until)
        log(
            f"soak for {self.opts.duration:g} min (seed {self.opts.seed}): {len(plan)} chaos events planned, "
            f"{self.opts.runs_at_once} runs at once; work dir {self.workdir}"
        )
        supervisor = threading.Thread(
            target=self.fleet.supervise, args=(self.stop_supervising,), name="supervisor", daemon=True
        )
        supervisor.start()
        chaos = threading.Thread(target=self.chaos.loop, args=(plan,), name="chaos", daemon=True)
        chaos.start()
        self.stream.stream(until)
        stream_end = time.time()
        self.chaos.stop.set()
        chaos.join(READY_TIMEOUT + 60)
        log("runs done; waiting for the queues to drain")
        drained = self.fleet.drain()
        self.stop_supervising.set()
        supervisor.join(READY_TIMEOUT + 10)
        queues = self.fleet.queue_counts()
        stops = self.fleet.stop_workers()
        rows = self.fleet.state_rows()
        explain = Explainer(self.chaos.events, self.t0, self.markers)
        analysis = Analysis(self.opts, self.fleet, self.stream.runs, self.chaos.events, self.violations, explain)
        return analysis.analyse(started, stream_end, drained, queues, stops, rows)


def _parser() -> argparse.ArgumentParser:
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
    return parser


def _options(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """The command line, checked, with its defaults filled in (--quick's, a random seed)."""
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
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = _options(_parser(), argv)
    for key, value in (
        ("AWS_ACCESS_KEY_ID", "local"),
        ("AWS_SECRET_ACCESS_KEY", "local"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ):
        os.environ.setdefault(key, value)  # this process reads the local endpoint's queues too
    workdir = Path(tempfile.mkdtemp(prefix="dagster-taskiq-soak-"))
    out_dir = Path(opts.out) if opts.out else (workdir if opts.quick else ROOT / "docs")
    soak = Soak(opts, workdir)
    wall = time.monotonic()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with contextlib.ExitStack() as stack:
        stack.callback(soak.fleet.spawner.shutdown, wait=True)
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
