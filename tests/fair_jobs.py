"""Jobs of the fair-sharing tests (loaded by workers from this file)."""

import time

from dagster import job, op

from dagster_taskiq_sync import taskiq_executor


@op
def seed() -> int:
    return 1


def _branch(i: int):
    @op(name=f"branch_{i}")
    def branch(n: int) -> int:
        time.sleep(0.3)  # long enough that one slot works through the branches one by one
        return n + i

    return branch


BRANCHES = [_branch(i) for i in range(12)]


@op
def gather(values: list) -> int:
    return sum(values)


@job(executor_def=taskiq_executor)
def wide_fan():
    """1 -> 12 -> 1: the backfill of the fair-sharing tests."""
    n = seed()
    gather([branch(n) for branch in BRANCHES])
