"""Lanes: which runs' steps may wait behind a backlog, and the fair-queue group a step is sent in.

Every standard queue ``Q`` may have a **bulk lane**, the queue ``Q-bulk``: with ``lanes: true`` in
the executor config, ``queues create`` makes it, workers consuming ``Q`` also consume it, and the
steps of bulk runs go there instead of to ``Q``. A run is bulk when its ``dagster-taskiq/lane`` tag
says ``bulk``, or, without that tag, when it is part of a backfill (Dagster's backfill daemon tags
its runs ``dagster/backfill``) or its run priority is below zero (``dagster/priority``, as
Dagster's run queue reads it, or ``dagster-celery/run_priority``). Every other run is
interactive and keeps ``Q``. A worker gives the interactive lane its room first and one slot
more while it runs bulk steps, and runs bulk steps' processes at a lower CPU priority
(``worker/capacity.py``, ``worker/step_runner.py``): an interactive step never waits behind a
backfill's messages, for a slot, or for the cores.

The lane queue is used only while a live worker consumes it (the worker registry says so), so an
orchestrator never sends to a lane that only old workers would have to drain (rolling upgrade):
the steps then stay on ``Q``. FIFO queues have no lane.

**Fair queues.** Every step message on a standard queue carries a ``MessageGroupId``: the run id,
or the value of the run tag ``message_group_tag`` names (a code location, a team). On AWS, SQS fair
queues then keep one group's backlog from delaying the others' messages (dwell time).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager

from dagster_taskiq_sync.errors import ConfigError

log = logging.getLogger("dagster_taskiq_sync.lanes")
BULK, INTERACTIVE = "bulk", "interactive"
LANE_TAG = "dagster-taskiq/lane"  # "bulk" or "interactive": wins over the rules below
BACKFILL_TAG = "dagster/backfill"  # Dagster's backfill daemon puts it on every run it launches
LANE_SUFFIX = "-bulk"
INTERACTIVE_RESERVE = 1  # slots a worker busy with bulk steps keeps for the interactive lane
# Seconds a worker's bulk lane takes nothing new after an interactive step starts or ends
# (worker/capacity.py): longer than the gap between a chain's steps under load (~50-100 ms), and
# short, since a backfill waits that long after each interactive run. bin/bench backfill-20+chain-3
# and backfill-300+chain-5, one invocation per value: at 0.5 s the 20-step backfill took 2.06x /
# 1.67x its solo time (sqlite / postgres), at 0.2 s 1.26x / 1.19x; the interactive slowdowns were
# alike (1.05-1.40x against 1.16-1.42x).
BULK_YIELD = 0.2
# CPU priority of what works for a bulk run. Its steps' processes on workers get nice's maximum and,
# on Linux, the SCHED_IDLE policy: every other process that wakes up takes the core from them at
# once. Under nice alone the kernel lets a running task finish its slice first, and on 2 busy cores
# an interactive run's processes waited in the run queue as long as they ran (/proc/PID/schedstat:
# its orchestrator ran 124-131 ms and waited 68-136 ms per chain-5; interactive slowdown 1.57-1.65x
# against 1.69-1.85x with nice 19 alone, bin/bench backfill-300+chain-5). SCHED_IDLE is no strict
# idle class: such a process still gets a small share of a busy core (weight 3, nice 19's is 15), so
# a bulk step holding a database lock goes on, slowly. Its orchestrating thread gets nice's default
# (+10), so it still keeps the backfill's steps coming.
BULK_STEP_NICENESS = 19
BULK_ORCHESTRATOR_NICENESS = 10
GROUP_ID_LIMIT = 128  # SQS's limit on a MessageGroupId
_NOT_IN_GROUP_ID = re.compile(r"[^!-~]")  # SQS takes printable ASCII without spaces


def lane_queue(queue: str, sqs_name: str) -> str | None:
    """The Celery name of ``queue``'s bulk lane (None for a FIFO queue, which has none)."""
    if sqs_name.endswith(".fifo") or queue.endswith(LANE_SUFFIX):
        return None
    return queue + LANE_SUFFIX


def is_bulk_lane(queue: str) -> bool:
    return queue.endswith(LANE_SUFFIX)


