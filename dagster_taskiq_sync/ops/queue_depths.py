"""Who reads the queues' depths: `queues stats` (through ``stats.gather``), its exporter and the
operator page.

Run by an operator's tools, never by the executor or the workers, whose IAM policies (``iam.py``)
therefore need none of these calls.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from aiobotocore.session import get_session
from botocore import exceptions as boto_exc

from dagster_taskiq_sync.ops.admin import error_code, error_message
from dagster_taskiq_sync.wire.aws import client_kwargs
from dagster_taskiq_sync.wire.broker import QUEUE_CREATE_HINT
from dagster_taskiq_sync.wire.deliveries import SQS_MIN_DEFAULT_SIZE
from dagster_taskiq_sync.wire.settings import SQSSettings


@dataclass(frozen=True)
class WorkerSlots:
    name: str
    state: str
    concurrency: int
    running: int
    free: int


@dataclass
class QueueStats:
    """One queue's depth, dead-letter depth, consumers and the replicas its backlog calls for."""

    queue: str  # Celery name
    sqs_name: str
    url: str | None = None
    error: str | None = None  # the queue cannot be read (missing, refused)
    visible: int = 0
    in_flight: int = 0
    delayed: int = 0
    max_message_size: int | None = None  # bytes the queue accepts inline (MaximumMessageSize); larger goes through S3
    dead_letter_queue: str | None = None
    dead_letter_depth: int | None = None
    dead_letter_error: str | None = None
    workers: list[WorkerSlots] | None = None  # None: no registry (DAGSTER_HOME not set)
    target_backlog_per_worker: int = 1
    target_source: str = ""
    # None on a bulk lane's row (lane_of): its queue's row counts the lane's messages in its replicas
    replicas_needed: int | None = 0
    notes: list[str] = field(default_factory=list)
    # With lanes: on a queue's row, its bulk lane (whose messages its replicas count too); on the
    # lane's row, that queue. The lane's workers are the queue's: one set of slots serves both.
    lane: str | None = None
    lane_of: str | None = None

    @property
    def free_slots(self) -> int | None:
        return None if self.workers is None else sum(w.free for w in self.workers)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["free_slots"] = self.free_slots
        out["live_workers"] = None if self.workers is None else len(self.workers)
        return out


def size_text(size: int | None) -> str:
    """A message size as `queues stats` shows it: 1 MiB, 256 KiB, 1000 B."""
    if size is None:
        return "?"
    for unit, factor in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= factor and size % factor == 0:
            return f"{size // factor} {unit}"
    return f"{size} B"


def replicas_needed(visible: int, in_flight: int, target: int) -> int:
    """Workers needed so that each holds at most ``target`` messages: ceil((visible + in_flight) / target)."""
    return math.ceil((visible + in_flight) / max(1, target))


async def queue_depths(settings: SQSSettings, queues: Sequence[str]) -> list[QueueStats]:
    """Visible / in flight / delayed messages of each queue and the depth of its dead-letter queue."""
    session = get_session()
    found: list[QueueStats] = []
    async with session.create_client("sqs", **client_kwargs(settings, session)) as sqs:
        for queue in dict.fromkeys(queues):
            stats = QueueStats(queue=queue, sqs_name=settings.queue_name(queue))
            found.append(stats)
            try:
                stats.url = (
                    settings.predefined_queues.get(queue)
                    or (await sqs.get_queue_url(QueueName=stats.sqs_name))["QueueUrl"]
                )
                attrs = (await sqs.get_queue_attributes(QueueUrl=stats.url, AttributeNames=["All"]))["Attributes"]
            except boto_exc.ClientError as exc:
                stats.error = _queue_error(exc, stats.sqs_name, settings)
                continue
            stats.visible = int(attrs.get("ApproximateNumberOfMessages", 0))
            stats.in_flight = int(attrs.get("ApproximateNumberOfMessagesNotVisible", 0))
            stats.delayed = int(attrs.get("ApproximateNumberOfMessagesDelayed", 0))
            stats.max_message_size = int(attrs.get("MaximumMessageSize", SQS_MIN_DEFAULT_SIZE))
            target_arn = dead_letter_arn(attrs)
            if target_arn is None:
                continue
            stats.dead_letter_queue = target_arn.rsplit(":", 1)[-1]
            try:
                dlq_url = await url_for_arn(sqs, target_arn)
                dlq = await sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["ApproximateNumberOfMessages"])
                stats.dead_letter_depth = int(dlq["Attributes"].get("ApproximateNumberOfMessages", 0))
            except boto_exc.ClientError as exc:
                stats.dead_letter_error = _queue_error(exc, stats.dead_letter_queue, settings)
    return found


