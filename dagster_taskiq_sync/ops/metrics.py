"""What workers and orchestrators count, in Prometheus terms.

Every metric is declared once, in ``metric_specs``; the classes below create them in a *private*
``CollectorRegistry`` (one per worker, never prometheus_client's global one, so two workers in
one test process or a user's own metrics never collide).

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

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from dagster_taskiq_sync.ops.metric_specs import (
    DEAD_LETTER_REASONS,
    ORCHESTRATOR_METRICS,
    RECYCLE_REASONS,
    SQS_METRICS,
    TIME_LIMIT_KINDS,
    WORKER_METRICS,
    MetricSpec,
)

# The declarations (names, types, labels, help) are in metric_specs.

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

    def run_time_limited(self, queue: str, limit: str) -> None:
        """A launched run's time limit fired; ``limit`` is one of :data:`TIME_LIMIT_KINDS`."""

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

    def run_time_limited(self, queue: str, limit: str) -> None:
        self._m["worker_runs_time_limited"].labels(queue, _bounded(limit, TIME_LIMIT_KINDS)).inc()

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
