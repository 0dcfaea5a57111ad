"""What workers and orchestrators count, in Prometheus terms.

Every metric is declared once, in :data:`WORKER_METRICS`, :data:`SQS_METRICS` or
:data:`ORCHESTRATOR_METRICS`; the classes below create them in a *private*
``CollectorRegistry`` (one per worker, never prometheus_client's global one, so two workers in
one test process or a user's own metrics never collide), and :func:`metrics_reference_markdown`
renders the same declarations as the table the docs show.

The worker calls plain-named methods (``metrics.step_started(queue, job)``,
``metrics.sqs_call("ReceiveMessage", 0.2)``) and never branches on whether metrics are on:
without ``--metrics-port`` it holds a :class:`NullMetrics`, whose methods do nothing.

Labels stay bounded: ``queue`` is a queue name as given to ``worker start -q`` (Celery form),
``job`` a Dagster job name, ``action`` an SQS API action, ``reason`` and ``error`` come from
small fixed sets or error class names. Run ids appear only on the orchestrator's in-flight gauge,
whose series is removed when the run ends.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

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
        "ceil((visible + in flight) / target backlog per worker), as queues stats and KEDA's aws-sqs-queue scaler.",
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

_LABEL_VALUE = re.compile(r"[^A-Za-z0-9_.:-]")


def _bounded(value: str, allowed: Sequence[str]) -> str:
    return value if value in allowed else "other"


def _error_class(error: object) -> str:
    """A short, bounded label for an error: an AWS error code, an exception class name, or a string."""
    if isinstance(error, BaseException):
        response = getattr(error, "response", None)  # botocore ClientError
        code = response.get("Error", {}).get("Code") if isinstance(response, dict) else None
        text = code or type(error).__name__
    else:
        text = str(error)
    return _LABEL_VALUE.sub("_", text)[:64] or "unknown"


def _create(spec: MetricSpec, registry: CollectorRegistry):
    if spec.kind == "counter":
        return Counter(spec.full_name, spec.help, spec.labels, registry=registry)
    if spec.kind == "gauge":
        return Gauge(spec.full_name, spec.help, spec.labels, registry=registry)
    return Histogram(spec.full_name, spec.help, spec.labels, registry=registry, buckets=spec.buckets)


class _Registry:
    """A private registry holding one metric object per spec, plus exposition."""

    def __init__(self, specs: Sequence[MetricSpec], process: bool) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._m = {spec.name: _create(spec, self.registry) for spec in specs}
        if process:  # process_cpu_seconds_total, process_resident_memory_bytes, python_info, ...
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition a scrape asked for (OpenMetrics if its Accept header says so): body, content type."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


class NullMetrics:
    """The worker's metrics when ``--metrics-port`` is not given: every method does nothing.

    :class:`WorkerMetrics` overrides each of these with the same signature (a test keeps the two
    in step), so the worker calls them unconditionally.
    """

    enabled = False

    def step_received(self, queue: str) -> None:
        """A step message was taken from ``queue`` (before any check)."""

    def step_started(self, queue: str, job: str, waited: float | None = None) -> None:
        """A step process started; ``waited``: seconds since the message was sent (SQS SentTimestamp)."""

    def step_succeeded(self, queue: str, job: str, seconds: float) -> None:
        """A step process ended with exit code 0 after ``seconds``."""

    def step_failed(self, queue: str, job: str, seconds: float) -> None:
        """A step process ended with a non-zero exit code, or without reporting a result."""

    def step_killed(self, queue: str, job: str, seconds: float) -> None:
        """The worker killed a step (cancel, run over, hard time limit, shutdown deadline)."""

    def step_time_limited(self, queue: str, limit: str) -> None:
        """A step's time limit fired; ``limit`` is one of :data:`TIME_LIMIT_KINDS`."""

    def step_dropped_duplicate(self, queue: str) -> None:
        """A message for an attempt that already started or ran was dropped without running it."""

    def message_dead_lettered(self, queue: str, reason: str) -> None:
        """A message was left to the redrive policy; ``reason`` is one of :data:`DEAD_LETTER_REASONS`."""

    def visibility_extended(self, count: int = 1) -> None:
        """The heartbeat extended the visibility of ``count`` held messages."""

    def s3_offload_read(self, nbytes: int) -> None:
        """A step payload of ``nbytes`` bytes was read from the S3 offload bucket."""

    def sqs_call(self, action: str, seconds: float, error: object = None) -> None:
        """An SQS API call (``ReceiveMessage``, ``DeleteMessage``, ...) took ``seconds``; ``error`` if it
        failed (an exception, whose AWS error code or class name becomes the label, or a string)."""

    def step_child_recycled(self, reason: str) -> None:
        """A step child was replaced; ``reason`` is one of :data:`RECYCLE_REASONS`."""

    def track_slots(self, snapshot: Callable[[], tuple[int, int, int]]) -> None:
        """Read ``(busy, free, prefetched)`` from ``snapshot()`` at every scrape (it must be cheap and
        never raise)."""

    def track_readiness(self, check: Callable[[], tuple[bool, str]]) -> None:
        """Read ``check()`` (the worker's /readyz check: cheap, never blocks) at every scrape."""

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """Exposition for a scrape: (body, content type)."""
        return b"", "text/plain; version=0.0.4; charset=utf-8"


