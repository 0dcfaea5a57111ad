"""A host process that embeds a worker, started the way console scripts start programs
(``celery``, ``gunicorn``): its module does harm if imported again, and so does ``main``.

Each import and each ``main`` call appends a line to ``$HOST_MARKS``; a step child that re-ran the
host's main script would add one with its own pid.
"""

from __future__ import annotations

import os
import sys
import time

from dagster_taskiq_sync import Worker, WorkerConfig


def _mark(what: str) -> None:
    with open(os.environ["HOST_MARKS"], "a") as marks:
        marks.write(f"{what} {os.getpid()}\n")


_mark("imported")


def main() -> int:
    _mark("main")
    config = WorkerConfig.from_yaml(sys.argv[1], queues=[sys.argv[2]], concurrency=2, name="console-host")
    with Worker(config) as worker:
        try:
            while worker.live()[0]:
                time.sleep(0.2)
        except KeyboardInterrupt:
            pass
    return 0
