"""Jobs for tests/faults/test_db_faults.py: slow enough that a database outage lands mid-run."""

import time

from dagster import in_process_executor, job, op


@op
def start_value() -> int:
    return 1


def _slow_step(i: int):
    @op(name=f"slow_{i}")
    def slow(n: int) -> int:
        time.sleep(1.0)
        return n + 1

    return slow


SLOW_STEPS = [_slow_step(i) for i in range(8)]


@job(executor_def=in_process_executor)
def slow_chain():
    n = start_value()
    for step in SLOW_STEPS:
        n = step(n)
