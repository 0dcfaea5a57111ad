"""Who exports queue depth to Prometheus: `dagster-taskiq-sync queues stats --serve PORT`.

A worker's own metrics cannot say how many messages wait on a queue nobody consumes, or how deep
a dead-letter queue is, so this small exporter reads them from outside: the numbers of `queues
stats` (:func:`~dagster_taskiq_sync.ops.stats.gather`), as the gauges of
:data:`~dagster_taskiq_sync.ops.metric_specs.QUEUE_METRICS`, in its own ``CollectorRegistry``, on the
probe server of the workers (:class:`~dagster_taskiq_sync.ops.health_server.HealthServer`: bounded
threads, connections and time per client).

SQS is read on a scrape, never more than once per ``cache_seconds`` whatever the number of
scrapers: a scrape in between gets the last reading, and while one reading is in progress
other scrapes get the previous one instead of starting another. A reading gets ``read_timeout``
seconds of SQS (below Prometheus's default 10 s scrape timeout). A failed reading is cached too,
so an SQS outage is not hammered either; it shows as ``queue_readable 0`` and no depth series
(unknown is not 0, so no alert sees an empty queue that may not be).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder

from dagster_taskiq_sync.ops.health_server import DEFAULT_HOST, HealthServer
from dagster_taskiq_sync.ops.metric_specs import QUEUE_METRICS, MetricSpec
from dagster_taskiq_sync.ops.stats import RegistryReader, StatsReport, gather
from dagster_taskiq_sync.wire.bridge import Bridge

log = logging.getLogger("dagster_taskiq_sync.queue_exporter")

DEFAULT_CACHE_SECONDS = 10.0
DEFAULT_READ_TIMEOUT = 8.0


@dataclass(frozen=True)
class Reading:
    """One reading of SQS and the registry (or why it failed), and when it was taken."""

    at: float  # the collector's clock
    seconds: float  # how long it took
    report: StatsReport | None
    error: str | None = None


class QueueStatsCollector:
    """A prometheus_client collector serving :data:`QUEUE_METRICS` from at most one reading per ``cache_seconds``.

    ``read`` takes a reading (raising on a failure of the whole reading); ``queues`` are the
    queues to mark unreadable when no reading has succeeded yet. ``clock`` is injectable.
    """

    def __init__(
        self,
        read: Callable[[], StatsReport],
        queues: Sequence[str],
        *,
        cache_seconds: float = DEFAULT_CACHE_SECONDS,
        first_wait: float = DEFAULT_READ_TIMEOUT + 2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._read = read
        self._known = list(queues)  # the queues of the last good reading
        self.cache_seconds = cache_seconds
        self._first_wait = first_wait
        self._clock = clock
        self._lock = threading.Lock()  # held while a reading is in progress
        self._cached: Reading | None = None
        self.readings = 0  # how many readings were taken (what SQS saw)

    def _fresh(self, reading: Reading | None) -> bool:
        return reading is not None and self._clock() - reading.at < self.cache_seconds

    def reading(self) -> Reading | None:
        """The cached reading if fresh, else a new one; the previous one while another scrape reads."""
        cached = self._cached
        if self._fresh(cached):
            return cached
        # Only the first scrapes wait (there is nothing to serve yet); later ones never queue up.
        if not self._lock.acquire(timeout=self._first_wait if cached is None else 0):
            return self._cached
        try:
            if self._fresh(self._cached):  # another scrape read while this one waited
                return self._cached
            started = self._clock()
            try:
                report, error = self._read(), None
            except Exception as exc:  # noqa: BLE001 - a failed reading is served as unreadable queues
                report, error = None, str(exc)
                if self._cached is None or self._cached.error != error:
                    log.warning("reading the queues failed: %s", error)
            self.readings += 1
            self._cached = Reading(at=self._clock(), seconds=self._clock() - started, report=report, error=error)
            return self._cached
        finally:
            self._lock.release()

    def ready(self) -> tuple[bool, str]:
        """/readyz: the last reading succeeded (no reading yet counts as ready)."""
        cached = self._cached
        if cached is not None and cached.error:
            return False, cached.error
        return True, "ok"

    def describe(self) -> Iterator[GaugeMetricFamily]:
        # Names for the registry's collision check, without reading SQS at registration.
        for spec in QUEUE_METRICS:
            yield _family(spec)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        reading = self.reading()
        families = {spec.name: _family(spec) for spec in QUEUE_METRICS}
        if reading is not None:
            families["queue_stats_age_seconds"].add_metric([], max(0.0, self._clock() - reading.at))
            families["queue_stats_read_seconds"].add_metric([], reading.seconds)
            if reading.report is not None:
                self._known = [s.queue for s in reading.report.queues]
                _add_report(families, reading.report)
            else:
                for queue in self._known:
                    families["queue_readable"].add_metric([queue], 0)
        yield from families.values()


def _family(spec: MetricSpec) -> GaugeMetricFamily:
    return GaugeMetricFamily(spec.full_name, spec.help, labels=list(spec.labels))


def _add_report(families: dict[str, GaugeMetricFamily], report: StatsReport) -> None:
    for s in report.queues:
        families["queue_readable"].add_metric([s.queue], 0 if s.error else 1)
        if s.error:
            continue
        families["queue_messages_visible"].add_metric([s.queue], s.visible)
        families["queue_messages_in_flight"].add_metric([s.queue], s.in_flight)
        families["queue_messages_delayed"].add_metric([s.queue], s.delayed)
        if s.replicas_needed is not None:  # None: a bulk lane, counted in its queue's series
            families["queue_replicas_needed"].add_metric([s.queue], s.replicas_needed)
        if s.dead_letter_queue is not None and s.dead_letter_depth is not None:
            families["queue_dead_letter_messages"].add_metric([s.queue, s.dead_letter_queue], s.dead_letter_depth)
        if s.workers is not None:
            families["queue_live_workers"].add_metric([s.queue], len(s.workers))
            families["queue_worker_slots"].add_metric([s.queue], sum(w.concurrency for w in s.workers))
            families["queue_free_slots"].add_metric([s.queue], sum(w.free for w in s.workers))


class QueueExporter:
    """`queues stats --serve`: the collector in its own registry, served on ``host:port`` until stopped."""

    def __init__(
        self,
        settings: Any,
        port: int,
        host: str = DEFAULT_HOST,
        *,
        only: Sequence[str] = (),
        target: int | None = None,
        cache_seconds: float = DEFAULT_CACHE_SECONDS,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
    ) -> None:
        self.settings = settings
        self._only, self._target, self._read_timeout = list(only), target, read_timeout
        self.bridge = Bridge(name="queue-exporter")
        self._registry_reader = RegistryReader()
        self.collector = QueueStatsCollector(
            self._read,
            self._only or [settings.sqs.default_queue],
            cache_seconds=cache_seconds,
            first_wait=read_timeout + 2,
        )
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        self.server = HealthServer(
            port,
            host,
            live=lambda: (True, "ok"),
            ready=self.collector.ready,
            metrics=self,
            port_flag="--serve",
            host_flag="--host",
        )

    def _read(self) -> StatsReport:
        return gather(
            self.bridge,
            self.settings,
            self._only,
            target=self._target,
            registry=self._registry_reader,
            timeout=self._read_timeout,
        )

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type

    @property
    def url(self) -> str:
        return self.server.url

    def start(self) -> QueueExporter:
        """Bind (a port in use is one sentence naming --serve), then serve."""
        self.bridge.start()
        try:
            self.server.start()
        except BaseException:
            self.bridge.stop()
            raise
        return self

    def stop(self) -> None:
        self.server.stop()
        self.bridge.stop()
        self._registry_reader.close()