class WorkerMetrics(NullMetrics):
    """One worker's metrics, in its own registry (``.registry``)."""

    enabled = True

    def __init__(self, process_metrics: bool = True) -> None:
        self._r = _Registry(WORKER_METRICS + SQS_METRICS, process=process_metrics)
        self.registry = self._r.registry
        self._m = self._r._m

    def step_received(self, queue: str) -> None:
        self._m["worker_steps_received"].labels(queue).inc()

    def step_started(self, queue: str, job: str, waited: float | None = None) -> None:
        self._m["worker_steps_started"].labels(queue, job).inc()
        if waited is not None:
            self._m["worker_step_queue_wait_seconds"].labels(queue, job).observe(max(0.0, waited))

    def _ended(self, counter: str, queue: str, job: str, seconds: float) -> None:
        self._m[counter].labels(queue, job).inc()
        self._m["worker_step_duration_seconds"].labels(queue, job).observe(max(0.0, seconds))

    def step_succeeded(self, queue: str, job: str, seconds: float) -> None:
        self._ended("worker_steps_succeeded", queue, job, seconds)

    def step_failed(self, queue: str, job: str, seconds: float) -> None:
        self._ended("worker_steps_failed", queue, job, seconds)

    def step_killed(self, queue: str, job: str, seconds: float) -> None:
        self._ended("worker_steps_killed", queue, job, seconds)

    def step_time_limited(self, queue: str, limit: str) -> None:
        self._m["worker_steps_time_limited"].labels(queue, _bounded(limit, TIME_LIMIT_KINDS)).inc()

    def step_dropped_duplicate(self, queue: str) -> None:
        self._m["worker_steps_dropped_duplicate"].labels(queue).inc()

    def message_dead_lettered(self, queue: str, reason: str) -> None:
        self._m["worker_messages_dead_lettered"].labels(queue, _bounded(reason, DEAD_LETTER_REASONS)).inc()

    def visibility_extended(self, count: int = 1) -> None:
        if count > 0:
            self._m["worker_visibility_extensions"].inc(count)

    def s3_offload_read(self, nbytes: int) -> None:
        self._m["worker_s3_offload_reads"].inc()
        self._m["worker_s3_offload_read_bytes"].inc(max(0, nbytes))

    def sqs_call(self, action: str, seconds: float, error: object = None) -> None:
        self._m["sqs_call_duration_seconds"].labels(action).observe(max(0.0, seconds))
        if error is not None:
            self._m["sqs_call_errors"].labels(action, _error_class(error)).inc()

    def step_child_recycled(self, reason: str) -> None:
        self._m["worker_step_child_recycles"].labels(_bounded(reason, RECYCLE_REASONS)).inc()

    def track_slots(self, snapshot: Callable[[], tuple[int, int, int]]) -> None:
        for index, name in enumerate(("worker_busy_slots", "worker_free_slots", "worker_prefetched_messages")):
            self._m[name].set_function(lambda i=index: snapshot()[i])

    def track_readiness(self, check: Callable[[], tuple[bool, str]]) -> None:
        def ready() -> float:
            try:
                return 1.0 if check()[0] else 0.0
            except Exception:  # noqa: BLE001 - as /readyz: a check that raises means not ready
                return 0.0

        self._m["worker_ready"].set_function(ready)

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        return self._r.render(accept)


class NullOrchestratorMetrics:
    """The orchestrator's metrics when none are exposed: every method does nothing."""

    enabled = False

    def step_sent(self, queue: str, seconds: float) -> None:
        """SQS accepted a step message ``seconds`` after the step was launched."""

    def step_send_failed(self, queue: str) -> None:
        """A step message could not be sent within broker_outage_timeout."""

    def steps_in_flight(self, run_id: str, job: str, count: int) -> None:
        """``count`` steps of the run are sent and not yet finished."""

    def run_finished(self, run_id: str, job: str) -> None:
        """The run ended: drop its in-flight series."""

    def sqs_call(self, action: str, seconds: float, error: object = None) -> None:
        """As :meth:`NullMetrics.sqs_call`."""

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        return b"", "text/plain; version=0.0.4; charset=utf-8"


class OrchestratorMetrics(NullOrchestratorMetrics):
    """The orchestrator's (run process's) metrics, in its own registry; serve them with
    :class:`~dagster_taskiq_sync.ops.health_server.HealthServer` when a port is configured."""

    enabled = True

    def __init__(self, process_metrics: bool = False) -> None:
        self._r = _Registry(ORCHESTRATOR_METRICS + SQS_METRICS, process=process_metrics)
        self.registry = self._r.registry
        self._m = self._r._m

    def step_sent(self, queue: str, seconds: float) -> None:
        self._m["orchestrator_steps_sent"].labels(queue).inc()
        self._m["orchestrator_step_send_duration_seconds"].labels(queue).observe(max(0.0, seconds))

    def step_send_failed(self, queue: str) -> None:
        self._m["orchestrator_steps_send_failed"].labels(queue).inc()

    def steps_in_flight(self, run_id: str, job: str, count: int) -> None:
        self._m["orchestrator_steps_in_flight"].labels(run_id, job).set(count)

    def run_finished(self, run_id: str, job: str) -> None:
        try:
            self._m["orchestrator_steps_in_flight"].remove(run_id, job)
        except KeyError:
            pass

    def sqs_call(self, action: str, seconds: float, error: object = None) -> None:
        self._m["sqs_call_duration_seconds"].labels(action).observe(max(0.0, seconds))
        if error is not None:
            self._m["sqs_call_errors"].labels(action, _error_class(error)).inc()

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        return self._r.render(accept)


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
