"""Jobs of the lanes tests (loaded by workers from this file): each op logs the CPU niceness and
scheduling policy of the process it runs in, so a test can see which lane's children ran it."""

import os
import time

from dagster import job, op

from dagster_taskiq_sync import taskiq_executor


def _say_niceness(context) -> None:
    context.log.info(f"niceness {os.getpriority(os.PRIO_PROCESS, 0)}")
    if hasattr(os, "sched_getscheduler"):
        context.log.info(f"policy {'idle' if os.sched_getscheduler(0) == os.SCHED_IDLE else 'other'}")


@op
def seed(context) -> int:
    _say_niceness(context)
    return 1


def _branch(i: int):
    @op(name=f"branch_{i}")
    def branch(context, n: int) -> int:
        _say_niceness(context)
        time.sleep(0.4)  # long enough that one slot works through the branches one by one
        return n + i

    return branch


BRANCHES = [_branch(i) for i in range(8)]


@op
def gather(values: list) -> int:
    return sum(values)


@job(executor_def=taskiq_executor)
def backlog():
    """1 -> 8 -> 1: the backfill."""
    n = seed()
    gather([branch(n) for branch in BRANCHES])


@op
def first(context) -> int:
    _say_niceness(context)
    return 1


@op
def second(context, n: int) -> int:
    _say_niceness(context)
    return n + 1


@job(executor_def=taskiq_executor)
def interactive():
    """Two steps in a chain: the run a user waits for."""
    second(first())
