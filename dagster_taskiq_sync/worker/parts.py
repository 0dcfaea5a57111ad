"""What a started worker is made of, and how they are opened: its Dagster instance, the
event-loop bridge, the broker client, the step runner, the acker, and the ``WorkerContext`` each
message's ``Request`` gets. ``Worker.start`` opens them; ``Worker.stop`` closes them in order.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dagster_taskiq_sync._dagster.names import serialize_value
from dagster_taskiq_sync.config.worker_config import WorkerConfig
from dagster_taskiq_sync.ops.metrics import NullMetrics, WorkerMetrics
from dagster_taskiq_sync.storage.instance import InstanceOptions, open_home_instance, prepared
from dagster_taskiq_sync.storage.liveness import LivenessStore
from dagster_taskiq_sync.storage.registry import WorkerRegistry
from dagster_taskiq_sync.wire.bridge import Bridge
from dagster_taskiq_sync.wire.broker_client import BrokerClient
from dagster_taskiq_sync.wire.deliveries import Delivery
from dagster_taskiq_sync.worker.context import WorkerContext
from dagster_taskiq_sync.worker.key_guard import StepUser, guard_worker
from dagster_taskiq_sync.worker.step_runner import StepRunner
from dagster_taskiq_sync.worker.threads import Acker

log = logging.getLogger("dagster_taskiq_sync.worker")


@dataclass(frozen=True)
class Parts:
    """What a started worker is made of (built by ``Worker.start``, gone at ``stop``)."""

    instance: Any
    registry: WorkerRegistry
    bridge: Bridge
    client: BrokerClient
    runner: StepRunner
    acker: Acker
    context: WorkerContext


@dataclass(frozen=True)
class WorkerHooks:
    """What the parts call back on, and share with, the worker that opens them."""

    host: str
    stopping: threading.Event
    killing: threading.Event
    clock: Callable[[], float]
    on_death: Callable[[str], None]
    on_settled: Callable[[Delivery], None]
    on_done: Callable[[], None]
    on_step_moved: Callable[[str], None]  # a step of this queue started or ended (capacity.interactive_step)


def open_parts(
    config: WorkerConfig,
    instance: Any,
    metrics: WorkerMetrics | NullMetrics,
    hooks: WorkerHooks,
    step_user: StepUser | None = None,
) -> Parts:
    """Open the worker's instance (``instance`` when embedded with one, else DAGSTER_HOME's), bridge,
    client, step runner and acker (a client that cannot start stops the bridge it was given)."""
    settings = config.settings
    options = InstanceOptions.from_env(outage_timeout=settings.database_outage_timeout)
    instance = prepared(instance, options) if instance is not None else open_home_instance(options)
    guard_worker(config.name, settings.keyring.verifies, step_user, config.key_env)
    if not settings.keyring.verifies:
        log.warning(
            "worker %s: no signing key is configured, so anyone who can send to its queues (%s) can "
            "run steps of existing runs; set execution.config.signing_key (README: Security model).",
            config.name,
            ", ".join(config.queues),
        )
    bridge = Bridge(name="taskiq-bridge").start()
    try:
        client = BrokerClient(
            settings.sqs, bridge, config.queues, keyring=settings.keyring, observe=metrics.sqs_call
        ).start()
    except BaseException:
        bridge.stop()
        raise
    runner = StepRunner(
        serialize_value(instance.get_ref()),
        options,
        preload=config.includes,
        max_tasks_per_child=settings.max_tasks_per_child,
        max_memory_per_child=settings.max_memory_per_child,
        on_recycle=metrics.step_child_recycled,
        key_env=config.key_env,
        step_user=step_user,
        step_niceness=config.step_niceness,
    )
    acker = Acker(client, hooks.on_death, hooks.on_settled)
    # What each message's ``Request`` may use of this worker, and nothing else.
    context = WorkerContext(
        name=config.name,
        host=hooks.host,
        pid=os.getpid(),
        settings=settings,
        client=client,
        instance=instance,
        store=LivenessStore(instance),
        runner=runner,
        acks=acker,
        stopping=hooks.stopping,
        killing=hooks.killing,
        metrics=metrics,
        clock=hooks.clock,
        on_done=hooks.on_done,
        on_step_moved=hooks.on_step_moved,
    )
    return Parts(instance, WorkerRegistry(instance), bridge, client, runner, acker, context)
