"""Lanes on real workers: a backfill's steps go to the bulk lane and an interactive run's steps
overtake its backlog, while the bulk lane takes nothing new; a bulk run no live worker can take
from a lane stays on its queue; step messages on standard queues carry their fair-queue group.

Assertions are on the order of events in the instance's event log, never on durations (the bulk
lane's quiet window is a lower bound the worker keeps, whatever the machine's speed).
"""

from __future__ import annotations

import os
import sys

from dagster import DagsterEventType, execute_job, reconstructable

from dagster_taskiq_sync.config.worker_config import STEP_NICENESS
from dagster_taskiq_sync.wire.bridge import Bridge
from dagster_taskiq_sync.wire.broker import Outgoing
from dagster_taskiq_sync.wire.broker_client import BrokerClient
from dagster_taskiq_sync.wire.lanes import BULK_STEP_NICENESS
from dagster_taskiq_sync.wire.settings import SQSSettings

from .. import jobs, lane_jobs
from ..helpers import BackgroundRun, WorkerProcess, make_config, sqs_client, wait_for


def _events(instance, run_id):
    return [(r.timestamp, r.dagster_event) for r in instance.all_logs(run_id) if r.dagster_event is not None]


def _said(instance, run_id) -> list[str]:
    return [r.user_message for r in instance.all_logs(run_id)]


def _niceness(instance, run_id) -> set[int]:
    said = [m for m in _said(instance, run_id) if m.startswith("niceness ")]
    return {int(text.split()[1]) for text in said}


def _said_of(instance, run_id, prefix: str) -> set[str]:
    return {m[len(prefix) :] for m in _said(instance, run_id) if m.startswith(prefix)}


def _sent_to(instance, run_id) -> set[str]:
    return {
        e.event_specific_data.metadata["queue"].value
        for _ts, e in _events(instance, run_id)
        if e.event_type == DagsterEventType.STEP_WORKER_STARTING
    }


def test_an_interactive_run_overtakes_a_backfills_queued_backlog(endpoint, instance, tmp_path):
    # Given lanes on, a worker with one slot (and its interactive slot), and a backfill run whose
    # eight 0.4 s branches are all queued at once (no in-flight cap)
    queue = "lanes"
    config, path = make_config(
        endpoint, tmp_path, queue, lanes=True, steps_in_flight_per_slot="none", min_steps_in_flight=1
    )
    depths = sqs_client(endpoint.url).list_queues(QueueNamePrefix="lanes")["QueueUrls"]
    assert any(url.endswith("/lanes-bulk") for url in depths), depths  # queues create made the lane
    worker = WorkerProcess(path, "lanes", tmp_path, ["-q", queue, "-c", "1", "--bulk-yield", "2"]).wait_ready()
    run_config = {"execution": {"config": config}}
    try:
        backfill = BackgroundRun(lane_jobs.backlog, instance, run_config, tags={"dagster/backfill": "lanes-test"})
        big = backfill.run_id()
        wait_for(
            lambda: any(
                e.event_type == DagsterEventType.STEP_START and e.step_key.startswith("branch_")
                for _ts, e in _events(instance, big)
            ),
            timeout=120,
            what="the backfill's branches to start",
        )
        # When an interactive run starts on the same queue
        with execute_job(reconstructable(lane_jobs.interactive), instance=instance, run_config=run_config) as small:
            assert small.success
        assert backfill.wait(300).success
        # Then the backfill went to the bulk lane, and says so, and the interactive run did not
        assert _sent_to(instance, big) == {"lanes-bulk"} and _sent_to(instance, small.run_id) == {"lanes"}
        assert any("go to its bulk lane 'lanes-bulk'" in m for m in _said(instance, big))
        # And each interactive step started with at most one branch starting in between (without
        # lanes: behind every branch still queued), in the slot a worker keeps for it
        branch_starts = [
            ts
            for ts, e in _events(instance, big)
            if e.event_type == DagsterEventType.STEP_START and e.step_key.startswith("branch_")
        ]
        small_events = _events(instance, small.run_id)
        for step in ("first", "second"):
            sent = next(
                ts
                for ts, e in small_events
                if e.event_type == DagsterEventType.STEP_WORKER_STARTING and e.step_key == step
            )
            started = next(
                ts for ts, e in small_events if e.event_type == DagsterEventType.STEP_START and e.step_key == step
            )
            overtaking = [ts for ts in branch_starts if sent < ts < started]
            assert len(overtaking) <= 1, (step, len(overtaking))
        small_ended = max(ts for ts, e in small_events if e.event_type == DagsterEventType.STEP_SUCCESS)
        assert max(branch_starts) > small_ended  # the backlog was still there when the interactive run ended
        # And from the interactive run's first step to 1.5 s after its last (--bulk-yield 2), the
        # worker took no new bulk step: at most the one branch it held already started
        small_started = min(ts for ts, e in small_events if e.event_type == DagsterEventType.STEP_START)
        yielding = [ts for ts in branch_starts if small_started < ts < small_ended + 1.5]
        assert len(yielding) <= 1, yielding
        # And bulk steps ran at a lower CPU priority than interactive ones
        base = os.getpriority(os.PRIO_PROCESS, 0)  # the worker's, inherited from this process
        assert _niceness(instance, small.run_id) == {min(19, base + STEP_NICENESS)}  # the default --step-niceness
        assert _niceness(instance, big) == {min(19, base + BULK_STEP_NICENESS)}
        if sys.platform.startswith("linux"):  # and bulk ones were scheduled SCHED_IDLE, interactive ones not
            assert _said_of(instance, big, "policy ") == {"idle"}
            assert _said_of(instance, small.run_id, "policy ") == {"other"}
    finally:
        assert worker.stop() == 0


