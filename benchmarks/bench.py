"""bin/bench: taskiq_executor against dagster-celery, multiprocess and in_process, side by side.

One invocation sets up every contender on this machine (a local SQS endpoint and a
``dagster-taskiq-sync`` worker; Redis and a ``dagster-celery`` worker; nothing for Dagster's own
executors), runs the same jobs with the same total concurrency against the same Dagster instance
storage (sqlite in a temp DAGSTER_HOME, and PostgreSQL on loopback), and reports medians of
repeated runs as ratios, so the machine's speed cancels out. The orchestrator is this process:
each run is ``execute_job`` on a reconstructable job, timed from the call to its return.

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
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .orchestrator import SEGMENTS as SEGMENT_NAMES
from .services import BIN, ROOT, ServiceError, Services, postgres_server, redis_server, wait_until

CONTENDERS = ("taskiq", "celery", "multiprocess", "in_process")
LABELS = {
    "taskiq": "taskiq_executor (SQS)",
    "celery": "dagster-celery (Redis)",
    "multiprocess": "multiprocess_executor",
    "in_process": "in_process_executor",
}
FULL_WORKLOADS = ("chain-20", "fanout-100", "fanout-100-sleep")
QUICK_WORKLOADS = ("chain-3", "fanout-4", "fanout-4-sleep")
STORAGES = ("sqlite", "postgres")
CONCURRENCY = 4
# Labels of the links orchestrator.step_segments measures, in its order.
SEGMENTS = tuple(zip(SEGMENT_NAMES, (
    "ready -> message sent (orchestrator)",
    "sent -> received by a worker (SQS)",
    "received -> STEP_WORKER_STARTED (worker, step child)",
    "STEP_WORKER_STARTED -> STEP_START (Dagster step setup)",
    "STEP_START -> STEP_SUCCESS (op + outputs)",
    "STEP_SUCCESS -> seen by orchestrator (event log poll)",
)))


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
    """Peak RSS of a worker process and peak PSS of its whole process tree while a run goes on."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
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


# --- contenders -----------------------------------------------------------------------------------