def add_workers(
    stats: Sequence[QueueStats],
    workers: Sequence[Any] | None,
    *,
    prefetch_multiplier: int,
    config_concurrency: int | None,
    target: int | None,
    lanes: Mapping[str, str] | None = None,
) -> None:
    """Fill in each queue's live workers, free slots and replicas needed.

    ``workers`` are registry records (None when there is no registry). The target backlog per
    worker is ``target`` if given, else a worker's concurrency x prefetch: the most messages one
    worker holds, so a backlog above it waits for a worker. The concurrency is the smallest of the
    live workers' on that queue, else the config's worker_concurrency, else 1. ``lanes`` maps each
    bulk lane shown to its queue (execution.config.lanes): see :func:`fold_lanes`.
    """
    for item in stats:
        live = None
        if workers is not None:
            live = [
                WorkerSlots(
                    name=w.name,
                    state=w.state,
                    concurrency=w.concurrency,
                    running=len(w.running),
                    # A stopping worker takes no new messages.
                    free=max(0, w.concurrency - len(w.running)) if w.state == "running" else 0,
                )
                for w in workers
                if item.queue in w.queues and w.looks_alive()
            ]
        item.workers = live
        if target:
            item.target_backlog_per_worker, item.target_source = target, "--target-backlog-per-worker"
        else:
            if live:
                concurrency, source = min(w.concurrency for w in live), "smallest live worker's"
            elif config_concurrency:
                concurrency, source = config_concurrency, "worker_concurrency"
            else:
                concurrency, source = 1, "no live worker or worker_concurrency"
            item.target_backlog_per_worker = concurrency * prefetch_multiplier
            item.target_source = f"concurrency {concurrency} ({source}) x prefetch {prefetch_multiplier}"
        item.replicas_needed = replicas_needed(item.visible, item.in_flight, item.target_backlog_per_worker)
    fold_lanes(stats, lanes or {})


def fold_lanes(stats: Sequence[QueueStats], lanes: Mapping[str, str]) -> None:
    """Count each bulk lane's backlog with its queue's: the workers of ``-q Q`` consume ``Q`` and
    ``Q-bulk`` with one set of slots, so the pool needs ceil((both backlogs) / target) replicas (as
    KEDA's summed triggers ask), not that for each queue, and the lane's workers and free slots are
    the queue's, not more. ``lanes`` maps lane -> queue. A lane with a live worker that does not
    consume its queue (a worker of another config) is shown on its own, as any queue."""
    by_name = {s.queue: s for s in stats}
    for lane, queue in lanes.items():
        row, base = by_name.get(lane), by_name.get(queue)
        if row is None or base is None or row.error or base.error:
            continue
        if row.workers is not None and base.workers is not None:
            if not {w.name for w in row.workers} <= {w.name for w in base.workers}:
                continue
        row.lane_of, base.lane = queue, lane
        row.replicas_needed = None
        base.replicas_needed = replicas_needed(
            base.visible + row.visible, base.in_flight + row.in_flight, base.target_backlog_per_worker
        )


def dead_letter_arn(attrs: Mapping[str, str]) -> str | None:
    raw = attrs.get("RedrivePolicy")
    if not raw:
        return None
    try:
        return str(json.loads(raw)["deadLetterTargetArn"])
    except (ValueError, KeyError, TypeError):
        return None


async def url_for_arn(sqs: Any, arn: str) -> str:
    parts = arn.split(":")
    return (await sqs.get_queue_url(QueueName=parts[5], QueueOwnerAWSAccountId=parts[4]))["QueueUrl"]


def _queue_error(exc: boto_exc.ClientError, name: str, settings: SQSSettings) -> str:
    code = error_code(exc)
    if "NonExistentQueue" in code or code == "QueueDoesNotExist":
        return f"SQS queue {name!r} does not exist at {settings.describe_endpoint()}; {QUEUE_CREATE_HINT}"
    return f"reading SQS queue {name!r} failed ({code}: {error_message(exc)})"
