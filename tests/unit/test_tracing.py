"""OpenTelemetry tracing's rules: the trace context a message may carry (W3C's, whole, bounded, and
ignored rather than fatal when it is not), that signing covers it, and the on-switch."""

from __future__ import annotations

import json
import logging
import pickle

import pytest

from dagster_taskiq_sync.wire import tracing
from dagster_taskiq_sync.wire.messages import Keyring, RunMessage, SignatureError, StepMessage, TaskKind, decode, encode
from dagster_taskiq_sync.wire.tracing import TraceContext, trace_context, wanted
from dagster_taskiq_sync.worker.child_pipe import Pickup, StepTask
from dagster_taskiq_sync.worker.traces import SHORT_FLUSH_SECONDS, ChildSpans

PARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
KEY = "k" * 40


def _known_state() -> str:
    from dagster_taskiq_sync._dagster.names import KnownExecutionState, serialize_value

    return serialize_value(KnownExecutionState())


@pytest.mark.parametrize(
    "value",
    [
        PARENT,
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",  # not sampled
    ],
)
def test_a_w3c_traceparent_is_taken(value):
    assert trace_context({"traceparent": value}) == TraceContext(value)


@pytest.mark.parametrize(
    "value",
    [
        None,
        42,
        "",
        PARENT + "\n",  # whole match only
        PARENT.upper(),  # W3C: lowercase hex
        "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # a version this reader does not know
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # the invalid version
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # all-zero trace id
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # all-zero span id
        "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",  # short trace id
        PARENT + "-extra",
        "x" * 100_000,
        ["00", "4bf92f3577b34da6a3ce929d0e0e4736"],
    ],
)
def test_anything_else_in_traceparent_is_ignored_not_an_error(value):
    assert trace_context({"traceparent": value, "tracestate": "a=b"}) is None


def test_labels_that_are_not_an_object_carry_no_trace():
    for labels in (None, [], "traceparent", 7):
        assert trace_context(labels) is None


@pytest.mark.parametrize(
    "state",
    ["congo=t61rcWkgMzE", "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE", "tenant@vendor=x, b=y", "a-b_c*d/e=v v"],
)
def test_a_w3c_tracestate_travels_with_its_traceparent(state):
    assert trace_context({"traceparent": PARENT, "tracestate": state}) == TraceContext(PARENT, state)


@pytest.mark.parametrize(
    "state",
    [
        "",
        "Upper=x",  # keys are lowercase
        "a=b,",  # an empty member
        "a=b\n",
        "a=b=c",
        "a=" + "v" * 257,  # values are at most 256 characters
        ",".join(f"k{i}=v" for i in range(33)),  # at most 32 members
        "a=" + "v" * 255 + "," + "b=" + "v" * 255,  # over 512 characters in all
        7,
    ],
)
def test_a_malformed_tracestate_is_dropped_and_the_traceparent_kept(state):
    assert trace_context({"traceparent": PARENT, "tracestate": state}) == TraceContext(PARENT)


def test_a_trace_context_cannot_be_built_from_unchecked_values():
    with pytest.raises(ValueError):
        TraceContext(PARENT.upper())
    with pytest.raises(ValueError):
        TraceContext(PARENT, "Bad=x")


def test_a_step_message_carries_its_trace_context_in_its_labels():
    message = StepMessage("run-1", "op_a", 1, _known_state(), trace=TraceContext(PARENT, "a=b"))
    body = encode(message, "q")
    assert json.loads(body)["labels"] == {"queue": "q", "traceparent": PARENT, "tracestate": "a=b"}
    assert decode(body).trace == TraceContext(PARENT, "a=b")
    untraced = decode(encode(StepMessage("run-1", "op_a", 1, _known_state()), "q"))
    assert untraced.trace is None and "traceparent" not in json.loads(encode(untraced, "q"))["labels"]


def test_a_run_message_carries_its_trace_context_too():
    message = RunMessage(TaskKind.RUN, "run-1", "launch", trace=TraceContext(PARENT))
    assert decode(encode(message, "q")).trace == TraceContext(PARENT)


