"""bin/bench's report: benchmark.md (the tables), benchmark.json (every figure) and benchmark.png
(the wall times, one panel per storage)."""

from __future__ import annotations

import json
from pathlib import Path

from .bench_plan import BASELINES, CLI_WORKER, CONCURRENCY, EMBEDDED, LABELS, RUN_EDGES, SEGMENTS, log
from .bench_results import Results
from .bench_summary import provenance
from .jobs import job_steps, workload_spec


class Report:
    def __init__(self, results: Results) -> None:
        self.results = results
        self.opts = results.opts

    def text(self) -> str:
        lines = self._header()
        for storage in self.opts.storages:
            lines += self._walls(storage)
        lines += self._notes()
        lines += self.report_runs() + self.report_backfill()
        lines += self._targets()
        lines += self._segments()
        lines += self.report_cpu() + self.report_requests()
        lines += self._memory()
        return "\n".join(lines) + "\n"

    # -- the main table and what goes with it --

    def _header(self) -> list[str]:
        # The repeats of what is reported (an included invocation's, with --report-only).
        counts = sorted({len(m.walls) for m in self.results.measurements.values()}) or [self.opts.repeats]
        repeats = "-".join(str(n) for n in (counts[0], counts[-1]) if n) if counts[0] != counts[-1] else str(counts[0])
        lines = [
            f"Concurrency {CONCURRENCY}; {repeats} repeat(s), median wall seconds of `execute_job` (min-max).",
            "",
            "Measured by (`unknown`: an older results file did not record it):",
            "",
        ]
        lines += [f"- {provenance(self.results, storage)}" for storage in self.opts.storages]
        groups: dict[str, list[str]] = {}  # storages measured with the same versions share a line
        for storage in self.opts.storages:
            found = self.results.invocations.get(storage, {}).get("versions")
            text = ", ".join(f"{k} {v}" for k, v in found.items()) if found else "unknown"
            groups.setdefault(text, []).append(storage)
        lines += [f"\nVersions ({', '.join(storages)}): {text}" for text, storages in groups.items()]
        for path, storages in self.results.included:
            lines += [
                "",
                f"{', '.join(storages)}: from the invocation that wrote {path.name} (all contenders side by "
                "side in that one invocation; ratios never mix invocations).",
            ]
        return lines

    def _walls(self, storage: str) -> list[str]:
        # (numerator, denominator, column title) of the ratio columns
        ratios = [(CLI_WORKER, other, f"taskiq / {other}") for other in ("celery", "multiprocess", "in_process")]
        if EMBEDDED in self.opts.contenders:
            ratios.append((EMBEDDED, CLI_WORKER, "embedded / CLI worker"))
        lines = [
            "",
            f"### {storage}",
            "",
            "| workload | "
            + " | ".join(LABELS[c] for c in self.opts.contenders)
            + " | "
            + " | ".join(title for _, _, title in ratios)
            + " |",
            "|---|" + "---:|" * (len(self.opts.contenders) + len(ratios)),
        ]
        for workload in self.opts.workloads:
            cells = []
            for contender in self.opts.contenders:
                m = self.results.measurements.get((storage, workload, contender))
                skipped = "skipped" if (workload, contender) in self.results.skipped else "-"
                cells.append(f"{m.median:.2f} ({min(m.walls):.2f}-{max(m.walls):.2f})" if m else skipped)
            for a, b, _ in ratios:
                r = self.results.ratio(storage, workload, a, b)
                cells.append(f"{r:.2f}x" if r is not None else "-")
            lines.append(f"| {workload} | " + " | ".join(cells) + " |")
        return lines

    def _notes(self) -> list[str]:
        lines: list[str] = []
        several = [w for w in self.opts.workloads if workload_spec(w).kind != "single"]
        if several:
            lines += ["", "Workloads of several runs: the time from the first run's start to the last run's end."]
        if self.results.skipped:
            lines += ["", "Skipped (not measured, by default):", ""]
            lines += [
                f"- {workload}, {LABELS[contender]}: {why}."
                for (workload, contender), why in self.results.skipped.items()
            ]
        return lines

    def _targets(self) -> list[str]:
        lines = ["", "### Targets", "", "| storage | ratio | measured | target | met |", "|---|---|---:|---:|---|"]
        for row in self.results.targets():
            lines.append(
                f"| {row['storage']} | {row['what']} | {row['value']:.2f} | <= {row['target']:g} | "
                f"{'yes' if row['met'] else 'NO'} |"
            )
        if any(self.results.embedded_ratio(s) for s in self.opts.storages):
            repeats = sorted({len(m.walls) for m in self.results.measurements.values() if m.contender == EMBEDDED})
            lines += [
                "",
                f"Embedded worker / CLI worker: {LABELS[EMBEDDED]} (benchmarks/embedded_host.py: `Worker` and "
                "`WorkerConfig` in a plain Python process) against `dagster-taskiq-sync worker start`, same "
                "settings, each on a queue of its own, interleaved; the sum of the medians of every workload "
                f"both ran, {'-'.join(map(str, repeats))} run(s) each"
                + (" (one run each: a smoke figure, within noise only roughly)." if repeats == [1] else "."),
            ]
        return lines

    def _segments(self) -> list[str]:
        lines = [
            "",
            "### Where a taskiq step's time goes (ms, p50 / p95 over every step of every timed run)",
            "",
            "| storage | workload | " + " | ".join(label for _, label in SEGMENTS + RUN_EDGES) + " |",
            "|---|---|" + "---:|" * len(SEGMENTS + RUN_EDGES),
        ]
        for (storage, workload), seg in sorted(self.results.segments.items()):
            cells = []
            for name, _ in SEGMENTS + RUN_EDGES:
                values = sorted(seg.get(name, ()))
                cells.append(f"{_pct(values, 50) * 1000:.0f} / {_pct(values, 95) * 1000:.0f}" if values else "-")
            lines.append(f"| {storage} | {workload} | " + " | ".join(cells) + " |")
        return lines

    def _memory(self) -> list[str]:
        if not self.results.memory:
            return []
        lines = [
            "",
            f"### Worker memory, {CONCURRENCY} threads/processes, fan-out run (MiB)",
            "",
            "| storage | worker | peak RSS of the worker process | peak PSS of worker + children |",
            "|---|---|---:|---:|",
        ]
        for (storage, contender), mem in sorted(self.results.memory.items()):
            lines.append(
                f"| {storage} | {LABELS[contender]} | {mem['worker_rss_mib']:.0f} | {mem['tree_pss_mib']:.0f} |"
            )
        return lines

    # -- the sections for several-run workloads, CPU and SQS requests --

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

    def report_runs(self) -> list[str]:
        rows = [(s, w, c) for (s, w, c) in self.results.details if workload_spec(w).kind == "runs"]
        if not rows:
            return []
        figures = [(label, fig, digits) for _, label, fig, digits in self.results.runs_figures()]
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
        for storage, workload, contender in sorted(rows, key=self.results.row_order):
            cells = [self.with_ratios(fig, storage, workload, contender, digits) for _, fig, digits in figures]
            lines.append(f"| {storage} | {workload} | {LABELS[contender]} | " + " | ".join(cells) + " |")
        return lines

    def report_backfill(self) -> list[str]:
        rows = [(s, w, c) for (s, w, c) in self.results.details if workload_spec(w).kind == "backfill"]
        if not rows:
            return []
        figures = [(label, fig, digits) for _, label, fig, digits in self.results.backfill_figures()]
        lines = [
            "",
            "### Interactive run during a backfill",
            "",
            "backfill-N+chain-M: a fanout-N run starts, tagged `dagster/backfill` as Dagster's backfill "
            "daemon tags the runs it launches; once its root step is done and 5% of its branches have "
            "started, a chain-M run starts on the same queue, in a second orchestrating process of the "
            "contender's (warmed by one untimed run of the chain): every Dagster run has its own run worker process, "
            "so the two runs' orchestration does not share a GIL, for every contender alike. taskiq_executor "
            "runs with `lanes: true` (the backfill's steps on the bulk lane). Solo times are the fanout-N "
            "and chain-M rows of the table above. " + self._ratio_note(),
            "",
            "| storage | workload | contender | "
            + " | ".join(f[0] for f in figures)
            + " | backfill steps done when the interactive run started / ended |",
            "|---|---|---|" + "---:|" * (len(figures) + 1),
        ]
        for storage, workload, contender in sorted(rows, key=self.results.row_order):
            cells = [self.with_ratios(fig, storage, workload, contender, digits) for _, fig, digits in figures]
            details = self.results.details[(storage, workload, contender)]
            big_steps = job_steps(workload_spec(workload).jobs[0])
            progress = ", ".join(
                f"{d.get('big_steps_done_when_small_started')} / {d.get('big_steps_done_when_small_ended')}"
                + ("" if d.get("small_started_during_backfill", True) else " (backfill ended first)")
                for d in details
            )
            cells.append(f"{progress} of {big_steps}")
            lines.append(f"| {storage} | {workload} | {LABELS[contender]} | " + " | ".join(cells) + " |")
        return lines

    def report_cpu(self) -> list[str]:
        if not self.results.cpu:
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
        for storage, workload, contender in sorted(self.results.cpu, key=self.results.row_order):
            cells = [
                self.with_ratios(self.results.cpu_figure(part), storage, workload, contender, 1) for _, part in figures
            ]
            proxy = self.results.cpu_figure("request_counter")(storage, workload, contender)
            cells.append(f"{proxy:.1f}" if proxy is not None else "-")
            lines.append(f"| {storage} | {workload} | {LABELS[contender]} | " + " | ".join(cells) + " |")
        return lines

    def report_requests(self) -> list[str]:
        return self._report_requests() + self._report_redis()

    def _report_redis(self) -> list[str]:
        if not self.results.redis_commands:
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
            self.results.redis_commands.items(), key=lambda kv: self.results.row_order((*kv[0], ""))
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
        if not self.results.requests:
            return []
        operations = self._operations()
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
        for (storage, workload), records in sorted(
            self.results.requests.items(), key=lambda kv: self.results.row_order((*kv[0], ""))
        ):
            steps = sum(r["steps"] for r in records)
            totals = {op: sum(r["counts"].get(op, 0) for r in records) / steps for op in operations}
            cells = [f"{steps // len(records)}", f"{sum(totals.values()):.2f}"]
            cells += [f"{totals[op]:.3f}" if totals[op] else "-" for op in operations]
            sizes = sorted(self.results.payload_bytes.get((storage, workload), []))
            cells.append(f"{_pct(sizes, 50):.0f} / {sizes[-1]}" if sizes else "-")
            lines.append(f"| {storage} | {workload} | " + " | ".join(cells) + " |")
        return lines

    def _operations(self) -> list[str]:
        """Every SQS/S3 operation counted: the orchestrator's first, then the worker's receives,
        its other calls, and S3 last."""
        operations: list[str] = []
        for records in self.results.requests.values():
            for record in records:
                operations.extend(op for op in record["counts"] if op not in operations)
        operations.sort(
            key=lambda op: (
                not op.startswith("orchestrator"),
                "S3" in op,
                op.startswith("worker") and "Receive" not in op,
                op,
            )
        )
        return operations


