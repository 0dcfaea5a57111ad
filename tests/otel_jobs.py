"""A job whose op opens its own OpenTelemetry span (tests/e2e/test_traces.py): two steps, the
first failing on its first attempt and retried."""

from pathlib import Path

from dagster import Config, RetryPolicy, job, op
from opentelemetry import trace

from dagster_taskiq_sync import taskiq_executor


class CounterConfig(Config):
    counter_file: str


@op(retry_policy=RetryPolicy(max_retries=1))
def flaky_traced(config: CounterConfig) -> int:
    path = Path(config.counter_file)
    runs = int(path.read_text()) if path.exists() else 0
    path.write_text(str(runs + 1))
    # user code's own span: it must nest under the step's run span
    with trace.get_tracer("tests.otel_jobs").start_as_current_span("user work") as span:
        span.set_attribute("attempt_seen", runs + 1)
        if runs == 0:
            raise RuntimeError("first attempt fails on purpose")
    return runs + 1


@op
def after_traced(x: int) -> int:
    return x * 10


@job(executor_def=taskiq_executor)
def traced_retry():
    after_traced(flaky_traced())