def test_a_step_with_a_malformed_traceparent_still_runs_untraced():
    data = json.loads(encode(StepMessage("run-1", "op_a", 1, _known_state()), "q"))
    data["labels"]["traceparent"] = "00-" + "z" * 52
    message = decode(json.dumps(data).encode())
    assert message.trace is None and message.step_key == "op_a"


def test_signing_covers_the_trace_context():
    keyring = Keyring.from_secrets(KEY)
    body = encode(StepMessage("run-1", "op_a", 1, _known_state(), trace=TraceContext(PARENT)), "q")
    attributes = keyring.sign(body)
    keyring.verify(body, attributes)
    forged = body.replace(PARENT.encode(), PARENT.replace("-01", "-00").encode())
    assert forged != body
    with pytest.raises(SignatureError):
        keyring.verify(forged, attributes)


def test_a_step_childs_task_keeps_its_trace_context_across_the_pipe():
    pickup = Pickup("w", "h", 1, "q", "m", 1, 0.0, "run-1", "op_a", 1)
    task = StepTask("run-1", "op_a", 1, "{}", pickup, trace=TraceContext(PARENT))
    assert pickle.loads(pickle.dumps(task)).trace == TraceContext(PARENT)
    assert StepTask("run-1", "op_a", 1, "{}", pickup).trace is None  # untraced by default


@pytest.mark.parametrize(
    ("env", "on"),
    [
        ({}, False),
        ({"OTEL_SERVICE_NAME": "x"}, False),  # naming a service asks for no exporter
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, True),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, False),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, False),
        ({"OTEL_SDK_DISABLED": "TRUE", "OTEL_TRACES_EXPORTER": "otlp"}, False),
        ({"OTEL_SDK_DISABLED": "false", "OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "  "}, False),
    ],
)
def test_tracing_is_on_when_opentelemetrys_variables_ask_for_an_exporter(env, on):
    assert wanted(env) is on


def test_off_never_looks_for_the_extra(monkeypatch):
    def looked():
        raise AssertionError("the [otel] extra was looked for with tracing off")

    monkeypatch.setattr(tracing, "extra_installed", looked)
    assert tracing._set_up({"OTEL_SERVICE_NAME": "x"}, global_provider=False) is None


def test_on_without_the_extra_says_what_to_install(monkeypatch, caplog):
    monkeypatch.setattr(tracing, "extra_installed", lambda: False)
    with caplog.at_level(logging.WARNING, logger="dagster_taskiq_sync.tracing"):
        assert tracing._set_up({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, global_provider=False) is None
    assert "pip install 'dagster-taskiq-sync[otel]'" in caplog.text


def test_a_process_decides_once(monkeypatch):
    calls = []
    monkeypatch.setattr(tracing, "_set_up", lambda env, global_provider: calls.append(env) or None)
    monkeypatch.setattr(tracing, "_current", tracing._UNSET)
    assert tracing.active() is None
    assert tracing.active() is None
    assert len(calls) == 1  # afterwards, off is one read of a module global


class _Tracing:
    """What ChildSpans needs of a tracer, recording the flush budgets it is given."""

    def __init__(self, answers):
        self.answers, self.budgets = list(answers), []

    def fail(self, span, description):
        span.failed = description

    def flush(self, timeout):
        self.budgets.append(timeout)
        return self.answers.pop(0)


class _Span:
    failed = None

    def end(self):
        pass


def test_a_step_child_waits_less_for_its_exporter_after_a_flush_timed_out():
    fake = _Tracing([False, False, True, True])
    spans = ChildSpans(fake)  # type: ignore[arg-type]
    for _ in range(4):
        spans.end(_Span())
    assert fake.budgets == [tracing.FLUSH_SECONDS, SHORT_FLUSH_SECONDS, SHORT_FLUSH_SECONDS, tracing.FLUSH_SECONDS]


def test_the_exporters_opentelemetrys_variables_name(caplog):
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter

    assert [type(e) for e in tracing._exporters({})] == [OTLPSpanExporter]  # OTLP over HTTP by default
    both = tracing._exporters({"OTEL_TRACES_EXPORTER": "otlp,console"})
    assert [type(e) for e in both] == [OTLPSpanExporter, ConsoleSpanExporter]
    with caplog.at_level(logging.WARNING, logger="dagster_taskiq_sync.tracing"):
        assert tracing._exporters({"OTEL_TRACES_EXPORTER": "zipkin"}) == []
    assert "OTEL_TRACES_EXPORTER names 'zipkin'" in caplog.text


def test_grpc_without_its_exporter_turns_tracing_off_saying_what_to_install(monkeypatch, caplog):
    import builtins

    real_import = builtins.__import__

    def no_grpc(name, *args, **kwargs):
        if name.startswith("opentelemetry.exporter.otlp.proto.grpc"):
            raise ModuleNotFoundError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_grpc)
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
    with caplog.at_level(logging.WARNING, logger="dagster_taskiq_sync.tracing"):
        assert tracing._set_up(env, global_provider=False) is None
    assert "OTEL_EXPORTER_OTLP_PROTOCOL=grpc needs opentelemetry-exporter-otlp-proto-grpc" in caplog.text