def test_a_bulk_run_stays_on_its_queue_when_no_live_worker_consumes_the_lane(workers, executor_config, instance):
    # Given lanes on in the run's config, and the shared workers, which do not consume lanes
    # (an old worker during a rolling upgrade looks the same to the orchestrator)
    run_config = {"execution": {"config": {**executor_config, "lanes": True}}}
    # When a run of negative priority (a bulk one) runs
    result = execute_job(
        reconstructable(jobs.diamond), instance=instance, run_config=run_config, tags={"dagster/priority": "-1"}
    )
    # Then its steps went to the queue the workers consume, and the run says why
    assert result.success
    assert _sent_to(instance, result.run_id) == {"dagster"}
    said = _said(instance, result.run_id)
    assert any("bulk (its run priority is -1) but no live worker consumes 'dagster-bulk'" in m for m in said), said


def test_a_step_message_on_a_standard_queue_carries_its_group(endpoint):
    # Given a standard queue
    sqs = sqs_client(endpoint.url)
    url = sqs.create_queue(QueueName="lanes-groups")["QueueUrl"]
    settings = SQSSettings(endpoint_url=endpoint.url, region="us-east-1", default_queue="lanes-groups")
    # When messages of two groups are sent (one on its own, two in a batch)
    with Bridge() as bridge:
        client = BrokerClient(settings, bridge, ["lanes-groups"])
        client.start()
        try:
            client.send(queue="lanes-groups", task_id="t1", body=b"{}", group="run-a")
            client.send_many([Outgoing("lanes-groups", f"t{i}", b"{}", "run-b") for i in (2, 3)])
        finally:
            client.stop()
    # Then each carries its MessageGroupId (moto keeps it; SQS fair queues use it)
    got = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, MessageSystemAttributeNames=["All"])
    assert sorted(m["Attributes"].get("MessageGroupId") for m in got["Messages"]) == ["run-a", "run-b", "run-b"]


FAUXQS = "fauxqs@1.9.2"
SERVE_FAUXQS = """
import { buildApp } from "fauxqs";
const app = buildApp({ logger: false });
console.log(await app.listen({ port: 0, host: "127.0.0.1" }));
"""


def _send_two_groups_and_receive(sqs) -> list[tuple[str, str | None]]:
    url = sqs.create_queue(QueueName="groups-check")["QueueUrl"]
    entries = [{"Id": f"a{i}", "MessageBody": f"A{i}", "MessageGroupId": "run-a"} for i in range(3)]
    sqs.send_message_batch(QueueUrl=url, Entries=entries)
    sqs.send_message(QueueUrl=url, MessageBody="B0", MessageGroupId="run-b")
    got = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, MessageSystemAttributeNames=["All"])
    return [(m["Body"], m.get("Attributes", {}).get("MessageGroupId")) for m in got["Messages"]]


def test_what_moto_and_fauxqs_do_with_a_message_group_on_a_standard_queue(endpoint, tmp_path):
    """The README's sentence on the local endpoints: both accept the id on a standard queue and
    deliver in send order (no fairness to measure); moto keeps the id, fauxqs drops it."""
    import shutil
    import subprocess
    from pathlib import Path

    assert _send_two_groups_and_receive(sqs_client(endpoint.url)) == [
        ("A0", "run-a"),
        ("A1", "run-a"),
        ("A2", "run-a"),
        ("B0", "run-b"),
    ]
    npm, node = shutil.which("npm"), shutil.which("node")
    if npm is None or node is None:
        import pytest

        pytest.skip("fauxqs needs node and npm (apt-get install nodejs npm); moto was checked")
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dagster-taskiq-sync" / FAUXQS
    if not (cache / "node_modules" / "fauxqs").is_dir():  # ~20 s once, then cached
        subprocess.run([npm, "install", "--prefix", str(cache), FAUXQS], check=True, capture_output=True, timeout=300)
    script = cache / "serve.mjs"
    script.write_text(SERVE_FAUXQS)
    server = subprocess.Popen([node, str(script)], stdout=subprocess.PIPE, text=True, cwd=cache)
    try:
        url = server.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), url
        import boto3

        sqs = boto3.client(
            "sqs", endpoint_url=url, region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x"
        )
        assert _send_two_groups_and_receive(sqs) == [("A0", None), ("A1", None), ("A2", None), ("B0", None)]
    finally:
        server.terminate()
        server.wait(10)
