"""Serve Dagster's step queues from a Celery worker: ``celery -A proj worker`` runs a
:class:`~dagster_taskiq_sync.worker.worker.Worker` next to Celery's own consumer, as a worker bootstep.

In ``proj.py``, after the app is made::

    from dagster_taskiq_sync.integrations.celery import install

    install(app, "run_config.yaml", queues=["dagster"], concurrency=2, metrics_port=9090)

``install`` only records what to build: the Dagster worker's config is read and checked when a
Celery *worker* starts (``celery -A proj inspect ping`` or a client sending tasks builds nothing).
Its lifecycle is Celery's:

- start: after Celery's pool (its first pool children are forked before this worker's threads
  exist); a config, queue or endpoint error is Celery's "Unrecoverable error" and the worker exits;
- warm shutdown (SIGTERM, Ctrl-C once): this worker stops taking steps as soon as Celery starts
  closing, and running steps finish under the worker's ``shutdown_timeout`` while Celery's pool
  drains its own tasks; then what is left is killed, as ``worker start`` does;
- cold shutdown (SIGQUIT, also during a warm shutdown): running steps are killed at once, their
  runs told why;
- a fatal error in this worker, or ``dagster-taskiq-sync worker terminate``, asks Celery for a warm
  shutdown the way Celery's own signal handler does (its ``should_stop`` flag), exit code 1 / 0.

It installs no signal handlers: Celery owns them; this module only reads the flags Celery's
handlers set. Celery's ``inspect stats`` gains a ``dagster_taskiq_sync`` entry (name, queues,
live/ready and why, running steps, metrics URL).

Importing this module imports Celery (the ``[celery]`` extra); nothing else in the package does.
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import Callable
from typing import Any

from celery import bootsteps
from celery.worker import state as celery_state

from dagster_taskiq_sync.config.worker_config import WorkerConfig
from dagster_taskiq_sync.errors import ConfigError
from dagster_taskiq_sync.worker.worker import Worker

log = logging.getLogger("dagster_taskiq_sync.celery")

__all__ = ["DagsterWorkerStep", "install"]

_OPTIONS = set(inspect.signature(WorkerConfig.from_yaml).parameters) - {"cls", "config_yaml"}
EX_OK, EX_FAILURE = 0, 1


def install(app: Any, config_yaml: str | None = None, **options: Any) -> type[DagsterWorkerStep]:
    """Make ``app``'s workers serve Dagster's step queues too. ``options`` are
    :meth:`WorkerConfig.from_yaml`'s (``queues``, ``concurrency``, ``metrics_port``, ...); ``name``
    defaults to the Celery node's name (``-n``), so ``worker list`` and ``celery inspect`` agree."""
    unknown = sorted(set(options) - _OPTIONS)
    if unknown:
        raise ConfigError(
            f"install() does not take {', '.join(unknown)}; use WorkerConfig.from_yaml's keywords: "
            f"{', '.join(sorted(_OPTIONS))}."
        )
    step = type("DagsterWorkerStep", (DagsterWorkerStep,), {"config_yaml": config_yaml, "options": dict(options)})
    app.steps["worker"].add(step)
    return step


class DagsterWorkerStep(bootsteps.StartStopStep):
    """The Celery worker bootstep (made by :func:`install`, bound to one config)."""

    label = "dagster-taskiq-sync"
    requires = ("celery.worker.components:Pool",)
    config_yaml: str | None = None
    options: dict[str, Any] = {}  # noqa: RUF012 - replaced per install(), never mutated

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.worker: Worker | None = None
        self._stopper: threading.Thread | None = None
        self._watcher: threading.Thread | None = None
        self._stopping = threading.Event()

    def start(self, parent: Any) -> None:
        """Read and check the config, then start; an error here is Celery's "Unrecoverable error"."""
        name = self.options.get("name") or str(parent.hostname).split("@", 1)[0]
        worker = self.worker = Worker(WorkerConfig.from_yaml(self.config_yaml, **{**self.options, "name": name}))
        worker.start()
        self._watcher = threading.Thread(target=self._watch, args=(worker,), name="dagster-celery-watch", daemon=True)
        self._watcher.start()

    def close(self, parent: Any) -> None:
        """Celery begins to shut down (warm or cold): stop taking steps now, drain in the background
        while Celery closes its consumer and its pool drains its own tasks."""
        if self.worker is not None and self._stopper is None:
            self._stopping.set()
            self._stopper = threading.Thread(target=self.worker.stop, name="dagster-celery-stop", daemon=True)
            self._stopper.start()

    def stop(self, parent: Any) -> None:
        """Warm shutdown: wait for running steps (up to ``shutdown_timeout``); a cold shutdown
        requested meanwhile (SIGQUIT) kills them."""
        self.close(parent)
        self._wait(cold=lambda: celery_state.should_terminate not in (None, False))

    def terminate(self, parent: Any) -> None:
        """Cold shutdown: kill running steps, then finish stopping."""
        self.close(parent)
        if self.worker is not None:
            self.worker.kill_running("cold shutdown of the Celery worker")
        self._wait(cold=lambda: False)

    def info(self, parent: Any) -> dict[str, Any]:
        """What ``celery inspect stats`` shows of this worker."""
        worker = self.worker
        if worker is None:
            return {"dagster_taskiq_sync": {"live": False, "ready": False, "ready_why": "not started"}}
        live, ready = worker.live(), worker.ready()
        try:
            running = [r.label for r in worker.parts.context.running.list()]
        except RuntimeError:  # not started
            running = []
        return {
            "dagster_taskiq_sync": {
                "name": worker.name,
                "queues": list(worker.config.queues),
                "concurrency": worker.config.concurrency,
                "live": live[0],
                "live_why": live[1],
                "ready": ready[0],
                "ready_why": ready[1],
                "running": running,
                "steps_done": worker.steps_done,
                "metrics": f"{worker.health.url}/metrics" if worker.health is not None else None,
            }
        }

    def _wait(self, cold: Callable[[], bool]) -> None:
        worker, stopper = self.worker, self._stopper
        while worker is not None and stopper is not None and stopper.is_alive():
            stopper.join(0.2)
            if cold() and not worker.killing.is_set():
                worker.kill_running("cold shutdown of the Celery worker")

    def _watch(self, worker: Worker) -> None:
        """A broken worker or ``worker terminate`` stops Celery as its own signal handler would:
        by setting the flag Celery's consumer loop checks (never a signal, never ``sys.exit``)."""
        while not self._stopping.wait(1.0):
            if worker.fatal or worker.terminate_requested.is_set():
                code = EX_FAILURE if worker.fatal else EX_OK
                why = worker.fatal or "`dagster-taskiq-sync worker terminate` asked it to stop"
                log.log(
                    logging.ERROR if worker.fatal else logging.INFO,
                    "worker %s: %s; asking the Celery worker for a warm shutdown",
                    worker.name,
                    why,
                )
                if celery_state.should_stop in (None, False):
                    celery_state.should_stop = code
                return