def test_a_hosts_own_tracer_provider_is_used_not_replaced(monkeypatch):
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    host = TracerProvider()
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: host)
    built = tracing._build({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, global_provider=True)
    assert built.provider is host and not built.owned


def test_our_provider_names_the_service_unless_the_user_did(monkeypatch):
    from opentelemetry import trace

    monkeypatch.setattr(trace, "get_tracer_provider", lambda: trace.ProxyTracerProvider())
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    ours = tracing._build({"OTEL_TRACES_EXPORTER": "console"}, global_provider=False)
    assert ours.provider.resource.attributes["service.name"] == "dagster-taskiq-sync"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "etl-workers")
    theirs = tracing._build({"OTEL_TRACES_EXPORTER": "console"}, global_provider=False)
    assert theirs.provider.resource.attributes["service.name"] == "etl-workers"
    for built in (ours, theirs):
        built.provider.shutdown()


def test_a_worker_records_no_span_for_a_message_its_sender_did_not_trace():
    from types import SimpleNamespace

    from dagster_taskiq_sync.worker.admission import Outcome, Verdict
    from dagster_taskiq_sync.worker.traces import RequestSpans

    class NoSpans:
        def start(self, *args, **kwargs):
            raise AssertionError("a span was started for an untraced message")

        span_between = start

    message = StepMessage("run-1", "op_a", 1, "{}")
    request = SimpleNamespace(message=message, run=None, label="step", settle=lambda verdict: verdict)
    spans = RequestSpans(NoSpans())  # type: ignore[arg-type]
    spans._admitted(request, None)
    spans._settled(request, Verdict(Outcome.DONE), 0)
    unread = SimpleNamespace(message=None, run=None, label="message m", settle=lambda verdict: verdict)
    spans._admitted(unread, Verdict(Outcome.DEAD_LETTER, "not JSON"))  # unreadable: nobody's trace


def test_a_flush_waits_for_a_stuck_exporter_only_as_long_as_it_was_told():
    import threading

    class StuckProvider:
        """An SDK provider whose export hangs (a collector that does not answer) until released."""

        def __init__(self):
            self.release, self.calls = threading.Event(), 0

        def get_tracer(self, *args):
            return None

        def force_flush(self, timeout_millis=None):  # the SDK ignores the timeout: so must we
            self.calls += 1
            self.release.wait()
            return True

    provider = StuckProvider()
    traced = tracing.Tracing(provider, owned=True)
    assert traced.flush(0.01) is False  # gave up waiting; the export goes on in its own thread
    assert traced.flush(0.01) is False
    assert provider.calls == 1  # the second flush waited on the first rather than stacking another
    provider.release.set()
    assert traced.flush(5) is True
