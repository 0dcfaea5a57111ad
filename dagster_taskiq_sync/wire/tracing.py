"""OpenTelemetry traces (the optional ``[otel]`` extra): the trace context a message carries, and
one process's tracer.

**The wire part** has no dependency: a message's TaskIQ ``labels`` may carry W3C trace context
(``traceparent``, ``tracestate``; the names TaskIQ's own OpenTelemetry middleware uses), inside the
body that signing covers. It is advisory: :func:`trace_context` takes it from an untrusted message
only when it matches W3C's rules whole (version ``00``, bounded sizes), and otherwise ignores it,
as W3C tells a receiver to; a step is never refused for its trace context, and an old worker
ignores labels it does not know.

**The tracer** exists only when tracing is on (:func:`wanted`): OpenTelemetry's own environment
variables ask for an exporter (``OTEL_TRACES_EXPORTER`` other than ``none``, or
``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) and ``OTEL_SDK_DISABLED``
is not ``true``. Off, :func:`active` is one read of a module global after its first call, and
nothing imports ``opentelemetry``. On without the extra installed, the first call logs one
warning saying what to install. A process sets its tracer up on first use, so a forked child
sets up its own after the fork (an exporter's threads do not survive a fork); a process whose
host already installed an SDK tracer provider uses that one. Only step and run children, where
user code runs, install ours as the global provider, so user code's spans nest under the step's.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("dagster_taskiq_sync.tracing")

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
INSTRUMENTATION = "dagster_taskiq_sync"
DEFAULT_SERVICE_NAME = "dagster-taskiq-sync"
FLUSH_SECONDS = 2.0  # the longest a step child (or a run's end) waits for its spans to be exported
EXTRA_HINT = "pip install 'dagster-taskiq-sync[otel]'"

# W3C Trace Context level 1: version 00 is exactly 55 characters; ids are lowercase hex, not all zero.
_TRACEPARENT = re.compile(r"00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")
_TRACESTATE_MAX = 512  # W3C: propagate at least 512 characters; we carry at most that
_TS_KEY = r"(?:[a-z][a-z0-9_\-*/]{0,255}|[a-z0-9][a-z0-9_\-*/]{0,240}@[a-z][a-z0-9_\-*/]{0,13})"
_TS_VALUE = r"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
_TS_MEMBER = rf"{_TS_KEY}={_TS_VALUE}"
_TRACESTATE = re.compile(rf"{_TS_MEMBER}(?:[ \t]*,[ \t]*{_TS_MEMBER}){{0,31}}")

# Span attributes, in Dagster's words (and OpenTelemetry's messaging conventions for the queue).
RUN_ID = "dagster.run_id"
JOB_NAME = "dagster.job_name"
STEP_KEY = "dagster.step_key"
ATTEMPT = "dagster.step_attempt"
LAUNCH = "dagster_taskiq_sync.launch"  # a run message: launch, resume-N
RETRY = "dagster.step_retry"  # true on every attempt after the first
QUEUE = "dagster_taskiq_sync.queue"  # the Celery queue name the user wrote
WORKER = "dagster_taskiq_sync.worker"
OUTCOME = "dagster_taskiq_sync.outcome"  # settle: done, release, dead_letter
REASON = "dagster_taskiq_sync.reason"
RECEIVE_COUNT = "messaging.aws_sqs.receive_count"
SQS_QUEUE = "messaging.destination.name"
MESSAGE_ID = "messaging.message.id"


@dataclass(frozen=True)
class TraceContext:
    """W3C trace context as it travels in a message's labels (checked by :func:`trace_context`)."""

    traceparent: str
    tracestate: str | None = None

    def __post_init__(self) -> None:  # built only from checked values (a worker's pickle to its child is trusted)
        if not _valid_parent(self.traceparent) or (self.tracestate is not None and not _valid_state(self.tracestate)):
            raise ValueError("not a W3C trace context")

    def labels(self) -> dict[str, str]:
        return {TRACEPARENT: self.traceparent, **({TRACESTATE: self.tracestate} if self.tracestate else {})}


