"""The benchmark's jobs, built for any executor by name (so every contender runs the same graph).

Workers and the orchestrator rebuild a job from ``make_job(workload, executor)`` through
Dagster's ``build_reconstructable_job``; this module must be importable on the workers (the
benchmark starts them with the repository root on PYTHONPATH).
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass

from dagster import JobDefinition, build_reconstructable_job, in_process_executor, job, multiprocess_executor, op

WORKLOAD = re.compile(r"^(chain|fanout)-(\d+)(-sleep)?$")
SLEEP_SECONDS = 0.2


# Workloads of several runs at once. Their runs use the single-run jobs above; the names on the
# left are shorthands for the general forms on the right.
ALIASES = {
    "runs-10": "runs-10-chain-10",
    "backfill+interactive": "backfill-1000+chain-5",
    "backfill-small": "backfill-20+chain-3",
}
RUNS = re.compile(r"^runs-(\d+)-chain-(\d+)$")
BACKFILL = re.compile(r"^backfill-(\d+)\+chain-(\d+)$")


@dataclass(frozen=True)
class Workload:
    """What one timed measurement runs.

    ``single``: one run of ``jobs[0]``. ``runs``: ``count`` runs of ``jobs[0]`` submitted at once.
    ``backfill``: a run of ``jobs[0]`` (the backfill, a fan-out) and, once its fan-out is in
    flight, a run of ``jobs[1]`` (the interactive chain) on the same queue; both their solo
    times come from the single-run workloads ``jobs`` in the same invocation.
    """

    name: str
    kind: str
    jobs: tuple[str, ...]
    count: int = 1

    @property
    def steps(self) -> int:
        """Steps executed by one measurement (every run of it)."""
        return sum(job_steps(job) for job in self.jobs) * self.count

    @property
    def runs(self) -> int:
        return self.count if self.kind == "runs" else len(self.jobs)


def job_steps(job: str) -> int:
    shape, size, _ = parse_workload(job)
    return size if shape == "chain" else size + 2


def workload_spec(name: str) -> Workload:
    """The :class:`Workload` a ``--workloads`` name means; ValueError naming the forms otherwise."""
    full = ALIASES.get(name, name)
    if WORKLOAD.match(full):
        return Workload(name, "single", (full,))
    match = RUNS.match(full)
    if match and int(match.group(1)) >= 1 and int(match.group(2)) >= 1:
        return Workload(name, "runs", (f"chain-{match.group(2)}",), int(match.group(1)))
    match = BACKFILL.match(full)
    if match and int(match.group(1)) >= 1 and int(match.group(2)) >= 1:
        return Workload(name, "backfill", (f"fanout-{match.group(1)}", f"chain-{match.group(2)}"))
    raise ValueError(
        f"unknown workload {name!r}; use chain-N, fanout-N, fanout-N-sleep, runs-R-chain-N, "
        f"backfill-N+chain-M or one of {', '.join(ALIASES)}"
    )


def executor_def(name: str):
    if name in ("taskiq", "taskiq_embedded"):  # the same executor; only the worker's host differs
        from dagster_taskiq_sync import taskiq_executor

        return taskiq_executor
    if name == "celery":
        from dagster_celery import celery_executor

        return celery_executor
    if name == "multiprocess":
        return multiprocess_executor
    if name == "in_process":
        return in_process_executor
    raise ValueError(f"unknown executor {name!r}; use taskiq, taskiq_embedded, celery, multiprocess or in_process")


def parse_workload(workload: str) -> tuple[str, int, bool]:
    match = WORKLOAD.match(workload)
    if not match:
        raise ValueError(f"unknown workload {workload!r}; use chain-N, fanout-N or fanout-N-sleep")
    return match.group(1), int(match.group(2)), bool(match.group(3))


# Dagster's job composition keeps its state in one module-level stack, not per thread: two runs'
# threads rebuilding their jobs at once (runs-R-chain-N) fail with "invoked the same node twice".
_COMPOSITION = threading.Lock()


def make_job(workload: str, executor: str) -> JobDefinition:
    with _COMPOSITION:
        return _make_job(workload, executor)


def _make_job(workload: str, executor: str) -> JobDefinition:
    shape, size, sleep = parse_workload(workload)
    name = f"{shape}_{size}{'_sleep' if sleep else ''}__{executor}"
    executor_definition = executor_def(executor)

    if shape == "chain":

        @op
        def first() -> int:
            return 0

        @op
        def link(value: int) -> int:
            """A trivial step passing a value on: per-step latency is what is measured."""
            return value + 1

        @job(name=name, executor_def=executor_definition)
        def chain():
            value = first.alias("link_000")()
            for index in range(1, size):
                value = link.alias(f"link_{index:03d}")(value)

        return chain

    @op
    def root() -> int:
        return size

    @op
    def branch(value: int) -> int:
        if sleep:
            time.sleep(SLEEP_SECONDS)
        return value + 1

    @op
    def gather(values: list[int]) -> int:
        return sum(values)

    @job(name=name, executor_def=executor_definition)
    def fanout():
        seed = root()
        gather([branch.alias(f"branch_{index:03d}")(seed) for index in range(size)])

    return fanout


def reconstructable_job(workload: str, executor: str):
    return build_reconstructable_job(__name__, make_job.__name__, reconstructable_args=(workload, executor))
