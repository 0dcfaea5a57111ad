"""The queue exporter's rules (`queues stats --serve`), with an injected clock and reading function:
scrapes cannot make it read SQS more than once per cache period, one reading at a time, and
what it does not know (a failed reading, an unreadable registry) is no series rather than 0.
tests/e2e/test_monitoring.py runs the real thing against the local endpoint."""

from __future__ import annotations

import threading

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dagster_taskiq_sync.ops.metric_specs import QUEUE_METRICS
from dagster_taskiq_sync.ops.queue_depths import QueueStats, WorkerSlots
from dagster_taskiq_sync.ops.queue_exporter import QueueStatsCollector
from dagster_taskiq_sync.ops.stats import StatsReport


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def report(visible: int = 3, workers: list[WorkerSlots] | None = None) -> StatsReport:
    main = QueueStats(
        queue="dagster",
        sqs_name="dagster",
        visible=visible,
        in_flight=2,
        delayed=1,
        dead_letter_queue="dagster-dlq",
        dead_letter_depth=4,
        workers=workers,
        replicas_needed=2,
    )
    gone = QueueStats(queue="gone", sqs_name="gone", error="SQS queue 'gone' does not exist")
    return StatsReport("2026-12-04T00:00:00+00:00", "http://sqs", [main, gone], None)


class Reader:
    """Counts readings; returns ``result`` or raises it."""

    def __init__(self, result) -> None:
        self.result = result
        self.calls = 0

    def __call__(self) -> StatsReport:
        self.calls += 1
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


def samples(collector: QueueStatsCollector) -> dict[tuple[str, tuple], float]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_a_reading_is_exported_per_queue_with_its_dead_letter_queue_and_slots():
    workers = [WorkerSlots("w1@h", "running", 4, 3, 1), WorkerSlots("w2@h", "stopping", 2, 1, 0)]
    collector = QueueStatsCollector(Reader(report(workers=workers)), ["dagster"], clock=Clock())
    found = samples(collector)
    q = (("queue", "dagster"),)
    assert found[("dagster_taskiq_queue_messages_visible", q)] == 3
    assert found[("dagster_taskiq_queue_messages_in_flight", q)] == 2
    assert found[("dagster_taskiq_queue_messages_delayed", q)] == 1
    assert found[("dagster_taskiq_queue_dead_letter_messages", (("dead_letter_queue", "dagster-dlq"), *q))] == 4
    assert found[("dagster_taskiq_queue_live_workers", q)] == 2
    assert found[("dagster_taskiq_queue_worker_slots", q)] == 6
    assert found[("dagster_taskiq_queue_free_slots", q)] == 1
    assert found[("dagster_taskiq_queue_replicas_needed", q)] == 2
    assert found[("dagster_taskiq_queue_readable", q)] == 1
    # A queue that cannot be read is readable 0 and has no depth (unknown is not empty)
    assert found[("dagster_taskiq_queue_readable", (("queue", "gone"),))] == 0
    assert ("dagster_taskiq_queue_messages_visible", (("queue", "gone"),)) not in found
    assert {name for name, _ in found} <= {spec.full_name for spec in QUEUE_METRICS}


def test_a_bulk_lanes_replicas_are_in_its_queues_series_and_it_has_none_of_its_own():
    reading = report()
    lane = QueueStats(queue="dagster-bulk", sqs_name="dagster-bulk", visible=7, replicas_needed=None)
    reading.queues.append(lane)
    found = samples(QueueStatsCollector(Reader(reading), ["dagster"], clock=Clock()))
    assert found[("dagster_taskiq_queue_messages_visible", (("queue", "dagster-bulk"),))] == 7
    assert found[("dagster_taskiq_queue_replicas_needed", (("queue", "dagster"),))] == 2
    assert ("dagster_taskiq_queue_replicas_needed", (("queue", "dagster-bulk"),)) not in found


def test_an_unknown_registry_exports_no_worker_series_rather_than_zero_workers():
    found = samples(QueueStatsCollector(Reader(report(workers=None)), ["dagster"], clock=Clock()))
    assert ("dagster_taskiq_queue_messages_visible", (("queue", "dagster"),)) in found
    assert not [name for name, _ in found if name.endswith(("live_workers", "free_slots", "worker_slots"))]