def trace_context(labels: Any) -> TraceContext | None:
    """The trace context in an untrusted message's labels; None when absent or not W3C's."""
    if not isinstance(labels, dict):
        return None
    parent, state = labels.get(TRACEPARENT), labels.get(TRACESTATE)
    if not isinstance(parent, str) or not _valid_parent(parent):
        return None
    return TraceContext(parent, state if _valid_state(state) else None)  # W3C: drop a bad tracestate only


def _valid_parent(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 55 and _TRACEPARENT.fullmatch(value) is not None


def _valid_state(value: Any) -> bool:
    return isinstance(value, str) and len(value) <= _TRACESTATE_MAX and _TRACESTATE.fullmatch(value) is not None


# --- the on-switch ---------------------------------------------------------------------------------


def wanted(env: Mapping[str, str]) -> bool:
    """Whether OpenTelemetry's environment variables ask this process for traces."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporters == "none":
        return False
    return bool(
        exporters
        or env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
        or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    )


def extra_installed() -> bool:
    import importlib.util

    try:
        return all(importlib.util.find_spec(m) is not None for m in ("opentelemetry.sdk.trace", "opentelemetry.trace"))
    except (ImportError, ValueError):
        return False


def preload_modules(env: Mapping[str, str]) -> list[str]:
    """What a worker's fork server imports once when tracing is on, so a new child does not."""
    if not wanted(env) or not extra_installed():
        return []
    return [
        "opentelemetry.sdk.trace",
        "opentelemetry.sdk.trace.export",
        "opentelemetry.sdk.resources",
        "opentelemetry.trace.propagation.tracecontext",
        "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    ]


_UNSET: Any = object()
_current: Any = _UNSET  # Tracing, None (off), or _UNSET (not decided in this process yet)
_lock = threading.Lock()


def active() -> Tracing | None:
    """This process's tracer, or None when tracing is off (decided once per process)."""
    current = _current
    if current is _UNSET:
        return _decide(global_provider=False)
    return current  # a Tracing or None, set by _decide


def activate_in_child() -> Tracing | None:
    """In a step or run child: decide, and install our provider as the global one, so user code's
    ``trace.get_tracer(...)`` spans are exported and nest under the step's span."""
    return _decide(global_provider=True)


def _decide(global_provider: bool) -> Tracing | None:
    global _current
    with _lock:
        if _current is _UNSET:
            _current = _set_up(dict(os.environ), global_provider)
        return _current


def _forget_after_fork() -> None:
    """A forked child decides again: the parent's exporter threads did not come with it."""
    global _current, _lock
    _current, _lock = _UNSET, threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)


def shutdown(timeout: float = FLUSH_SECONDS) -> None:
    """Flush and stop this process's own provider (tests; an embedding host's clean exit)."""
    global _current
    with _lock:
        current, _current = _current, _UNSET
    if isinstance(current, Tracing):
        current.flush(timeout)
        if current.owned:
            current.provider.shutdown()


def _set_up(env: Mapping[str, str], global_provider: bool) -> Tracing | None:
    if not wanted(env):
        return None
    if not extra_installed():
        log.warning(
            "OpenTelemetry environment variables ask for traces, but the [otel] extra is not installed; "
            "%s, or unset OTEL_TRACES_EXPORTER / OTEL_EXPORTER_OTLP_ENDPOINT.",
            EXTRA_HINT,
        )
        return None
    try:
        return _build(env, global_provider)
    except Exception as exc:  # noqa: BLE001 - a tracing setup problem must never stop steps from running
        log.warning("OpenTelemetry tracing is off: %s.", exc if isinstance(exc, ImportError) else repr(exc))
        return None


def _build(env: Mapping[str, str], global_provider: bool) -> Tracing:
    from opentelemetry import trace
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    existing = trace.get_tracer_provider()
    if isinstance(existing, TracerProvider):  # the host set one up (opentelemetry-instrument, its own code)
        return Tracing(existing, owned=False)
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    # A child flushes its spans itself, bounded, before it answers; at its exit the SDK's own
    # shutdown would wait out an unreachable collector's retries (OTEL_EXPORTER_OTLP_TIMEOUT).
    provider = TracerProvider(resource=resource, shutdown_on_exit=not global_provider)
    for exporter in _exporters(env):
        provider.add_span_processor(BatchSpanProcessor(exporter))
    if global_provider:
        trace.set_tracer_provider(provider)
    return Tracing(provider, owned=True)


def _exporters(env: Mapping[str, str]) -> list[Any]:
    """The exporters OTEL_TRACES_EXPORTER names (default otlp: OTLP over HTTP, protobuf)."""
    names = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "otlp").split(",") if n.strip()]
    exporters: list[Any] = []
    for name in names or ["otlp"]:
        if name == "otlp":
            protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "")
            if protocol.strip().lower() == "grpc":
                try:
                    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # optional: not in [otel]
                        OTLPSpanExporter as GrpcExporter,
                    )
                except ImportError:
                    raise ImportError(
                        "OTEL_EXPORTER_OTLP_PROTOCOL=grpc needs opentelemetry-exporter-otlp-proto-grpc; "
                        "pip install it, or use http/protobuf (the [otel] extra's)"
                    ) from None
                exporters.append(GrpcExporter())
            else:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

                exporters.append(OTLPSpanExporter())
        elif name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            exporters.append(ConsoleSpanExporter())
        else:
            log.warning("OTEL_TRACES_EXPORTER names %r, which dagster-taskiq-sync does not export to; use otlp.", name)
    return exporters


