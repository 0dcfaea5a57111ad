"""The code location of tests/e2e/test_topology.py, written as a production deployment writes it.

Steps go to SQS through ``taskiq_executor`` (its config comes with the run, as from the launchpad);
outputs go to S3 through dagster-aws's ``S3PickleIOManager``. Nothing here names an endpoint: boto
resolves it (``AWS_ENDPOINT_URL`` in the test, the real AWS endpoints in production).
"""

import os
import sys
import time

from dagster import Config, Definitions, OpExecutionContext, job, op
from dagster_aws.s3 import S3PickleIOManager, S3Resource

from dagster_taskiq_sync import taskiq_executor

BUCKET = "dagster-taskiq-topology"
IO_PREFIX = "outputs"
PARTS = 4


@op
def numbers() -> list[int]:
    print(f"numbers: pid {os.getpid()}")
    return list(range(1, 11))


def _part(i: int):
    @op(name=f"part_{i}")
    def part(context: OpExecutionContext, values: list[int]) -> int:
        # Long enough that no single worker holds every part at once: the parts spread.
        time.sleep(1.5)
        result = sum(v for v in values if v % PARTS == i)
        print(f"part_{i}: sum {result} in pid {os.getpid()}")
        print(f"part_{i}: to stderr", file=sys.stderr)
        return result

    return part


PART_OPS = [_part(i) for i in range(PARTS)]


@op
def total(context: OpExecutionContext, a: int, b: int, c: int, d: int) -> int:
    result = a + b + c + d
    print(f"total: {result}")
    return result


@job(executor_def=taskiq_executor)
def fan_out():
    values = numbers()
    total(*[part(values) for part in PART_OPS])


class SleepConfig(Config):
    seconds: float = 120.0


@op
def sleeper(context: OpExecutionContext, config: SleepConfig) -> int:
    context.log.info(f"sleeper started in pid {os.getpid()}")
    time.sleep(config.seconds)
    print("sleeper: woke up")  # never printed when the run is terminated
    return 1


@op
def after_sleeper(x: int) -> int:
    return x


@job(executor_def=taskiq_executor)
def long_sleep():
    after_sleeper(sleeper())


defs = Definitions(
    jobs=[fan_out, long_sleep],
    resources={"io_manager": S3PickleIOManager(s3_resource=S3Resource(), s3_bucket=BUCKET, s3_prefix=IO_PREFIX)},
)
