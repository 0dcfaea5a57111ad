"""What bin/bench measured, and the figures derived from it: each timed run's wall time, step
segments, memory, CPU, requests and several-run details; ratios to the baselines, the targets;
saved as JSON (benchmark.json, progress.json) and read back by ``--include``."""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .bench_plan import BASELINES, CLI_WORKER, CONTENDERS, EMBEDDED, EMBEDDED_TARGET, SEGMENTS, STORAGES
from .bench_probes import RunProbes
from .jobs import workload_spec


@dataclass
class Measurement:
    storage: str
    workload: str
    contender: str
    walls: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.walls)


class Results:
    """Every figure of one invocation (and of the ``--include``\\ d ones), keyed by storage,
    workload and contender."""

    def __init__(self, opts: argparse.Namespace) -> None:
        self.opts = opts
        self.included: list[tuple[Path, list[str]]] = []
        self.measurements: dict[tuple[str, str, str], Measurement] = {}
        self.segments: dict[tuple[str, str], dict[str, list[float]]] = {}
        self.memory: dict[tuple[str, str], dict[str, float]] = {}
        # (storage, workload, contender) -> one dict per timed measurement
        self.details: dict[tuple[str, str, str], list[dict[str, Any]]] = {}  # several-run workloads
        self.cpu: dict[tuple[str, str, str], list[dict[str, float]]] = {}
        self.requests: dict[tuple[str, str], list[dict[str, Any]]] = {}  # taskiq only
        self.redis_commands: dict[tuple[str, str], list[dict[str, Any]]] = {}  # celery only
        self.payload_bytes: dict[tuple[str, str], list[int]] = {}  # taskiq only
        self.skipped: dict[tuple[str, str], str] = {}  # (workload, contender) -> why
        # storage -> its invocation's provenance (bench_summary.invocation_started)
        self.invocations: dict[str, dict[str, Any]] = {}

    # -- recording --

    def record_memory(self, storage: str, contender: str, rss: int, pss: int) -> None:
        previous = self.memory.get((storage, contender), {"worker_rss_mib": 0.0, "tree_pss_mib": 0.0})
        self.memory[(storage, contender)] = {
            "worker_rss_mib": max(previous["worker_rss_mib"], rss / 2**20),
            "tree_pss_mib": max(previous["tree_pss_mib"], pss / 2**20),
        }

    def record(self, storage: str, workload: str, contender: str, answer: dict[str, Any], probes: RunProbes) -> None:
        """One timed measurement: the orchestrator's answer and the readings around it."""
        spec = workload_spec(workload)
        key = (storage, workload, contender)
        self.measurements.setdefault(key, Measurement(storage, workload, contender)).walls.append(answer["wall"])
        if "segments" in answer:
            segments = self.segments.setdefault((storage, workload), {name: [] for name, _ in SEGMENTS})
            for name, values in answer["segments"].items():
                segments.setdefault(name, []).extend(values)
        if "interactive_segments" in answer:  # a backfill's interactive run, apart from the backfill's steps
            segments = self.segments.setdefault(
                (storage, f"{workload} (interactive run)"), {name: [] for name, _ in SEGMENTS}
            )
            for name, values in answer["interactive_segments"].items():
                segments.setdefault(name, []).extend(values)
        if "payload_bytes" in answer:
            self.payload_bytes.setdefault((storage, workload), []).extend(answer["payload_bytes"])
        self.cpu.setdefault(key, []).append(probes.cpu(answer, contender, spec.steps))
        if spec.kind != "single":
            self.details.setdefault(key, []).append(
                {
                    "steps": spec.steps,
                    "makespan": answer["wall"],
                    "walls": answer["walls"],
                    **answer.get("backfill", {}),
                }
            )
        requests = probes.requests()
        if requests is not None:
            self.requests.setdefault((storage, workload), []).append({"steps": spec.steps, "counts": requests})
        redis = probes.redis()
        if redis is not None:
            self.redis_commands.setdefault((storage, workload), []).append({"steps": spec.steps, "counts": redis})

    # -- figures --

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
            big_fanout = "fanout-1000" if "fanout-1000" in self.opts.workloads else None
            for workload, other, limit in (
                (chain, "celery", 0.3),
                (chain, "in_process", 1.5),  # issue 20
                (fanout, "celery", 0.6),
                (fanout, "multiprocess", 0.3),
                (big_fanout, "in_process", 1.0),  # issue 20
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
            per_step = self.sqs_requests_per_step(storage, big_fanout) if big_fanout else None
            if per_step is not None:  # issue 20: the 1000-way fan-out's SQS requests per step
                rows.append(
                    {
                        "storage": storage,
                        "what": f"{big_fanout}: taskiq SQS requests per step (counted at the endpoint)",
                        "value": per_step,
                        "target": 1.4,
                        "met": per_step <= 1.4,
                    }
                )
            rows += self._embedded_targets(storage)
            rows += self._backfill_targets(storage)
            rows += self._overhead_targets(storage)
        return rows

    def _backfill_targets(self, storage: str) -> list[dict[str, Any]]:
        """Issue 20's: the interactive run <= 1.5x its solo time during a backfill, the backfill
        no more than 10% slower for it (taskiq, backfill-N+chain-M workloads)."""
        limits = {"interactive_slowdown": 1.5, "backfill_slowdown": 1.1}
        rows = []
        for workload in self.opts.workloads:
            if workload_spec(workload).kind != "backfill":
                continue
            for name, label, figure, _ in self.backfill_figures():
                value = figure(storage, workload, "taskiq") if name in limits else None
                if value is not None:
                    rows.append(
                        {
                            "storage": storage,
                            "what": f"{workload}: taskiq {label}",
                            "value": value,
                            "target": limits[name],
                            "met": value <= limits[name],
                        }
                    )
        return rows

    def embedded_ratio(self, storage: str) -> tuple[float, list[str]] | None:
        """The embedded worker's wall time over the CLI worker's, summed over every workload both
        measured on ``storage`` (one figure: single small runs are too noisy one by one), and
        those workloads; None if there is none."""
        both = [
            w
            for w in self.opts.workloads
            if (storage, w, EMBEDDED) in self.measurements and (storage, w, CLI_WORKER) in self.measurements
        ]
        if not both:
            return None
        embedded = sum(self.measurements[(storage, w, EMBEDDED)].median for w in both)
        cli = sum(self.measurements[(storage, w, CLI_WORKER)].median for w in both)
        return embedded / cli, both

    def _embedded_targets(self, storage: str) -> list[dict[str, Any]]:
        found = self.embedded_ratio(storage)
        if found is None:
            return []
        value, workloads = found
        what = f"{len(workloads)} workload(s), summed: taskiq embedded worker / CLI worker"
        return [
            {
                "storage": storage,
                "what": what,
                "value": value,
                "target": EMBEDDED_TARGET,
                "met": value <= EMBEDDED_TARGET,
            }
        ]

    def _overhead_targets(self, storage: str) -> list[dict[str, Any]]:
        rows = []
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

    def contenders_in(self, storage: str) -> list[str]:
        return [c for c in CONTENDERS if any(k[0] == storage and k[2] == c for k in self.measurements)]

    def wall(self, storage, workload, contender):
        m = self.measurements.get((storage, workload, contender))
        return m.median if m else None

    def detail(self, key):
        """A figure of several-run workloads: the median over repeats of ``key(detail)``."""

        def figure(storage, workload, contender):
            values = [key(d) for d in self.details.get((storage, workload, contender), [])]
            values = [v for v in values if v is not None]
            return statistics.median(values) if values else None

        return figure

    def solo(self, index: int):
        """Median solo wall of a backfill workload's run ``index`` (0: the fan-out, 1: the chain)."""

        def figure(storage, workload, contender):
            m = self.measurements.get((storage, workload_spec(workload).jobs[index], contender))
            return m.median if m else None

        return figure

    def runs_figures(self) -> list[tuple]:
        """(JSON name, report label, figure, digits) of runs-R-chain-N workloads."""
        return [
            ("all_runs_done_s", "all runs done (s)", self.detail(lambda d: d["makespan"]), 2),
            ("runs_per_min", "runs/min", self.detail(lambda d: 60 * len(d["walls"]) / d["makespan"]), 1),
            ("steps_per_s", "steps/s", self.detail(lambda d: d["steps"] / d["makespan"]), 2),
            ("slowest_run_s", "slowest run (s)", self.detail(lambda d: max(d["walls"])), 2),
            ("median_run_s", "median run (s)", self.detail(lambda d: statistics.median(d["walls"])), 2),
        ]

    def backfill_figures(self) -> list[tuple]:
        """(JSON name, report label, figure, digits) of backfill-N+chain-M workloads."""
        small_during = self.detail(lambda d: d["walls"][1])
        big_during = self.detail(lambda d: d["walls"][0])
        small_solo, big_solo = self.solo(1), self.solo(0)

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

    def cpu_figure(self, part: str):
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

    def figures(self) -> list[dict[str, Any]]:
        """Every figure of the report with its ratios to the baselines, for benchmark.json."""
        rows = []
        keys = sorted({*self.measurements, *self.cpu}, key=self.row_order)
        for storage, workload, contender in keys:
            kind = workload_spec(workload).kind
            named = [("wall_s", self.wall)]
            named += [
                (f"cpu_ms_per_step_{part}", self.cpu_figure(part))
                for part in ("orchestrator", "workers", "broker", "total")
            ]
            if kind == "runs":
                named += [(name, fig) for name, _, fig, _ in self.runs_figures()]
            if kind == "backfill":
                named += [(name, fig) for name, _, fig, _ in self.backfill_figures()]
            for name, fig in named:
                value = fig(storage, workload, contender)
                if value is None:
                    continue
                row = {"storage": storage, "workload": workload, "contender": contender, "figure": name, "value": value}
                for base in BASELINES:
                    other = fig(storage, workload, base)
                    row[f"ratio_to_{base}"] = value / other if other else None
                rows.append(row)
        return rows + self._request_figures()

    def sqs_requests_per_step(self, storage: str, workload: str) -> float | None:
        """SQS requests (not S3) counted at the endpoint per step of ``workload``, over its repeats."""
        records = self.requests.get((storage, workload))
        if not records:
            return None
        steps = sum(r["steps"] for r in records)
        return sum(n for r in records for op, n in r["counts"].items() if " SQS " in f" {op} ") / steps

    def _request_figures(self) -> list[dict[str, Any]]:
        rows = []
        for (storage, workload), records in sorted(self.requests.items(), key=lambda kv: self.row_order((*kv[0], ""))):
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

    def row_order(self, key: tuple[str, str, str]) -> tuple:
        storage, workload, contender = key
        return (
            STORAGES.index(storage) if storage in STORAGES else 9,
            self.opts.workloads.index(workload) if workload in self.opts.workloads else 99,
            workload,
            CONTENDERS.index(contender) if contender in CONTENDERS else 9,
        )

    # -- JSON --

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
            "invocations": self.invocations,
            # derived from the above (recomputed, not read, by --include): each figure and its ratios
            "figures": self.figures(),
            "targets": self.targets(),
            "versions": versions(),  # the writing process's; each storage's measuring one is in invocations
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
        for storage in added:  # an older file has no provenance but the versions it was written with
            self.invocations[storage] = raw.get("invocations", {}).get(storage) or {"versions": raw.get("versions")}
        for item in raw.get("skipped", []):
            self.skipped.setdefault((item["workload"], item["contender"]), item["why"])
        if not added:
            raise ValueError("it has no storage this invocation does not run")
        self.included.append((path, sorted(added)))
        self.opts.storages = tuple(sorted(set(self.opts.storages) | added, key=STORAGES.index))

    def save_progress(self, workdir: Path) -> None:
        """Raw results so far, so a long run that is interrupted still leaves its numbers."""
        (workdir / "progress.json").write_text(json.dumps(self.raw(), indent=1))


def versions() -> dict[str, str]:
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
