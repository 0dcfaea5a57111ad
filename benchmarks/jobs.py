"""The benchmark's jobs, built for any executor by name (so every contender runs the same graph).

Workers and the orchestrator rebuild a job from ``make_job(workload, executor)`` through
Dagster's ``build_reconstructable_job``; this module must be importable on the workers (the
benchmark starts them with the repository root on PYTHONPATH).
"""

from __future__ import annotations

import re
import time

from dagster import JobDefinition, build_reconstructable_job, in_process_executor, job, multiprocess_executor, op

WORKLOAD = re.compile(r"^(chain|fanout)-(\d+)(-sleep)?$")
SLEEP_SECONDS = 0.2


def executor_def(name: str):
    if name == "taskiq":
        from dagster_taskiq_sync import taskiq_executor

        return taskiq_executor
    if name == "celery":
        from dagster_celery import celery_executor

        return celery_executor
    if name == "multiprocess":
        return multiprocess_executor
    if name == "in_process":
        return in_process_executor
    raise ValueError(f"unknown executor {name!r}; use taskiq, celery, multiprocess or in_process")


def parse_workload(workload: str) -> tuple[str, int, bool]:
    match = WORKLOAD.match(workload)
    if not match:
        raise ValueError(f"unknown workload {workload!r}; use chain-N, fanout-N or fanout-N-sleep")
    return match.group(1), int(match.group(2)), bool(match.group(3))


def make_job(workload: str, executor: str) -> JobDefinition:
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
