"""A job for tests/e2e/test_celery_worker.py, loaded by the step children of a Celery worker.

``meet`` records where it runs (its pid and every ancestor's), then waits for a file another
party writes: a Celery task (both must run at once), or the test (to hold the step while the
Celery worker shuts down).
"""

import json
import os
import time
from pathlib import Path

from dagster import Config, job, op

from dagster_taskiq_sync import taskiq_executor


def ancestors(pid: int) -> list[int]:
    """``pid``'s parent, grandparent, ... up to init (from /proc)."""
    chain = []
    while pid > 1:
        with open(f"/proc/{pid}/stat") as stat:
            pid = int(stat.read().rsplit(")", 1)[1].split()[1])
        chain.append(pid)
    return chain


class MeetConfig(Config):
    marker_dir: str
    wait_for: str  # a file in marker_dir
    timeout: float = 60.0


@op
def meet(config: MeetConfig) -> int:
    markers = Path(config.marker_dir)
    with (markers / "step.jsonl").open("a") as out:
        out.write(json.dumps({"pid": os.getpid(), "ancestors": ancestors(os.getpid())}) + "\n")
    deadline = time.monotonic() + config.timeout
    while not (markers / config.wait_for).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{config.wait_for} did not appear within {config.timeout} s")
        time.sleep(0.05)
    return os.getpid()


@job(executor_def=taskiq_executor)
def meeting():
    meet()
