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
import signal
import sys
import tempfile
from pathlib import Path

from .bench_fleet import Fleet
from .bench_plan import (
    CONTENDERS,
    FULL_WORKLOADS,
    MULTIPROCESS_MAX_STEPS,
    QUICK_MULTIPROCESS_MAX_STEPS,
    QUICK_WORKLOADS,
    STORAGES,
    log,
    skip_reason,
)
from .bench_report import Report, write
from .bench_results import Results
from .bench_runner import Runner
from .bench_summary import invocation_ended, invocation_started, write_readme, writes_readme
from .jobs import workload_spec
from .services import ROOT, ServiceError


def _parser() -> argparse.ArgumentParser:
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
    parser.add_argument(
        "--out",
        help="where benchmark.md/.json/.png go (default docs/; --quick: the work dir); writing docs/ "
        "also rewrites the summary block of README.md's Benchmark section (never with --quick)",
    )
    return parser


def _options(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """The command line, checked, with its defaults filled in (``workloads_given``: --workloads was)."""
    opts = parser.parse_args(argv)
    opts.workloads_given = opts.workloads is not None
    opts.repeats = opts.repeats or (1 if opts.quick else 3)
    opts.workloads = tuple((opts.workloads or ",".join(QUICK_WORKLOADS if opts.quick else FULL_WORKLOADS)).split(","))
    opts.storages = tuple(opts.storages.split(","))
    opts.contenders = tuple(opts.contenders.split(","))
    opts.workloads = _with_solo_runs(parser, opts.workloads)
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
    return opts


def _with_solo_runs(parser: argparse.ArgumentParser, given: tuple[str, ...]) -> tuple[str, ...]:
    """The workloads, each backfill preceded by its runs' solo workloads where not given."""
    workloads: list[str] = []
    for workload in given:
        try:
            spec = workload_spec(workload)
        except ValueError as exc:
            parser.error(f"--workloads: {exc}")
        if spec.kind == "backfill":  # its runs' solo times come from these, in the same invocation
            for job in spec.jobs:
                if job not in given and job not in workloads:
                    print(f"bin/bench: adding {job} (the solo run {workload} is compared with)", file=sys.stderr)
                    workloads.append(job)
        if workload not in workloads:
            workloads.append(workload)
    return tuple(workloads)


def _results(parser: argparse.ArgumentParser, opts: argparse.Namespace) -> Results:
    """What is skipped by default, and the --include files' results."""
    results = Results(opts)
    for workload in () if opts.report_only else opts.workloads:
        for contender in opts.contenders:
            reason = None if opts.run_skipped else skip_reason(contender, workload_spec(workload), opts.quick)
            if reason:
                results.skipped[(workload, contender)] = reason
    if opts.report_only:
        opts.storages = ()
    for path in opts.include:
        try:
            results.include(Path(path))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            parser.error(f"--include {path}: not a bin/bench results file ({exc})")
    if opts.report_only and not opts.workloads_given:  # the included files' workloads, in their order
        opts.workloads = tuple(dict.fromkeys(m.workload for m in results.measurements.values()))
    return results


def report_results(include: list[str]) -> Results:
    """The Results ``--report-only --include FILE ...`` reports (what tests/unit/test_bench_docs.py
    renders the README's block from)."""
    parser = _parser()
    opts = _options(parser, ["--report-only", *(arg for path in include for arg in ("--include", path))])
    return _results(parser, opts)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = _parser()
    opts = _options(parser, argv)
    workdir = Path(tempfile.mkdtemp(prefix="dagster-taskiq-bench-"))
    fleet = Fleet(opts, workdir)
    storages_run: tuple[str, ...] = () if opts.report_only else tuple(opts.storages)
    results = _results(parser, opts)
    runner = Runner(opts, workdir, fleet, results)

    def on_signal(signum, _frame):  # stop every server and worker on Ctrl-C / SIGTERM too
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    log(f"work dir {workdir} (logs of every server and worker)")
    try:
        if storages_run:
            fleet.start_brokers()
        for storage in storages_run:
            results.invocations[storage] = invocation_started(argv, ROOT)
            runner.run_storage(storage)
            invocation_ended(results.invocations[storage])
    except (ServiceError, RuntimeError) as exc:
        print(f"bin/bench: {exc}", file=sys.stderr)
        return 1
    finally:
        fleet.close()
    text = Report(results).text()
    print("\n" + text)
    out = Path(opts.out) if opts.out else (workdir if opts.quick else ROOT / "docs")
    write(results, out, text)
    if writes_readme(out, opts.quick, ROOT):
        try:
            write_readme(results, ROOT / "README.md")
        except ValueError as exc:
            print(f"bin/bench: {exc}", file=sys.stderr)
            return 1
        log(f"rewrote the summary block of {ROOT / 'README.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