def lane_name_refusal(queue: str, sqs_base_name: str, where: str, lane_fix: str | None = None) -> str | None:
    """Why ``queue``, a name the user gave in ``where``, cannot be used with ``lanes`` (None: it can).

    With lanes, a name ending in ``-bulk`` (``sqs_base_name``, the queue's SQS name before any prefix,
    so ``reports.bulk`` counts too) is another queue's bulk lane: ``queues create`` makes it with that
    queue, workers of that queue consume it, and they run its steps as a backfill's (after the
    interactive lane, at a lower CPU priority). Whether the user meant their own queue or that lane
    cannot be told, so it is refused rather than guessed. ``lane_fix`` says how to mean the lane
    where that is not by naming its queue, as for ``-q`` and a config's queues (``{base}``: that queue).
    """
    if sqs_base_name.endswith(".fifo") or not is_bulk_lane(sqs_base_name):
        return None
    base = queue[: -len(LANE_SUFFIX)] if is_bulk_lane(queue) else sqs_base_name[: -len(LANE_SUFFIX)]
    alias = "" if sqs_base_name == queue else f" ({sqs_base_name!r} in SQS)"
    fix = (lane_fix or "name {base}: its lane comes with it").format(base=repr(base))
    return (
        f"{where} {queue!r}{alias} ends in {LANE_SUFFIX!r}, which with execution.config.lanes is the bulk lane of "
        f"queue {base!r} (workers run its steps after interactive ones, at a lower CPU priority); if you meant "
        f"that lane, {fix}; otherwise rename the queue, or set "
        "execution.config.lanes: false."
    )


def with_lanes(queues: Iterable[str], sqs_name: Callable[[str], str]) -> list[str]:
    """``queues`` and each one's bulk lane (what ``queues create`` makes and a worker consumes)."""
    out: list[str] = []
    for queue in queues:
        out.append(queue)
        lane = lane_queue(queue, sqs_name(queue))
        if lane is not None:
            out.append(lane)
    return list(dict.fromkeys(out))


def run_lane(run_tags: Mapping[str, str], run_priority: int) -> tuple[str, str]:
    """(lane, why) of a run: its lane tag, else bulk for backfills and negative run priorities."""
    told = run_tags.get(LANE_TAG)
    if told is not None:
        if told not in (BULK, INTERACTIVE):
            raise ConfigError(f"tag {LANE_TAG}={told!r} must be {BULK!r} or {INTERACTIVE!r}; fix the run's tag.")
        return told, f"its {LANE_TAG} tag"
    if run_tags.get(BACKFILL_TAG):
        return BULK, f"it is part of backfill {run_tags[BACKFILL_TAG]} ({BACKFILL_TAG})"
    if run_priority < 0:
        return BULK, f"its run priority is {run_priority}"
    return INTERACTIVE, "it is neither a backfill nor of negative run priority"


def message_group(run_id: str, run_tags: Mapping[str, str], tag: str | None) -> str:
    """The fair-queue group of a run's messages: the value of run tag ``tag``, else the run id."""
    value = run_tags.get(tag) if tag else None
    group = _NOT_IN_GROUP_ID.sub("_", value) if value else run_id
    return group[:GROUP_ID_LIMIT]


@contextmanager
def lowered_thread_priority(niceness: int, what: str) -> Iterator[bool]:
    """Run the block in this thread at ``niceness`` more (threads it starts inherit it), and try to
    come back after it. Linux keeps a niceness per thread; lowering it needs no privilege, raising it
    back does (root, CAP_SYS_NICE or RLIMIT_NICE), so without them this thread stays lowered, as
    the debug log says. Yields whether the priority was lowered (False where it cannot be: another
    OS, or a refusal)."""
    if not sys.platform.startswith("linux"):  # elsewhere a thread id is no process id: it could name another process
        yield False
        return
    tid = threading.get_native_id()
    try:
        before = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, before + niceness))
    except (AttributeError, OSError) as exc:
        log.debug("could not lower the CPU priority of %s: %s", what, exc)
        yield False
        return
    try:
        yield True
    finally:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, before)
        except OSError:
            log.debug("%s keeps niceness %d: raising it back needs CAP_SYS_NICE", what, min(19, before + niceness))