def test_scrapes_within_the_cache_period_share_one_reading():
    clock, reader = Clock(), Reader(report())
    collector = QueueStatsCollector(reader, ["dagster"], cache_seconds=10, clock=clock)
    samples(collector)
    clock.now += 9.9
    found = samples(collector)
    assert reader.calls == 1
    assert found[("dagster_taskiq_queue_stats_age_seconds", ())] == pytest.approx(9.9)
    clock.now += 0.1
    samples(collector)
    assert reader.calls == 2


def test_while_one_scrape_reads_the_others_get_the_previous_reading_at_once():
    clock = Clock()
    entered, release = threading.Event(), threading.Event()
    calls = []

    def slow_read() -> StatsReport:
        calls.append(1)
        if len(calls) == 2:  # the second reading hangs (SQS slow) until released
            entered.set()
            release.wait(10)
        return report(visible=len(calls))

    collector = QueueStatsCollector(slow_read, ["dagster"], cache_seconds=1, clock=clock)
    samples(collector)
    clock.now += 5
    reading = threading.Thread(target=samples, args=(collector,))
    reading.start()
    assert entered.wait(10)
    # Given a reading in progress, when another scrape comes, it gets the first reading without waiting
    found = samples(collector)
    assert found[("dagster_taskiq_queue_messages_visible", (("queue", "dagster"),))] == 1
    assert found[("dagster_taskiq_queue_stats_age_seconds", ())] == 5
    assert len(calls) == 2
    release.set()
    reading.join(10)
    assert samples(collector)[("dagster_taskiq_queue_messages_visible", (("queue", "dagster"),))] == 2


def test_a_failed_reading_marks_the_known_queues_unreadable_is_cached_and_not_ready():
    clock, reader = Clock(), Reader(report())
    collector = QueueStatsCollector(reader, ["dagster"], cache_seconds=10, clock=clock)
    samples(collector)
    reader.result = RuntimeError("cannot reach the SQS endpoint http://sqs while reading queue attributes")
    clock.now += 10
    found = samples(collector)
    # the queues of the last good reading, all unreadable, and no depth
    assert found[("dagster_taskiq_queue_readable", (("queue", "dagster"),))] == 0
    assert found[("dagster_taskiq_queue_readable", (("queue", "gone"),))] == 0
    assert not [name for name, _ in found if name.startswith("dagster_taskiq_queue_messages")]
    assert collector.ready() == (False, "cannot reach the SQS endpoint http://sqs while reading queue attributes")
    samples(collector)
    assert reader.calls == 2  # the failure is cached too: an outage is not hammered
    reader.result = report()
    clock.now += 10
    samples(collector)
    assert collector.ready() == (True, "ok")


def test_before_any_good_reading_the_configured_queues_are_the_unreadable_ones():
    collector = QueueStatsCollector(Reader(RuntimeError("no credentials")), ["dagster", "runs"], clock=Clock())
    found = samples(collector)
    assert {labels for name, labels in found if name == "dagster_taskiq_queue_readable"} == {
        (("queue", "dagster"),),
        (("queue", "runs"),),
    }


def test_registering_the_collector_does_not_read_sqs():
    reader = Reader(report())
    registry = CollectorRegistry(auto_describe=True)  # even a registry that describes collectors
    registry.register(QueueStatsCollector(reader, ["dagster"], clock=Clock()))
    assert reader.calls == 0


def test_serve_refuses_print_flags_a_cache_below_a_second_and_a_port_in_use_in_one_sentence():
    import socket

    from click.testing import CliRunner

    from dagster_taskiq_sync.cli import main
    from dagster_taskiq_sync.config.celery_compat import settings_from_executor_config
    from dagster_taskiq_sync.errors import ConfigError
    from dagster_taskiq_sync.ops.queue_exporter import QueueExporter

    out = CliRunner().invoke(main, ["queues", "stats", "--serve", "9100", "--json"])
    assert out.exit_code == 2 and "--serve serves metrics instead of printing; drop --watch and --json." in out.output
    out = CliRunner().invoke(main, ["queues", "stats", "--serve", "9100", "--cache-seconds", "0.5"])
    assert out.exit_code == 2 and "--cache-seconds 0.5 must be at least 1" in out.output
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        exporter = QueueExporter(settings_from_executor_config({"broker": "sqs://127.0.0.1:1"}), port)
        with pytest.raises(ConfigError, match=f"^--serve {port} is already in use on 127.0.0.1; pick another port"):
            exporter.start()
    assert not exporter.bridge.running  # nothing left behind
