"""One reading of the queues and the worker registry: what `queues stats` prints, its exporter
(`queues stats --serve`) serves and an operator page shows, computed in one place.

:func:`gather` reads SQS (depths, dead-letter depths) through the bridge with a deadline and the
worker registry through a :class:`RegistryReader`, which opens ``DAGSTER_HOME``'s instance once and
keeps it: a long-lived exporter must not open an instance per scrape. A registry that cannot be
read is a note and ``workers=None`` (live workers unknown, never shown as 0).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from dagster_taskiq_sync.errors import TaskiqSyncError
from dagster_taskiq_sync.ops.queue_depths import QueueStats, add_workers, queue_depths
from dagster_taskiq_sync.storage.registry import WorkerRecord, WorkerRegistry
from dagster_taskiq_sync.wire.bridge import Bridge
from dagster_taskiq_sync.wire.broker_client import translate_error
from dagster_taskiq_sync.wire.lanes import lane_queue, with_lanes

NO_HOME_NOTE = (
    "DAGSTER_HOME is not set, so live workers and free slots are unknown; set it to the deployment's instance."
)


@dataclass
class StatsReport:
    """One reading: per-queue numbers, the registry's records (None: unknown) and notes for the operator."""

    time: str  # ISO 8601, UTC, seconds
    endpoint: str
    queues: list[QueueStats]
    workers: list[WorkerRecord] | None
    notes: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        """True when a queue could not be read."""
        return any(s.error for s in self.queues)

    def as_dict(self) -> dict[str, Any]:
        """The `queues stats --json` document."""
        return {"time": self.time, "queues": [s.as_dict() for s in self.queues], "notes": list(self.notes)}


class RegistryReader:
    """The worker registry of ``DAGSTER_HOME``'s instance, opened on first use and kept.

    After a failed read the instance is opened again on the next one (a database restart or a
    fixed dagster.yaml is picked up without restarting the reader).
    """

    def __init__(self) -> None:
        self._instance: Any = None
        self._registry: WorkerRegistry | None = None

    def read(self) -> tuple[list[WorkerRecord] | None, list[str]]:
        """(the registry's records, or None when unknown; notes saying why)."""
        if not os.environ.get("DAGSTER_HOME", "").strip():
            return None, [NO_HOME_NOTE]
        try:
            if self._registry is None:
                from dagster_taskiq_sync.storage.instance import InstanceOptions, open_home_instance

                self._instance = open_home_instance(InstanceOptions(pool_connections=False))
                self._registry = WorkerRegistry(self._instance)
            return self._registry.workers(), []
        except Exception as exc:  # noqa: BLE001 - SQS numbers are still worth showing; the note says why
            self.close()
            return None, [
                f"the worker registry in DAGSTER_HOME's instance cannot be read ({exc}); live workers are unknown."
            ]

    def close(self) -> None:
        instance, self._instance, self._registry = self._instance, None, None
        if instance is not None:
            try:
                instance.dispose()
            except Exception:  # noqa: BLE001 - closing a broken instance must not mask the reading's note
                pass


def gather(
    bridge: Bridge,
    settings: Any,
    only: Sequence[str] = (),
    *,
    target: int | None = None,
    registry: RegistryReader | None = None,
    timeout: float = 60.0,
) -> StatsReport:
    """Read every queue of interest and the registry once.

    ``settings`` is a run config's :class:`~dagster_taskiq_sync.wire.settings.Settings`. The
    queues are ``only``, else the config's default queue, its routed queues and every queue a live
    worker consumes.
    SQS errors of one queue are that queue's ``error``; an SQS failure for the whole reading (endpoint
    unreachable, no credentials) raises one :class:`TaskiqSyncError` sentence; SQS gets ``timeout``
    seconds in all.
    """
    reader = registry or RegistryReader()
    try:
        workers, notes = reader.read()
    finally:
        if registry is None:
            reader.close()
    names = (
        with_lanes(only, settings.sqs.queue_name)
        if only and settings.lanes
        else list(only)
        or [
            *settings.config_queues(),
            *(q for w in workers or () if w.looks_alive() for q in w.queues),
        ]
    )
    try:
        stats = bridge.call(queue_depths, settings.sqs, list(dict.fromkeys(names)), timeout=timeout)
    except TaskiqSyncError:
        raise
    except Exception as exc:  # noqa: BLE001 - one sentence instead of a vendor traceback
        raise translate_error(exc, settings.sqs, "reading queue attributes", None) from None
    add_workers(
        stats,
        workers,
        prefetch_multiplier=settings.prefetch_multiplier,
        config_concurrency=settings.worker_concurrency,
        target=target,
        lanes=_lanes(settings, [s.queue for s in stats]),
    )
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return StatsReport(now, settings.sqs.describe_endpoint(), stats, workers, notes)


def _lanes(settings: Any, names: Sequence[str]) -> dict[str, str]:
    """Bulk lane -> its queue, for each queue shown whose lane is shown too (execution.config.lanes)."""
    if not settings.lanes:
        return {}
    shown = set(names)
    pairs = ((lane_queue(q, settings.sqs.queue_name(q)), q) for q in names)
    return {lane: queue for lane, queue in pairs if lane in shown}
