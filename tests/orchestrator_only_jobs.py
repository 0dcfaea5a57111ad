"""A job whose code only the orchestrator has: a worker cannot load it (its step can never run there).

Importing this module needs DTS_TEST_ORCHESTRATOR set, as if the code were installed on the
orchestrator's host only.
"""

import os

from dagster import job, op

from dagster_taskiq_sync import taskiq_executor

if not os.environ.get("DTS_TEST_ORCHESTRATOR"):
    raise ImportError("this job's code is installed on the orchestrator only")


@op
def only_here() -> int:
    return 1


@job(executor_def=taskiq_executor)
def orchestrator_only():
    only_here()