def _pct(values: list[float], pct: float) -> float:
    if not values:
        return float("nan")
    index = min(len(values) - 1, max(0, round(pct / 100 * (len(values) - 1))))
    return values[index]


def write(results: Results, out: Path, text: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.md").write_text("# Benchmark results (`bin/bench`)\n\n" + text)
    (out / "benchmark.json").write_text(json.dumps(results.raw(), indent=1))
    chart(results, out / "benchmark.png")
    log(f"\nwrote {out / 'benchmark.md'}, {out / 'benchmark.json'} and {out / 'benchmark.png'}")


def chart(results: Results, path: Path) -> None:
    """Grouped bars: median wall time per workload and contender, one panel per storage (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    opts = results.opts
    storages = opts.storages
    workloads = opts.workloads
    width_per_panel = max(6.5, 1.1 * len(workloads))
    fig, axes = plt.subplots(1, len(storages), figsize=(width_per_panel * len(storages), 4.6), squeeze=False)
    width = 0.8 / len(opts.contenders)
    for ax, storage in zip(axes[0], storages, strict=False):
        skipped_at = []
        for i, contender in enumerate(opts.contenders):
            values = [
                results.measurements[(storage, w, contender)].median
                if (storage, w, contender) in results.measurements
                else float("nan")
                for w in workloads
            ]
            xs = [x + (i - (len(opts.contenders) - 1) / 2) * width for x in range(len(workloads))]
            bars = ax.bar(xs, values, width, label=LABELS[contender])
            ax.bar_label(
                bars, labels=["" if v != v else f"{v:.1f}" if v >= 1 else f"{v:.2f}" for v in values], fontsize=7
            )
            skipped_at += [
                x for x, w, v in zip(xs, workloads, values, strict=True) if v != v and (w, contender) in results.skipped
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