class Orchestrator:
    """A contender's own orchestrating process (benchmarks/orchestrator.py), driven over pipes."""

    def __init__(self, services: Services, contender: str, home: Path, env: dict[str, str]) -> None:
        import subprocess

        from .services import _die_with_parent

        self.contender = contender
        self.log_path = services.workdir / f"orchestrator-{contender}-{home.name}.log"
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.orchestrator", contender, str(home)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env,
                                     cwd=ROOT, preexec_fn=_die_with_parent, text=True)
        log.close()
        services._procs.append((f"orchestrator-{contender}", self.proc))
        self._read(120)

    def _read(self, timeout: float) -> dict[str, Any]:
        import select

        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise ServiceError(f"the {self.contender} orchestrator did not answer within {timeout:g} s "
                               f"(exit code {self.proc.poll()}); see {self.log_path}")
        return json.loads(line)

    def run(self, workload: str, run_config: dict[str, Any], timeout: float = 900) -> dict[str, Any]:
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
        self.env.update({"AWS_ACCESS_KEY_ID": "local", "AWS_SECRET_ACCESS_KEY": "local",
                         "AWS_DEFAULT_REGION": "us-east-1", "PYTHONPATH": str(ROOT), "DAGSTER_DISABLE_TELEMETRY": "1",
                         "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"})
        os.environ.update({k: self.env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")})
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

    def log(self, message: str) -> None:
        print(message, flush=True)

    # -- shared infrastructure --

    def start_brokers(self) -> None:
        if "taskiq" in self.opts.contenders:
            from dagster_taskiq_sync.local_endpoint import LocalEndpoint

            self.endpoint = LocalEndpoint(log_path=str(self.workdir / "sqs-endpoint.log")).start()
            self.run_config["taskiq"] = {"execution": {"config": {
                "broker": self.endpoint.broker_url,
                "config_source": {"broker_transport_options": {"region": "us-east-1"},
                                  "task_default_queue": "bench"},
            }}}
            self._write_config("taskiq")
            self._cli(BIN / "dagster-taskiq-sync", "queues", "create", "-y", self.workdir / "taskiq.yaml")
            self.log(f"local SQS endpoint {self.endpoint.url}")
        if "celery" in self.opts.contenders:
            redis = redis_server(self.services)
            self.run_config["celery"] = {"execution": {"config": {
                "broker": f"{redis}/0", "backend": f"{redis}/1",
            }}}
            self._write_config("celery")
            self.log(f"redis {redis}")

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
                [BIN / "dagster-taskiq-sync", "worker", "start", "-y", self.workdir / "taskiq.yaml",
                 "-c", str(CONCURRENCY), "-n", "bench", "-i", "benchmarks.jobs"], env=env)
            wait_until(lambda: " ready: " in log.read_text(errors="replace"), proc, "taskiq worker", log)
            self.worker_pids["taskiq"] = proc.pid
            started.append(proc)
        if "celery" in self.opts.contenders:
            proc, log = self.services.spawn(
                f"celery-worker-{home.name}",
                [BIN / "dagster-celery", "worker", "start", "-A", "dagster_celery.app", "-y", self.workdir / "celery.yaml", "-n", "bench@%h",
                 "-i", "benchmarks.jobs", "--", "-c", str(CONCURRENCY), "--without-gossip", "--without-mingle"],
                env=env)
            wait_until(lambda: "ready." in log.read_text(errors="replace"), proc, "dagster-celery worker", log)
            self.worker_pids["celery"] = proc.pid
            started.append(proc)
        return started

    # -- runs --

    def run_once(self, orchestrator: Orchestrator, storage: str, workload: str, record: bool = True,
                 sample_memory: bool = False) -> float:
        contender = orchestrator.contender
        sampler = None
        if sample_memory and contender in self.worker_pids:
            sampler = MemorySampler(self.worker_pids[contender])
            sampler.start()
        answer = orchestrator.run(workload, self.run_config[contender])
        wall = answer["wall"]
        if sampler is not None:
            rss, pss = sampler.stop()
            previous = self.memory.get((storage, contender), {"worker_rss_mib": 0.0, "tree_pss_mib": 0.0})
            self.memory[(storage, contender)] = {
                "worker_rss_mib": max(previous["worker_rss_mib"], rss / 2**20),
                "tree_pss_mib": max(previous["tree_pss_mib"], pss / 2**20),
            }
        if not answer["success"]:
            raise RuntimeError(f"{contender} run {answer['run_id']} of {workload} on {storage} did not succeed; "
                               f"see its event log in {self.workdir}/home-{storage}")
        if record:
            key = (storage, workload, contender)
            self.measurements.setdefault(key, Measurement(storage, workload, contender)).walls.append(wall)
            if "segments" in answer:
                segments = self.segments.setdefault((storage, workload), {name: [] for name, _ in SEGMENTS})
                for name, values in answer["segments"].items():
                    segments[name].extend(values)
        return wall

    def run_storage(self, storage: str) -> None:
        home = self.make_home(storage)
        workers = self.start_workers(home)
        env = self.env | {"DAGSTER_HOME": str(home)}
        orchestrators = {c: Orchestrator(self.services, c, home, env) for c in self.opts.contenders}
        try:
            self.log(f"\n== {storage}: warm-up (untimed) ==")
            for contender in self.opts.contenders:
                for workload in self.opts.workloads:
                    if contender == "multiprocess" or (self.opts.quick and workload != self.opts.workloads[0]):
                        continue  # nothing stays warm between multiprocess runs (a process per step)
                    wall = self.run_once(orchestrators[contender], storage, workload, record=False)
                    self.log(f"  warm-up {workload:<18} {contender:<13} {wall:7.2f} s")
            self.log(f"== {storage}: {self.opts.repeats} repeat(s), contenders interleaved ==")
            for repeat in range(self.opts.repeats):
                for workload in self.opts.workloads:
                    for contender in self.opts.contenders:
                        memory = workload.startswith("fanout") and not workload.endswith("sleep")
                        wall = self.run_once(orchestrators[contender], storage, workload, sample_memory=memory)
                        self.log(f"  #{repeat + 1} {workload:<18} {contender:<13} {wall:7.2f} s")
                        self.save_progress()
        finally:
            for orchestrator in orchestrators.values():
                orchestrator.proc.stdin.close()
                self.services.stop(orchestrator.proc)
            for proc in workers:
                self.services.stop(proc)

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
            for workload, other, limit in ((chain, "celery", 0.3), (chain, "in_process", 2.5),
                                           (fanout, "celery", 0.6), (fanout, "multiprocess", 0.3)):
                value = self.ratio(storage, workload, "taskiq", other) if workload else None
                if value is not None:
                    rows.append({"storage": storage, "what": f"{workload}: taskiq / {other}", "value": value,
                                 "target": limit, "met": value <= limit})
            for workload in self.opts.workloads:
                seg = self.segments.get((storage, workload))
                if not seg or not seg["ready_to_sent"]:
                    continue
                overhead = [a + b for a, b in zip(seg["ready_to_sent"], seg["finish_to_seen"])]
                value = statistics.median(overhead) * 1000
                rows.append({"storage": storage, "what": f"{workload}: orchestrator overhead per step p50 (ms)",
                             "value": value, "target": 50.0, "met": value <= 50.0})
        return rows

    def report(self) -> str:
        lines = [f"Machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}; concurrency {CONCURRENCY}; "
                 f"{self.opts.repeats} repeat(s), median wall seconds of `execute_job` (min-max).", ""]
        versions = _versions()
        lines.append("Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
        for path, storages in self.included:
            lines += ["", f"{', '.join(storages)}: from the invocation that wrote {path.name} (all contenders side by "
                      "side in that one invocation; ratios never mix invocations)."]
        for storage in self.opts.storages:
            lines += ["", f"### {storage}", "",
                      "| workload | " + " | ".join(LABELS[c] for c in self.opts.contenders)
                      + " | taskiq / celery | taskiq / multiprocess | taskiq / in_process |",
                      "|---|" + "---:|" * (len(self.opts.contenders) + 3)]
            for workload in self.opts.workloads:
                cells = []
                for contender in self.opts.contenders:
                    m = self.measurements.get((storage, workload, contender))
                    cells.append(f"{m.median:.2f} ({min(m.walls):.2f}-{max(m.walls):.2f})" if m else "-")
                for other in ("celery", "multiprocess", "in_process"):
                    r = self.ratio(storage, workload, "taskiq", other)
                    cells.append(f"{r:.2f}x" if r is not None else "-")
                lines.append(f"| {workload} | " + " | ".join(cells) + " |")
        lines += ["", "### Targets", "", "| storage | ratio | measured | target | met |", "|---|---|---:|---:|---|"]
        for row in self.targets():
            lines.append(f"| {row['storage']} | {row['what']} | {row['value']:.2f} | <= {row['target']:g} | "
                         f"{'yes' if row['met'] else 'NO'} |")
        lines += ["", "### Where a taskiq step's time goes (ms, p50 / p95 over every step of every timed run)", "",
                  "| storage | workload | " + " | ".join(label for _, label in SEGMENTS) + " |",
                  "|---|---|" + "---:|" * len(SEGMENTS)]
        for (storage, workload), seg in sorted(self.segments.items()):
            cells = []
            for name, _ in SEGMENTS:
                values = sorted(seg[name])
                cells.append(f"{_pct(values, 50) * 1000:.0f} / {_pct(values, 95) * 1000:.0f}" if values else "-")
            lines.append(f"| {storage} | {workload} | " + " | ".join(cells) + " |")
        if self.memory:
            lines += ["", f"### Worker memory, {CONCURRENCY} threads/processes, fan-out run (MiB)", "",
                      "| storage | worker | peak RSS of the worker process | peak PSS of worker + children |",
                      "|---|---|---:|---:|"]
            for (storage, contender), mem in sorted(self.memory.items()):
                lines.append(f"| {storage} | {LABELS[contender]} | {mem['worker_rss_mib']:.0f} | {mem['tree_pss_mib']:.0f} |")
        return "\n".join(lines) + "\n"

    def raw(self) -> dict[str, Any]:
        return {
            "measurements": [asdict(m) for m in self.measurements.values()],
            "segments": {f"{s}/{w}": v for (s, w), v in self.segments.items()},
            "memory": {f"{s}/{c}": v for (s, c), v in self.memory.items()},
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
    for package in ("dagster", "dagster-taskiq-sync", "taskiq", "taskiq-aio-sqs", "dagster-celery", "celery",
                    "dagster-postgres", "moto"):
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
    fig, axes = plt.subplots(1, len(storages), figsize=(6.5 * len(storages), 4.2), squeeze=False)
    width = 0.8 / len(bench.opts.contenders)
    for ax, storage in zip(axes[0], storages):
        for i, contender in enumerate(bench.opts.contenders):
            values = [bench.measurements[(storage, w, contender)].median
                      if (storage, w, contender) in bench.measurements else 0 for w in bench.opts.workloads]
            xs = [x + (i - (len(bench.opts.contenders) - 1) / 2) * width for x in range(len(bench.opts.workloads))]
            bars = ax.bar(xs, values, width, label=LABELS[contender])
            ax.bar_label(bars, labels=[f"{v:.1f}" if v >= 1 else f"{v:.2f}" for v in values], fontsize=7)
        ax.set_xticks(range(len(bench.opts.workloads)), bench.opts.workloads)
        ax.set_yscale("log")
        ax.set_ylabel("run wall time, s (median, log scale)")
        ax.set_title(f"{storage} instance, concurrency {CONCURRENCY}")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bin/bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small workloads, one repeat: a smoke run (CI)")
    parser.add_argument("--repeats", type=int, help="timed runs per contender and workload (default 3; --quick 1)")
    parser.add_argument("--storages", default=",".join(STORAGES), help="comma-separated: sqlite,postgres")
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated: " + ",".join(CONTENDERS))
    parser.add_argument("--workloads", help="comma-separated chain-N / fanout-N / fanout-N-sleep (default "
                        + ",".join(FULL_WORKLOADS) + "; --quick " + ",".join(QUICK_WORKLOADS) + ")")
    parser.add_argument("--include", metavar="RESULTS.json", action="append", default=[],
                        help="also report the storages of an earlier invocation (its benchmark.json or progress.json) "
                        "that this one did not run; each storage's ratios still come from one invocation (repeatable)")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: write the report, JSON and chart from the --include files")
    parser.add_argument("--out", help="where benchmark.md/.json/.png go (default docs/; --quick: the work dir)")
    opts = parser.parse_args(argv)
    opts.repeats = opts.repeats or (1 if opts.quick else 3)
    opts.workloads = tuple((opts.workloads or ",".join(QUICK_WORKLOADS if opts.quick else FULL_WORKLOADS)).split(","))
    opts.storages = tuple(opts.storages.split(","))
    opts.contenders = tuple(opts.contenders.split(","))
    from .jobs import parse_workload

    for workload in opts.workloads:
        try:
            parse_workload(workload)
        except ValueError as exc:
            parser.error(f"--workloads: {exc}")
    for name, values, allowed in (("--storages", opts.storages, STORAGES), ("--contenders", opts.contenders, CONTENDERS)):
        unknown = [v for v in values if v not in allowed]
        if unknown or not values:
            parser.error(f"{name}: {', '.join(unknown) or 'nothing given'} not one of {', '.join(allowed)}")
    if opts.repeats < 1:
        parser.error("--repeats must be at least 1")

    if opts.report_only and not opts.include:
        parser.error("--report-only needs at least one --include RESULTS.json")
    workdir = Path(tempfile.mkdtemp(prefix="dagster-taskiq-bench-"))
    bench = Bench(opts, workdir)
    if opts.report_only:
        bench.storages_run = ()
        opts.storages = ()
    for path in opts.include:
        try:
            bench.include(Path(path))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            parser.error(f"--include {path}: not a bin/bench results file ({exc})")

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
