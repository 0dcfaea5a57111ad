"""The demo job: fan-out / fan-in over seven ops, run by taskiq_executor on SQS workers."""

import os
import time

from dagster import Definitions, job, op

from dagster_taskiq_sync import taskiq_executor


@op
def load_numbers() -> list[int]:
    return list(range(1, 101))


def _make_partial(index: int, parts: int):
    @op(name=f"partial_sum_{index}")
    def partial_sum(numbers: list[int]) -> int:
        time.sleep(0.3)  # a little work, so the four partial sums visibly overlap
        return sum(numbers[index::parts])

    return partial_sum


PARTIALS = [_make_partial(i, 4) for i in range(4)]


@op
def total(a: int, b: int, c: int, d: int) -> int:
    return a + b + c + d


@op
def report(value: int) -> str:
    line = f"sum(1..100) = {value} (computed in pid {os.getpid()})"
    print(line)
    if value != 5050:
        raise ValueError(f"expected 5050, got {value}")
    return line


@job(executor_def=taskiq_executor)
def fan_out_fan_in():
    numbers = load_numbers()
    report(total(*[partial(numbers) for partial in PARTIALS]))


defs = Definitions(jobs=[fan_out_fan_in])
