"""What OpenTelemetry tracing costs per step, on and off.

    .venv/bin/python -m benchmarks.tracing off   # the off path: ns per check, and no opentelemetry import
    .venv/bin/python -m benchmarks.tracing on    # the on path: µs of span work per step, and the child's flush

Off (no ``OTEL_*`` exporter variables): the checks a step passes through (the sender's, the
request's, the step child's) each read one module global; the process must not have imported
``opentelemetry`` afterwards. On: the spans of one step (send with its context injected, queue
wait, admit, run, settle) recorded by the real SDK and exported by the real OTLP/HTTP exporter
to a collector on loopback that accepts and drops them; the step child's flush before it
answers its worker is timed on its own, since that is the only part on the step's critical path
that waits on the network.
"""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

from dagster_taskiq_sync._dagster.names import KnownExecutionState, serialize_value
from dagster_taskiq_sync.wire import tracing
from dagster_taskiq_sync.wire.deliveries import Delivery
from dagster_taskiq_sync.wire.messages import StepMessage, decode, encode


def _message() -> StepMessage:
    return StepMessage("0b6f9c7e-6a43-4c1e-9d55-3c2f9a1d2b10", "emit_one", 1, serialize_value(KnownExecutionState()))


def off(number: int = 1_000_000) -> None:
    from dagster_taskiq_sync.worker.traces import RequestSpans

    assert not tracing.wanted(os.environ), "unset the OTEL_* exporter variables to measure the off path"
    tracing.active()  # decided once
    start = time.perf_counter_ns()
    for _ in range(number):
        RequestSpans.begin()
    per_check = (time.perf_counter_ns() - start) / number
    body = encode(_message(), "dagster")
    decode(body)
    imported = sorted(m for m in sys.modules if m.split(".")[0] == "opentelemetry")
    print(f"off: {per_check:.0f} ns per check (a step passes about 4); opentelemetry modules imported: {imported}")


class _Sink(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def on(steps: int = 2000) -> None:
    from dagster_taskiq_sync.orchestrator.sender import send_span
    from dagster_taskiq_sync.worker.admission import Outcome, Verdict
    from dagster_taskiq_sync.worker.child_pipe import Pickup
    from dagster_taskiq_sync.worker.traces import ChildSpans, RequestSpans

    baseline = []  # what a step's message costs anyway: built, encoded, decoded
    for _ in range(steps):
        start = time.perf_counter_ns()
        decode(encode(_message(), "dagster"))
        baseline.append((time.perf_counter_ns() - start) / 1000)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{server.server_address[1]}"
    os.environ.setdefault("OTEL_SERVICE_NAME", "bench")
    tracing.shutdown()
    traced = tracing.activate_in_child()
    assert traced is not None, "install the [otel] extra"
    child = ChildSpans(traced)
    worker = SimpleNamespace(name="bench@host")
    run = SimpleNamespace(job_name="bench_job")
    span_us, flush_ms = [], []
    for _ in range(steps):
        start = time.perf_counter_ns()
        message, send = send_span(traced, _message(), "dagster", "dagster", "bench_job")
        body = encode(message, "dagster")
        send.end()
        now = time.time()
        delivery = Delivery("dagster", "url", "rh", "mid", 1, body, {}, received_at=now, sent_at=now - 0.01)
        request = SimpleNamespace(message=decode(body), delivery=delivery, worker=worker, run=run, label="step")
        request.settle = lambda verdict: verdict
        spans = RequestSpans(traced)
        spans.admitted(request, None)
        pickup = Pickup("bench@host", "host", 1, "dagster", "mid", 1, now, message.run_id, "emit_one", 1)
        run_span = child.start(request.message.trace, pickup)
        run_span.end()
        spans.settle(request, Verdict(Outcome.DONE))
        span_us.append((time.perf_counter_ns() - start) / 1000)
        flushed = time.perf_counter_ns()
        traced.flush(tracing.FLUSH_SECONDS)  # what the step child waits for before answering
        flush_ms.append((time.perf_counter_ns() - flushed) / 1e6)
    server.shutdown()
    print(
        f"on: {statistics.median(span_us) - statistics.median(baseline):.0f} µs of span work per step "
        f"(median of {steps}, over the {statistics.median(baseline):.0f} µs its message costs anyway; p90 "
        f"{statistics.quantiles(span_us, n=10)[-1]:.0f}), the child's flush to a loopback collector "
        f"{statistics.median(flush_ms):.2f} ms (median; p90 {statistics.quantiles(flush_ms, n=10)[-1]:.2f})"
    )


if __name__ == "__main__":
    {"off": off, "on": on}[sys.argv[1] if len(sys.argv) > 1 else "off"]()
