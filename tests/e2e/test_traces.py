"""OpenTelemetry traces end to end: a run's steps traced from the orchestrator's send through SQS
to a CLI-started worker and its step child, exported over OTLP/HTTP to a collector on loopback.

The collector is a small ``http.server`` that decodes ``ExportTraceServiceRequest`` bodies with
``opentelemetry-proto``; the worker and the orchestrator (this process) are configured only by
OpenTelemetry's standard environment variables.
"""

from __future__ import annotations

import gzip
import os
import secrets
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from dagster import DagsterInstance, execute_job, reconstructable
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from dagster_taskiq_sync._dagster.names import KnownExecutionState, serialize_value
from dagster_taskiq_sync.wire import tracing
from dagster_taskiq_sync.wire.messages import StepMessage, encode
from dagster_taskiq_sync.wire.tracing import TraceContext

from .. import otel_jobs
from ..helpers import CLI, WorkerProcess, make_config, sqs_client, wait_for

QUEUE = "otel"
RUNS = "otel-runs"
ROOT = Path(__file__).resolve().parents[2]
STATUS_ERROR = 2  # opentelemetry.proto.trace.v1.Status.STATUS_CODE_ERROR


@dataclass
class Traced:
    collector: Collector
    config: dict
    worker: WorkerProcess
    tmp: Path
    endpoint: object
    instance: DagsterInstance
    home: Path


@dataclass
class Span:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent: str
    attributes: dict
    status: int
    events: list[str] = field(default_factory=list)


def _attributes(pairs) -> dict:
    return {kv.key: getattr(kv.value, kv.value.WhichOneof("value")) for kv in pairs}


