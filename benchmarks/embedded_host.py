"""A plain host process with an embedded worker: bin/bench's ``taskiq_embedded`` contender.

Run as ``python -m benchmarks.embedded_host CONFIG_YAML QUEUE CONCURRENCY NAME``. It does what the
README's "Embedding a worker" snippet does (``from dagster_taskiq_sync import Worker,
WorkerConfig``; ``with Worker(config) as worker``, then the host's own loop), with the same
settings bin/bench gives its ``dagster-taskiq-sync worker start`` (queue aside: each worker has its
own, so neither takes the other's steps). Being the host, it owns the signals: SIGTERM (how the
bench stops its workers) leaves the ``with`` block, which stops the worker in order. Its log says
``host ready`` once the worker is.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time


def main() -> int:
    config_yaml, queue, concurrency, name = sys.argv[1:5]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from dagster_taskiq_sync import Worker, WorkerConfig

    def leave(signum, _frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, leave)
    config = WorkerConfig.from_yaml(
        config_yaml, queues=[queue], concurrency=int(concurrency), name=name, includes=["benchmarks.jobs"]
    )
    with Worker(config) as worker:
        print(f"host ready: worker {name} in host process {os.getpid()}", flush=True)
        try:
            while worker.live()[0]:  # the host's own loop
                time.sleep(1)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