class Tracing:
    """One process's tracer: spans with explicit parents (a message's context) and times."""

    def __init__(self, provider: Any, owned: bool) -> None:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        from dagster_taskiq_sync.version import __version__

        self.provider = provider
        self.owned = owned
        self._flush_lock = threading.Lock()
        self._flushing: threading.Thread | None = None
        self._flushed = False
        self.tracer = provider.get_tracer(INSTRUMENTATION, __version__)
        self._trace = trace
        self._w3c = TraceContextTextMapPropagator()  # the wire is W3C whatever OTEL_PROPAGATORS says

    def start(
        self,
        name: str,
        parent: TraceContext | None = None,
        attributes: Mapping[str, Any] | None = None,
        start_ns: int | None = None,
        kind: str = "INTERNAL",
    ) -> Any:
        """A started span under ``parent`` (a message's context), or without one under the thread's
        current span (a run child's run span while its orchestrator launches steps), if any."""
        context = self._w3c.extract(parent.labels()) if parent is not None else None
        return self.tracer.start_span(
            name,
            context=context,
            kind=getattr(self._trace.SpanKind, kind),
            attributes=dict(attributes or {}),
            start_time=start_ns,
        )

    def span_between(
        self, name: str, parent: TraceContext | None, attributes: Mapping[str, Any], start_ns: int, end_ns: int
    ) -> Any:
        """A span for something already over (queue wait, admission): times given, ended now."""
        span = self.start(name, parent, attributes, start_ns)
        span.end(max(start_ns, end_ns))
        return span

    def context_of(self, span: Any) -> TraceContext | None:
        """The W3C context to carry in a message so the receiver's spans nest under ``span``."""
        carrier: dict[str, str] = {}
        self._w3c.inject(carrier, context=self._trace.set_span_in_context(span))
        return trace_context(carrier)

    def current(self, span: Any) -> Any:
        """A context manager making ``span`` the thread's current span (user code nests under it)."""
        return self._trace.use_span(span, end_on_exit=False, record_exception=False, set_status_on_exception=False)

    def fail(self, span: Any, description: str) -> None:
        span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, description))

    def flush(self, timeout: float) -> bool:
        """Export what is pending, waiting at most ``timeout`` seconds; False if that was not enough.

        The SDK's batch processor exports a flush in the calling thread whatever timeout it is
        given, retrying an unreachable collector for up to ``OTEL_EXPORTER_OTLP_TIMEOUT`` (10 s), so
        the flush runs in a thread of its own and this waits for it only ``timeout`` seconds. A
        flush still running from last time is waited for instead of starting another."""
        with self._flush_lock:
            flushing = self._flushing
            if flushing is None or not flushing.is_alive():
                flushing = self._flushing = threading.Thread(target=self._flush_now, name="otel-flush", daemon=True)
                self._flushed = False
                flushing.start()
        flushing.join(timeout)
        return not flushing.is_alive() and self._flushed

    def _flush_now(self) -> None:
        try:
            self._flushed = bool(self.provider.force_flush())
        except Exception as exc:  # noqa: BLE001 - a collector problem must not fail a step
            log.debug("OpenTelemetry flush failed: %s: %s", type(exc).__name__, exc)
