"""Jobs whose ops run into their time limits (loaded by workers from this file)."""

import os
import time
from pathlib import Path

from dagster import (
    Config,
    DagsterExecutionInterruptedError,
    Definitions,
    OpExecutionContext,
    RetryPolicy,
    asset,
    define_asset_job,
    job,
    op,
)

from dagster_taskiq_sync import taskiq_executor

SOFT = "dagster-taskiq/soft_time_limit"
HARD = "dagster-taskiq/time_limit"


class MarkConfig(Config):
    mark_dir: str


@op(tags={SOFT: "1"})
def cleans_up(config: MarkConfig) -> None:
    marks = Path(config.mark_dir)
    try:
        time.sleep(120)
    except DagsterExecutionInterruptedError as exc:
        (marks / "cleaned_up").write_text(f"{type(exc).__name__}: {exc}")  # the op's own cleanup
        raise


@job(executor_def=taskiq_executor)
def soft_limited():
    cleans_up()


@op(tags={SOFT: "1", HARD: "2"})
def ignores_interrupts(config: MarkConfig) -> None:
    marks = Path(config.mark_dir)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:  # the whole body: wherever the interrupt lands, it is swallowed
            (marks / "pid").write_text(str(os.getpid()))
            time.sleep(max(0.0, deadline - time.monotonic()))
        except DagsterExecutionInterruptedError as exc:
            (marks / "ignored").write_text(str(exc))  # and keeps going


@job(executor_def=taskiq_executor)
def hard_limited():
    ignores_interrupts()


@op(retry_policy=RetryPolicy(max_retries=1))
def slow_the_first_time(context: OpExecutionContext) -> int:
    if context.retry_number == 0:
        time.sleep(120)  # the run's task_soft_time_limit interrupts this
    return context.retry_number


@job(executor_def=taskiq_executor)
def retried_after_time_limit():
    slow_the_first_time()


@op(tags={SOFT: "30", HARD: "60"})
def quick_but_limited() -> int:
    return 1


@op
def quick_unlimited(x: int) -> int:
    return x + 1


@job(executor_def=taskiq_executor)
def eager_limited():  # run with task_always_eager: true
    quick_unlimited(quick_but_limited())


@op(tags={HARD: "soon"})
def badly_limited() -> int:
    return 1


@op
def upstream_of_bad() -> int:
    return 1


@job(executor_def=taskiq_executor)
def bad_limit_tag():
    upstream_of_bad()
    badly_limited()


@asset(op_tags={SOFT: "-5"})
def badly_limited_asset() -> int:
    return 1


bad_limit_asset_job = define_asset_job(
    "bad_limit_asset_job", selection=[badly_limited_asset], executor_def=taskiq_executor
)
defs = Definitions(assets=[badly_limited_asset], jobs=[bad_limit_asset_job])


def bad_limit_asset():  # reconstructable(...) of the asset job, as the tests run it
    return defs.resolve_job_def("bad_limit_asset_job")
