"""The chaos soak's jobs (``bin/soak``): a fan-out and a chain on two queues, some ops with a RetryPolicy.

Every op appends a ``start`` line when its user code begins and an ``end`` line when it returns to
``MARKER_DIR/<run_id>.log`` (one ``os.write`` of an ``O_APPEND`` file each, so concurrent steps
never interleave a line), naming its step, Dagster retry number, pid, and the worker and worker
incarnation whose step child ran it (``SOAK_WORKER`` / ``SOAK_INCARNATION``, set by the soak in
each worker's environment and inherited by its fork server and step children). The soak counts
from these how many times user code ran, and which runs were cut short by which SIGKILL.

Workers load this file from the run's code origin (``dagster job execute -f``), so it imports
nothing of the soak itself. No ``from __future__ import annotations``: Dagster reads the ops'
annotations (``SoakOpConfig``) at definition time.
"""

import os
import time

from dagster import Config, OpExecutionContext, RetryPolicy, job, op

from dagster_taskiq_sync import taskiq_executor

QUEUE_A = "soak_a"  # the runs' default queue (task_default_queue): served by both workers
QUEUE_B = "soak_b"  # served by one worker only
LEAVES = 8
CHAIN = 6
RETRY = RetryPolicy(max_retries=2, delay=0.5)
# step key -> Dagster max_retries, for the soak's report (a retry is only expected after a kill)
RETRIES = {}  # type: dict[str, int]


class SoakOpConfig(Config):
    marker_dir: str
    sleep: float = 0.5


def _mark(context: OpExecutionContext, config: SoakOpConfig, what: str) -> None:
    line = (
        f"{what} {context.op_handle} {context.retry_number} {os.getpid()} {os.environ.get('SOAK_WORKER', '?')} "
        f"{os.environ.get('SOAK_INCARNATION', '?')} {time.time():.3f}\n"
    )
    fd = os.open(
        os.path.join(config.marker_dir, f"{context.run_id}.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644
    )
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _tags(queue: str) -> dict[str, str]:
    return {"dagster-celery/queue": queue} if queue != QUEUE_A else {}


def source_op(name: str, queue: str, retries: int = 0):
    RETRIES[name] = retries

    @op(name=name, tags=_tags(queue), retry_policy=RETRY if retries else None)
    def source(context: OpExecutionContext, config: SoakOpConfig) -> int:
        _mark(context, config, "start")
        time.sleep(config.sleep)
        _mark(context, config, "end")
        return 1

    return source


def step_op(name: str, queue: str, retries: int = 0):
    RETRIES[name] = retries

    @op(name=name, tags=_tags(queue), retry_policy=RETRY if retries else None)
    def step(context: OpExecutionContext, config: SoakOpConfig, value: int) -> int:
        _mark(context, config, "start")
        time.sleep(config.sleep)
        _mark(context, config, "end")
        return value + 1

    return step


def gather_op(name: str, queue: str, retries: int = 0):
    RETRIES[name] = retries

    @op(name=name, tags=_tags(queue), retry_policy=RETRY if retries else None)
    def gather(context: OpExecutionContext, config: SoakOpConfig, values: list[int]) -> int:
        _mark(context, config, "start")
        time.sleep(config.sleep)
        _mark(context, config, "end")
        return sum(values)

    return gather


_FAN_SOURCE = source_op("fan_source", QUEUE_A)
# leaves alternate queues; leaves 0-2 (and the gather) have a RetryPolicy, the others none
_FAN_LEAVES = [
    step_op(f"leaf_{i}", QUEUE_A if i % 2 == 0 else QUEUE_B, RETRY.max_retries if i < 3 else 0) for i in range(LEAVES)
]
_FAN_GATHER = gather_op("fan_gather", QUEUE_B, RETRY.max_retries)


@job(executor_def=taskiq_executor)
def soak_fanout():
    seed = _FAN_SOURCE()
    _FAN_GATHER([leaf(seed) for leaf in _FAN_LEAVES])


_CHAIN_SOURCE = source_op("link_0", QUEUE_B)
_CHAIN_LINKS = [
    step_op(f"link_{i}", QUEUE_A if i % 2 == 0 else QUEUE_B, RETRY.max_retries if i in (2, 4) else 0)
    for i in range(1, CHAIN)
]


@job(executor_def=taskiq_executor)
def soak_chain():
    value = _CHAIN_SOURCE()
    for link in _CHAIN_LINKS:
        value = link(value)


JOBS = {"soak_fanout": soak_fanout, "soak_chain": soak_chain}


def op_names(job_name: str) -> list[str]:
    return [node.name for node in JOBS[job_name].graph.nodes]
