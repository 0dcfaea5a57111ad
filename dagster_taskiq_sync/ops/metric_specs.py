"""Every metric workers, orchestrators and the queue exporter expose, declared once.

:data:`WORKER_METRICS`, :data:`SQS_METRICS`, :data:`ORCHESTRATOR_METRICS` and
:data:`QUEUE_METRICS` are the single place each metric's name, type, labels and meaning are
written: ``metrics`` creates them, the queue exporter fills the queue ones, and
:func:`metrics_reference_markdown` renders them as the table the docs show.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

PREFIX = "dagster_taskiq_"

# 50 ms .. 1 h: trivial ops take tens of milliseconds, backfills run for an hour.
STEP_SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
# A ReceiveMessage call includes its long poll (up to 20 s); every other action is a round trip.
SQS_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30)
SEND_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

# Why a worker moved a message that can never run to the dead-letter queue.
DEAD_LETTER_REASONS = ("malformed", "signature", "unknown_run", "never_sent", "cannot_run", "other")
# Which of a step's time limits stopped it (wire/time_limits.py).
TIME_LIMIT_KINDS = ("soft", "hard")
# Why a step child was replaced by a fresh one.
RECYCLE_REASONS = ("max_tasks_per_child", "max_memory_per_child", "unusable", "other")


@dataclass(frozen=True)
class MetricSpec:
    """One metric: the single place its name, type, labels and meaning are written."""

    name: str  # without PREFIX
    kind: str  # "counter", "gauge" or "histogram"
    labels: tuple[str, ...]
    help: str
    buckets: Sequence[float] = ()

    @property
    def full_name(self) -> str:
        # prometheus_client appends _total to counters itself and wants the name without it.
        return PREFIX + self.name

    @property
    def exposed_name(self) -> str:
        return self.full_name + ("_total" if self.kind == "counter" else "")


_QUEUE = ("queue",)
_QUEUE_JOB = ("queue", "job")

WORKER_METRICS = (
    MetricSpec("worker_steps_received", "counter", _QUEUE, "Step messages taken from SQS."),
    MetricSpec("worker_steps_started", "counter", _QUEUE_JOB, "Steps whose process was started."),
    MetricSpec("worker_steps_succeeded", "counter", _QUEUE_JOB, "Steps that ran to their end and succeeded."),
    MetricSpec(
        "worker_steps_failed",
        "counter",
        _QUEUE_JOB,
        "Steps that failed: the step failed or is up for retry (its error is in the run's event log), or its "
        "process ended with a non-zero exit code or without reporting a result.",
    ),
    MetricSpec(
        "worker_steps_killed",
        "counter",
        _QUEUE_JOB,
        "Steps killed by the worker (cancel request, run over, hard time limit, shutdown deadline).",
    ),
    MetricSpec(
        "worker_steps_time_limited",
        "counter",
        ("queue", "limit"),
        "Steps stopped by a time limit: limit=soft (interrupted; the op may clean up), limit=hard (killed); "
        "from an op tag dagster-taskiq/(soft_)time_limit or task_(soft_)time_limit.",
    ),
    MetricSpec(
        "worker_runs_time_limited",
        "counter",
        ("queue", "limit"),
        "Launched runs (TaskiqRunLauncher) stopped by a time limit: limit=soft (interrupted, run failed), "
        "limit=hard (run process killed, run failed); from a run tag dagster-taskiq/(soft_)time_limit or the "
        "launcher's task_(soft_)time_limit.",
    ),
    MetricSpec(
        "worker_steps_dropped_duplicate",
        "counter",
        _QUEUE,
        "Step messages delivered again for an attempt that already started or ran; dropped without running.",
    ),
    MetricSpec(
        "worker_messages_dead_lettered",
        "counter",
        ("queue", "reason"),
        "Messages refused as unable ever to run and left to the queue's redrive policy, which moves them "
        "to NAME-dlq after max-receive-count receives (each receive counts).",
    ),
    MetricSpec(
        "worker_step_duration_seconds",
        "histogram",
        _QUEUE_JOB,
        "Seconds from a step process's start to its end, whatever the outcome.",
        STEP_SECONDS_BUCKETS,
    ),
    MetricSpec(
        "worker_step_queue_wait_seconds",
        "histogram",
        _QUEUE_JOB,
        "Seconds from the orchestrator sending a step message (SQS SentTimestamp) to its process starting.",
        STEP_SECONDS_BUCKETS,
    ),
    MetricSpec("worker_busy_slots", "gauge", (), "Steps (or launched runs) running now."),
    MetricSpec("worker_free_slots", "gauge", (), "Slots (-c) not running anything."),
    MetricSpec("worker_prefetched_messages", "gauge", (), "Messages held but not started yet."),
    MetricSpec(
        "worker_ready",
        "gauge",
        (),
        "1 while /readyz answers ok; 0 while starting, draining after SIGTERM or with SQS unreachable.",
    ),
    MetricSpec(
        "worker_visibility_extensions",
        "counter",
        (),
        "Message visibility extensions sent while steps run (one per message per heartbeat).",
    ),
    MetricSpec("worker_s3_offload_reads", "counter", (), "Step payloads read from the S3 offload bucket."),
    MetricSpec(
        "worker_s3_offload_read_bytes", "counter", (), "Bytes of step payloads read from the S3 offload bucket."
    ),
    MetricSpec(
        "worker_step_child_recycles",
        "counter",
        ("reason",),
        "Step children replaced by a fresh process (max_tasks, max_memory, killed, crashed).",
    ),
)

SQS_METRICS = (
    MetricSpec(
        "sqs_call_duration_seconds",
        "histogram",
        ("action",),
        "Seconds per SQS API call, retries included; ReceiveMessage includes its long poll.",
        SQS_SECONDS_BUCKETS,
    ),
    MetricSpec(
        "sqs_call_errors",
        "counter",
        ("action", "error"),
        "SQS API calls that failed after botocore's retries, by error code or class.",
    ),
)

ORCHESTRATOR_METRICS = (
    MetricSpec("orchestrator_steps_sent", "counter", _QUEUE, "Step messages SQS accepted."),
    MetricSpec(
        "orchestrator_steps_send_failed",
        "counter",
        _QUEUE,
        "Step messages that could not be sent within broker_outage_timeout (their run fails).",
    ),
    MetricSpec(
        "orchestrator_step_send_duration_seconds",
        "histogram",
        _QUEUE,
        "Seconds from a step being launched to SQS accepting its message (sender queue, retries and S3 "
        "offload included).",
        SEND_SECONDS_BUCKETS,
    ),
    MetricSpec(
        "orchestrator_steps_in_flight",
        "gauge",
        ("run_id", "job"),
        "Steps of a run sent and not yet finished; the series is removed when the run ends.",
    ),
)

# What `queues stats --serve` exports (ops/queue_exporter.py): SQS's numbers and the worker
# registry's, per queue, read from outside the workers (a queue nobody consumes has no worker to
# report it). SQS has no age of the oldest message in its API (ApproximateAgeOfOldestMessage is a
# CloudWatch metric); worker_step_queue_wait_seconds is the wait of the messages that did start.
QUEUE_METRICS = (
    MetricSpec(
        "queue_messages_visible", "gauge", _QUEUE, "Messages waiting to be received (SQS ApproximateNumberOfMessages)."
    ),
    MetricSpec(
        "queue_messages_in_flight",
        "gauge",
        _QUEUE,
        "Messages received and held by workers, not yet deleted (SQS ApproximateNumberOfMessagesNotVisible).",
    ),
    MetricSpec(
        "queue_messages_delayed",
        "gauge",
        _QUEUE,
        "Messages not receivable yet (SQS ApproximateNumberOfMessagesDelayed).",
    ),
    MetricSpec(
        "queue_dead_letter_messages",
        "gauge",
        ("queue", "dead_letter_queue"),
        "Messages in the queue's dead-letter queue (its RedrivePolicy target); no series without one.",
    ),
    MetricSpec(
        "queue_live_workers",
        "gauge",
        _QUEUE,
        "Live workers consuming the queue (worker registry); no series when the registry cannot be read.",
    ),
    MetricSpec(
        "queue_worker_slots", "gauge", _QUEUE, "Summed concurrency (-c) of the live workers consuming the queue."
    ),
    MetricSpec(
        "queue_free_slots",
        "gauge",
        _QUEUE,
        "Slots of those workers not running anything (0 for a stopping worker).",
    ),
    MetricSpec(
        "queue_replicas_needed",
        "gauge",
        _QUEUE,
        "ceil((visible + in flight) / target backlog per worker), as queues stats and KEDA's aws-sqs-queue scaler; "
        "with lanes, a queue's bulk lane's messages count in the queue's series and the lane has none.",
    ),
    MetricSpec(
        "queue_readable",
        "gauge",
        _QUEUE,
        "1 when the last reading of the queue succeeded; 0 when it failed (missing queue, refused, SQS unreachable).",
    ),
    MetricSpec(
        "queue_stats_age_seconds",
        "gauge",
        (),
        "Seconds since the numbers served were read from SQS (readings are cached; see --cache-seconds).",
    ),
    MetricSpec("queue_stats_read_seconds", "gauge", (), "Seconds the last reading of SQS and the registry took."),
)


def metrics_reference_markdown() -> str:
    """The metrics table the docs show, from the declarations above."""
    lines = ["| metric | type | labels | meaning |", "|---|---|---|---|"]
    for title, specs in (
        ("worker", WORKER_METRICS),
        ("worker and orchestrator", SQS_METRICS),
        ("orchestrator", ORCHESTRATOR_METRICS),
        ("queues (`queues stats --serve`)", QUEUE_METRICS),
    ):
        lines.append(f"| **{title}** | | | |")
        for spec in specs:
            labels = ", ".join(f"`{label}`" for label in spec.labels) or "-"
            lines.append(f"| `{spec.exposed_name}` | {spec.kind} | {labels} | {spec.help} |")
    return "\n".join(lines) + "\n"