class Collector:
    """An OTLP/HTTP trace receiver on 127.0.0.1 that keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        lock = threading.Lock()
        spans = self.spans

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                got = [
                    Span(
                        service=_attributes(rs.resource.attributes).get("service.name", ""),
                        name=s.name,
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        parent=s.parent_span_id.hex(),
                        attributes=_attributes(s.attributes),
                        status=s.status.code,
                        events=[e.name for e in s.events],
                    )
                    for rs in request.resource_spans
                    for ss in rs.scope_spans
                    for s in ss.spans
                ]
                with lock:
                    spans.extend(got)
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200 if self.path == "/v1/traces" else 404)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def trace(self, trace_id: str) -> list[Span]:
        return [s for s in list(self.spans) if s.trace_id == trace_id]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def otel_env(collector: Collector, service: str) -> dict[str, str]:
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.url,
        "OTEL_SERVICE_NAME": service,
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # ms: spans leave the worker quickly, not after 5 s
    }


@pytest.fixture(scope="module")
def traced(endpoint, tmp_path_factory):
    """A collector and one worker (steps on queue otel, runs on otel-runs), on its own DAGSTER_HOME
    whose run launcher is TaskiqRunLauncher; tracing on by environment variables only."""
    tmp = tmp_path_factory.mktemp("otel")
    collector = Collector()
    config, path = make_config(endpoint, tmp, QUEUE, QUEUE, RUNS)
    home = tmp / "home"
    home.mkdir()
    launcher = {"broker": endpoint.broker_url, "default_queue": RUNS, "config_source": config["config_source"]}
    (home / "dagster.yaml").write_text(
        yaml.safe_dump(
            {
                "telemetry": {"enabled": False},
                "run_launcher": {"module": "dagster_taskiq_sync", "class": "TaskiqRunLauncher", "config": launcher},
                "run_coordinator": {"module": "dagster.core.run_coordinator", "class": "DefaultRunCoordinator"},
            }
        )
    )
    env = {**os.environ, **otel_env(collector, "otel-worker"), "DAGSTER_HOME": str(home)}
    worker = WorkerProcess(path, "otel", tmp, ["-q", QUEUE, "-q", RUNS, "-c", "2"], env=env).wait_ready()
    try:
        with DagsterInstance.from_config(str(home)) as instance:
            yield Traced(collector, config, worker, tmp, endpoint, instance, home)
    finally:
        code = worker.stop()
        collector.close()
        assert code == 0, worker.log()


@pytest.fixture
def orchestrator_traced(traced, monkeypatch):
    """This process (the run's orchestrator) traces too, by the same environment variables."""
    collector = traced.collector
    for name, value in otel_env(collector, "otel-orchestrator").items():
        monkeypatch.setenv(name, value)
    tracing.shutdown()  # decide again, now with the variables set
    yield
    tracing.shutdown()


def _step_trace(collector: Collector, run_id: str, step_key: str, attempt: int) -> list[Span]:
    """The spans of one step attempt's trace, once all of them (with the user's span) arrived."""
    sends = [
        s
        for s in list(collector.spans)
        if s.name == f"send {step_key}"
        and s.attributes.get("dagster.run_id") == run_id
        and s.attributes.get("dagster.step_attempt") == attempt
    ]
    if len(sends) != 1:
        return []
    spans = collector.trace(sends[0].trace_id)
    want = 6 if step_key == "flaky_traced" else 5
    return spans if len(spans) >= want else []


def test_a_runs_steps_form_one_trace_per_step_attempt_with_the_right_parents(traced, orchestrator_traced):
    collector, config, worker, tmp, instance = (
        traced.collector,
        traced.config,
        traced.worker,
        traced.tmp,
        traced.instance,
    )
    result = execute_job(
        reconstructable(otel_jobs.traced_retry),
        instance=instance,
        run_config={
            "execution": {"config": config},
            "ops": {"flaky_traced": {"config": {"counter_file": str(tmp / "counter")}}},
        },
        raise_on_error=False,
    )
    assert result.success
    attempts = [("flaky_traced", 1), ("flaky_traced", 2), ("after_traced", 1)]
    traces = {
        (key, n): wait_for(
            lambda key=key, n=n: _step_trace(collector, result.run_id, key, n), timeout=30, what=f"{key} #{n} spans"
        )
        for key, n in attempts
    }
    assert len({spans[0].trace_id for spans in traces.values()}) == 3  # one tree per step attempt

    for (step_key, attempt), spans in traces.items():
        by_name = {s.name: s for s in spans}
        send = by_name[f"send {step_key}"]
        assert send.parent == "" and send.service == "otel-orchestrator"  # the root, in the orchestrator
        worker_side = [f"queue wait {step_key}", f"admit {step_key}", f"run {step_key}", f"settle {step_key}"]
        for name in worker_side:  # each one a child of the send span, recorded by the worker's processes
            assert by_name[name].parent == send.span_id, name
            assert by_name[name].service == "otel-worker", name
            assert (
                by_name[name].attributes
                | {
                    "dagster.run_id": result.run_id,
                    "dagster.step_key": step_key,
                    "dagster.step_attempt": attempt,
                    "dagster.step_retry": attempt > 1,
                    "dagster_taskiq_sync.queue": QUEUE,
                    "dagster_taskiq_sync.worker": worker.full_name,
                }
                == by_name[name].attributes
            ), name
        assert send.attributes["dagster.job_name"] == by_name[f"run {step_key}"].attributes["dagster.job_name"]
        assert send.attributes["dagster.job_name"] == "traced_retry"
        assert by_name[f"settle {step_key}"].attributes["dagster_taskiq_sync.outcome"] == "done"
        assert len(spans) == len(worker_side) + 1 + (step_key == "flaky_traced")  # nothing else in the trace
        if step_key == "flaky_traced":  # the user's own span nests under the step's run span
            assert by_name["user work"].parent == by_name[f"run {step_key}"].span_id
            assert by_name["user work"].attributes["attempt_seen"] == attempt

    first, retry = traces[("flaky_traced", 1)], traces[("flaky_traced", 2)]
    first_run = next(s for s in first if s.name == "run flaky_traced")
    assert first_run.attributes["dagster.step_outcome"] == "up_for_retry"
    assert first_run.status == STATUS_ERROR and "up_for_retry" in first_run.events
    retry_run = next(s for s in retry if s.name == "run flaky_traced")
    retry_send = next(s for s in retry if s.name == "send flaky_traced")
    assert retry_run.attributes["dagster.step_outcome"] == "success" and retry_run.status != STATUS_ERROR
    assert "retry" in retry_run.events and "retry" in retry_send.events
    assert retry_send.attributes["dagster.step_retry"] is True


def test_a_dead_lettered_step_says_so_on_its_settle_span(traced):
    # Given a step message whose run the worker's instance does not have, sent with trace context
    collector, endpoint = traced.collector, traced.endpoint
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    message = StepMessage(
        "nosuchrun-otel",
        "flaky_traced",
        1,
        serialize_value(KnownExecutionState()),
        trace=TraceContext(f"00-{trace_id}-{span_id}-01"),
    )
    sqs = sqs_client(endpoint.url)
    sqs.send_message(
        QueueUrl=sqs.get_queue_url(QueueName=QUEUE)["QueueUrl"], MessageBody=encode(message, QUEUE).decode()
    )

    # Then its settle span, under the sender's span, says it was dead-lettered and why
    def settle():
        return next((s for s in collector.trace(trace_id) if s.name == "settle flaky_traced"), None)

    span = wait_for(settle, timeout=30, what="the dead-lettered message's settle span")
    assert span.parent == span_id
    assert span.attributes["dagster_taskiq_sync.outcome"] == "dead_letter"
    assert "is not in this worker's Dagster instance" in span.attributes["dagster_taskiq_sync.reason"]
    assert span.status == STATUS_ERROR and "dead_lettered" in span.events
    admit = next(s for s in collector.trace(trace_id) if s.name == "admit flaky_traced")
    assert admit.attributes["dagster_taskiq_sync.outcome"] == "dead_letter"
    assert not [s for s in collector.trace(trace_id) if s.name.startswith("run ")]  # user code never ran


def test_a_launched_runs_trace_holds_its_steps_under_the_run_child(traced, tmp_path):
    # Given a run launched by TaskiqRunLauncher from `dagster job launch`, itself tracing
    collector, instance = traced.collector, traced.instance
    counter = tmp_path / "counter"
    counter.write_text("1")  # flaky_traced succeeds at once: two steps, one attempt each
    run_config = tmp_path / "run.yaml"
    run_config.write_text(
        yaml.safe_dump(
            {
                "execution": {"config": traced.config},
                "ops": {"flaky_traced": {"config": {"counter_file": str(counter)}}},
            }
        )
    )
    env = {**os.environ, **otel_env(collector, "otel-launcher"), "DAGSTER_HOME": str(traced.home)}
    dagster = str(Path(CLI).parent / "dagster")
    jobs_file = str(ROOT / "tests" / "otel_jobs.py")
    out = subprocess.run(
        [dagster, "job", "launch", "-f", jobs_file, "-j", "traced_retry", "-c", str(run_config)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    run_id = instance.get_runs(limit=1)[0].run_id
    wait_for(lambda: (r := instance.get_run_by_id(run_id)) and r.is_finished, timeout=90, what="the launched run")
    assert instance.get_run_by_id(run_id).is_success

    # Then one trace: the launcher's send is its root; the run child's run span holds the steps' sends
    def whole_trace():
        roots = [s for s in list(collector.spans) if s.name == f"send run {run_id}"]
        spans = collector.trace(roots[0].trace_id) if roots else []
        return spans if len(spans) >= 16 else None  # 5 for the run, 5 per step, the user's span

    spans = wait_for(whole_trace, timeout=30, what="the launched run's spans")
    by_name = {s.name: s for s in spans}
    send = by_name[f"send run {run_id}"]
    assert send.parent == "" and send.service == "otel-launcher"
    assert send.attributes["dagster.job_name"] == "traced_retry"
    assert send.attributes["dagster_taskiq_sync.launch"] == "launch"
    run_span = by_name[f"run {run_id}"]
    for name in (f"queue wait run {run_id}", f"admit run {run_id}", f"run {run_id}", f"settle run {run_id}"):
        assert by_name[name].parent == send.span_id and by_name[name].service == "otel-worker", name
        assert by_name[name].attributes["dagster.run_id"] == run_id, name
    for step_key in ("flaky_traced", "after_traced"):
        step_send = by_name[f"send {step_key}"]
        assert step_send.parent == run_span.span_id  # sent from inside the run child's run span
        assert step_send.service == "otel-worker"  # the run child runs the orchestrator
        assert by_name[f"run {step_key}"].parent == step_send.span_id
    assert by_name["user work"].parent == by_name["run flaky_traced"].span_id
    assert len(spans) == 16


def test_with_tracing_off_no_opentelemetry_module_is_imported():
    # Given the worker's, the step child's and the orchestrator's modules, and no OTEL_* variables
    code = """
import sys
from dagster_taskiq_sync.orchestrator import executor, launcher, step_handler
from dagster_taskiq_sync.worker import worker, step_child, request
from dagster_taskiq_sync.worker.traces import RequestSpans
from dagster_taskiq_sync.wire import tracing
from dagster_taskiq_sync.wire.messages import StepMessage, decode, encode
from dagster_taskiq_sync._dagster.names import KnownExecutionState, serialize_value
# When a step passes the checks a traced step would take
assert tracing.active() is None and RequestSpans.begin() is None
decode(encode(StepMessage("r", "s", 1, serialize_value(KnownExecutionState())), "q"))
print(sorted(m for m in sys.modules if m.split(".")[0] == "opentelemetry"))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    # Then nothing of OpenTelemetry was imported
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


@pytest.mark.slow  # its own worker for ~20 s of CI; the step child's flush bound has a unit test
def test_a_collector_that_is_down_costs_steps_nothing_but_their_spans(endpoint, instance, tmp_path, monkeypatch):
    # Given a worker and an orchestrator (this process) tracing to an OTLP endpoint where nothing listens
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    config, path = make_config(endpoint, tmp_path, "otel-down")
    env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": dead}
    worker = WorkerProcess(path, "otel-down", tmp_path, ["-q", "otel-down", "-c", "1"], env=env).wait_ready()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", dead)
    tracing.shutdown()
    try:
        # When a run's steps (traced: the step child exports before answering) run on it
        counter = tmp_path / "counter"
        counter.write_text("1")
        result = execute_job(
            reconstructable(otel_jobs.traced_retry),
            instance=instance,
            run_config={
                "execution": {"config": config},
                "ops": {"flaky_traced": {"config": {"counter_file": str(counter)}}},
            },
            raise_on_error=False,
        )
    finally:
        tracing.shutdown()
        code = worker.stop()
    # Then the run succeeds and the worker stops cleanly; only the spans are lost
    assert result.success
    assert code == 0, worker.log()
    assert "Traceback" not in worker.log()
