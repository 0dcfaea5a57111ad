"""What a bin/bench invocation can run: its contenders, workloads, storages and concurrency, and
what it skips by default (and why)."""

from __future__ import annotations

from .jobs import Workload
from .orchestrator import SEGMENTS as SEGMENT_NAMES

CONTENDERS = ("taskiq", "taskiq_embedded", "celery", "multiprocess", "in_process")
LABELS = {
    "taskiq": "taskiq_executor (SQS)",
    "taskiq_embedded": "taskiq_executor (SQS), embedded worker",
    "celery": "dagster-celery (Redis)",
    "multiprocess": "multiprocess_executor",
    "in_process": "in_process_executor",
}
FULL_WORKLOADS = (
    "chain-20",
    "fanout-100",
    "fanout-100-sleep",
    "fanout-1000",
    "chain-5",
    "runs-10",
    "backfill+interactive",
)
QUICK_WORKLOADS = ("chain-3", "fanout-4", "fanout-4-sleep", "fanout-20", "runs-3-chain-3", "backfill-small")
BASELINES = ("celery", "in_process")  # every new figure is also shown as a ratio to these
# The same executor and worker settings as "taskiq", its worker embedded in a plain host process
# (benchmarks/embedded_host.py) instead of `worker start`: reported as a ratio to "taskiq".
EMBEDDED, CLI_WORKER = "taskiq_embedded", "taskiq"
EMBEDDED_TARGET = 1.1  # embedded / CLI worker, summed over the workloads both ran
# multiprocess_executor starts a Python process per step (fanout-100: ~1.7 s of wall time per
# step on the 2-core reference machine): a 1000-step run takes ~30 min. Measurements with more
# steps than this skip it (--run-skipped runs them).
MULTIPROCESS_MAX_STEPS = 200
CELERY_MAX_STEPS = 200  # dagster-celery beyond this: --run-skipped
QUICK_MULTIPROCESS_MAX_STEPS = 8  # --quick: the three original smoke workloads only
STORAGES = ("sqlite", "postgres")
CONCURRENCY = 4
# Labels of the links orchestrator.step_segments measures, in its order.
SEGMENTS = tuple(
    zip(
        SEGMENT_NAMES,
        (
            "ready -> message sent (orchestrator)",
            "sent -> received by a worker (SQS)",
            "received -> STEP_WORKER_STARTED (worker, step child)",
            "STEP_WORKER_STARTED -> STEP_START (Dagster step setup)",
            "STEP_START -> STEP_SUCCESS (op + outputs)",
            "STEP_SUCCESS -> seen by orchestrator (event log poll)",
        ),
        strict=True,
    )
)
# Each run's own start and end around its steps, in its orchestrating process.
RUN_EDGES = (
    ("run_start", "execute_job called -> first step ready (run start)"),
    ("run_end", "last step seen -> execute_job returned (run end)"),
)


def skip_reason(contender: str, spec: Workload, quick: bool = False) -> str | None:
    """Why ``contender`` does not run ``spec`` by default (printed in the report), or None."""
    if contender == "multiprocess" and quick and spec.steps > QUICK_MULTIPROCESS_MAX_STEPS:
        return (
            f"{spec.steps} steps: --quick keeps multiprocess_executor (a process per step, ~1.7 s each) to "
            f"measurements of at most {QUICK_MULTIPROCESS_MAX_STEPS} steps; `--run-skipped` runs it anyway"
        )
    if contender == "multiprocess" and spec.steps > MULTIPROCESS_MAX_STEPS:
        return (
            f"{spec.steps} steps: multiprocess_executor starts a process per step (fanout-100 took "
            f"~1.7 s of wall time per step here), so ~{spec.steps * 1.7 / 60:.0f} min per measurement; "
            "`--run-skipped` runs it anyway"
        )
    if contender == "celery" and not quick and spec.steps > CELERY_MAX_STEPS:
        return (
            f"{spec.steps} steps: dagster-celery takes ~0.24 s of wall time per step on a fan-out here "
            f"(fanout-1000: 238 s on sqlite, 268 s on PostgreSQL, bin/bench of 2026-12-01), so "
            f"~{spec.steps * 0.24 / 60:.0f} min per measurement and as much again for its warm-up; "
            "`--run-skipped` runs it anyway"
        )
    return None


def log(message: str) -> None:
    """The bench's progress lines (stdout, flushed: a long run shows where it is)."""
    print(message, flush=True)
