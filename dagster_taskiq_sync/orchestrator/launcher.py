"""Who launches whole runs: ``TaskiqRunLauncher``, configured like ``CeleryRunLauncher``.

.. code-block:: yaml

    run_launcher:
      module: dagster_taskiq_sync
      class: TaskiqRunLauncher
      config:
        broker: "sqs://127.0.0.1:9324"
        default_queue: dagster
        config_source:
          broker_transport_options: {region: us-east-1}

A launch is one message; a ``dagster-taskiq-sync worker start`` worker runs the run in a child
process with Dagster's own run worker (in-process, multiprocess or ``taskiq_executor``, which then
sends the steps to the queues like any orchestrator: no worker waits on another inside a task, so
the dagster-celery deadlock cannot happen). Each launch has a deterministic id; worker health,
debug info and termination are looked up by it in the instance's key-value store.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from dataclasses import replace
from typing import Any

from dagster import Field, Noneable, Permissive, StringSource

from dagster_taskiq_sync._dagster.names import (
    CheckRunHealthResult,
    ConfigurableClass,
    ConfigurableClassData,
    EngineEventData,
    LaunchRunContext,
    ResumeRunContext,
    RunLauncher,
    WorkerStatus,
    check,
)
from dagster_taskiq_sync.config.celery_compat import settings_from_executor_config
from dagster_taskiq_sync.config.schema import SecretSource
from dagster_taskiq_sync.storage.liveness import DEAD_LETTERED, EXITED, QUEUED, RUNNING, LivenessStore, StepRecord
from dagster_taskiq_sync.wire.bridge import shared_bridge
from dagster_taskiq_sync.wire.broker_client import BrokerClient
from dagster_taskiq_sync.wire.lanes import message_group
from dagster_taskiq_sync.wire.messages import RUN_PRIORITY_TAGS, RunMessage, TaskKind, encode, queue_for_tags
from dagster_taskiq_sync.wire.settings import DEFAULT_QUEUE
from dagster_taskiq_sync.wire.time_limits import StepLimits, limits_for_run
from dagster_taskiq_sync.wire.tracing import JOB_NAME, LAUNCH, QUEUE, RUN_ID, active

TASK_ID_TAG = "dagster-taskiq/task_id"  # the id of the run's latest launch (as dagster-celery/task_id)


class TaskiqRunLauncher(RunLauncher, ConfigurableClass):
    """Launches runs as SQS messages executed by ``dagster-taskiq-sync worker start``."""

    def __init__(
        self,
        default_queue: str = DEFAULT_QUEUE,
        broker: str | None = None,
        backend: str | None = None,
        include: list[str] | None = None,
        config_source: Mapping[str, Any] | None = None,
        worker_lost_timeout: float | None = None,
        signing_key: str | None = None,
        previous_signing_keys: list[str] | None = None,
        inst_data: ConfigurableClassData | None = None,
    ) -> None:
        self._inst_data = check.opt_inst_param(inst_data, "inst_data", ConfigurableClassData)
        # Same mapping as the executor: a bad value fails when the instance loads, by name.
        self.settings = settings_from_executor_config(
            {
                "broker": broker,
                "backend": backend,
                "include": include,
                "config_source": config_source,
                "worker_lost_timeout": worker_lost_timeout,
                "signing_key": signing_key,
                "previous_signing_keys": previous_signing_keys,
            },
            where="run_launcher.config",
        ).with_sqs(default_queue=check.str_param(default_queue, "default_queue"))
        self.settings.check_signing("sender")
        super().__init__()

    # --- ConfigurableClass ----------------------------------------------------------------

    @property
    def inst_data(self) -> ConfigurableClassData | None:
        return self._inst_data

    @classmethod
    def config_type(cls):
        return {
            "broker": Field(
                Noneable(StringSource), is_required=False, description="SQS broker URL, as for taskiq_executor."
            ),
            "backend": Field(Noneable(StringSource), is_required=False, default_value="rpc://"),
            "include": Field([str], is_required=False, description="Modules every worker should import."),
            "default_queue": Field(
                StringSource,
                is_required=False,
                default_value=DEFAULT_QUEUE,
                description="Queue for runs without a dagster-celery/queue tag.",
            ),
            "config_source": Field(
                Noneable(Permissive()),
                is_required=False,
                description="Celery settings; see the README's mapping table.",
            ),
            "worker_lost_timeout": Field(
                Noneable(float),
                is_required=False,
                description="A run whose worker has not heartbeated for this long is "
                "reported FAILED to run monitoring (default 30).",
            ),
            "signing_key": Field(
                Noneable(SecretSource),
                is_required=False,
                description="Secret that signs launch messages ({env: NAME}); as for taskiq_executor.",
            ),
            "previous_signing_keys": Field(
                [SecretSource], is_required=False, description="Keys workers still accept during a rotation."
            ),
        }

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData, config_value: Mapping[str, Any]):
        return cls(inst_data=inst_data, **config_value)

    # --- launching --------------------------------------------------------------------------

    @contextlib.contextmanager
    def _client(self, queue: str) -> Iterator[BrokerClient]:
        with (
            shared_bridge() as bridge,
            BrokerClient(
                self.settings.sqs, bridge, [queue], keyring=self.settings.keyring, dead_letters=False
            ) as client,
        ):
            yield client

    def _send(self, run: Any, message: RunMessage) -> None:
        queue = queue_for_tags(run.tags, self.settings.sqs.default_queue)
        task_id = message.task_id
        LivenessStore(self._instance).write_queued({task_id: StepRecord(QUEUED, queue=queue)})
        self._instance.add_run_tags(run.run_id, {TASK_ID_TAG: task_id})
        launch = message.launch
        with self._send_span(run, message, queue) as message, self._client(queue) as client:
            offloaded = client.send(
                queue=queue,
                task_id=task_id,
                body=encode(message, self.settings.sqs.queue_name(queue)),
                retry_for=self.settings.broker_outage_timeout,
                group=message_group(run.run_id, run.tags, self.settings.message_group_tag),
            )
        priority = next((run.tags[t] for t in RUN_PRIORITY_TAGS if run.tags.get(t)), None)
        self._instance.report_engine_event(
            f"Sent run to SQS queue {self.settings.sqs.queue_name(queue)!r} ({launch})"
            + (f"; SQS has no message priority, so run priority {priority} does not reorder it" if priority else "")
            + ".",
            run,
            EngineEventData(metadata={"task_id": task_id, "queue": queue, "payload": offloaded or "in the message"}),
            cls=self.__class__,
        )

    @contextlib.contextmanager
    def _send_span(self, run: Any, message: RunMessage, queue: str) -> Iterator[RunMessage]:
        """With tracing on, the run's send span (root of the run's trace), its context in the message."""
        tracing = active()
        if tracing is None:
            yield message
            return
        attributes = {RUN_ID: run.run_id, JOB_NAME: run.job_name, QUEUE: queue, LAUNCH: message.launch}
        span = tracing.start(f"send run {run.run_id}", attributes=attributes, kind="PRODUCER")
        try:
            yield replace(message, trace=tracing.context_of(span))
        except BaseException as exc:
            span.record_exception(exc)
            tracing.fail(span, f"the run could not be sent: {type(exc).__name__}")
            raise
        finally:
            span.end()

    def limits(self, run: Any) -> StepLimits:
        """The run's time limits: its tags ``dagster-taskiq/time_limit`` / ``soft_time_limit``, else
        ``config_source.task_time_limit`` / ``task_soft_time_limit``; the worker running it enforces
        them. A bad tag is a ConfigError naming it, which fails the launch (Dagster reports it in
        the run's log and fails the run)."""
        return limits_for_run(run.run_id, run.tags, self.settings.task_time_limit, self.settings.task_soft_time_limit)

    def launch_run(self, context: LaunchRunContext) -> None:
        run = context.dagster_run
        check.not_none(run.job_code_origin, "TaskiqRunLauncher launches runs that have a code origin")
        self._send(run, RunMessage(TaskKind.RUN, run.run_id, "launch", self.limits(run)))

    @property
    def supports_resume_run(self) -> bool:
        return True

    def resume_run(self, context: ResumeRunContext) -> None:
        run = context.dagster_run
        launch = f"resume-{context.resume_attempt_number or 1}"
        self._send(run, RunMessage(TaskKind.RESUME, run.run_id, launch, self.limits(run)))

    def terminate(self, run_id: str) -> bool:
        """Ask the worker running the run to stop it (it interrupts the run process, which stops
        its steps and ends the run CANCELED). A run still queued is dropped when received."""
        run = self._instance.get_run_by_id(run_id)
        if run is None or run.is_finished:
            return False
        self._instance.report_run_canceling(run)
        task_id = run.tags.get(TASK_ID_TAG)
        if task_id:
            LivenessStore(self._instance).request_cancel(task_id, "the run was terminated")
        return True

    # --- health -------------------------------------------------------------------------------

    def _record(self, run) -> tuple[str | None, StepRecord | None]:
        task_id = run.tags.get(TASK_ID_TAG)
        if not task_id:
            return None, None
        return task_id, LivenessStore(self._instance).read([task_id]).get(task_id)

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run) -> CheckRunHealthResult:
        _task_id, record = self._record(run)
        if record is None:
            return CheckRunHealthResult(WorkerStatus.UNKNOWN, "no launch of this run was recorded by TaskiqRunLauncher")
        if record.state == QUEUED:
            return CheckRunHealthResult(WorkerStatus.RUNNING, f"queued on {record.queue!r} for {record.age():.0f} s")
        if record.state == RUNNING:
            lost = record.lost_for(self.settings.worker_lost_timeout)
            if lost is not None:
                return CheckRunHealthResult(
                    WorkerStatus.FAILED,
                    f"worker {record.worker} (host {record.host}, pid {record.worker_pid}) running the run "
                    f"stopped heartbeating {lost:.0f} s ago; the worker was lost.",
                )
            return CheckRunHealthResult(WorkerStatus.RUNNING)
        if record.state == DEAD_LETTERED:
            return CheckRunHealthResult(
                WorkerStatus.FAILED,
                f"the run can never run: worker {record.worker} moved its launch message {record.reason}",
            )
        if record.state == EXITED and record.exit_code == 0:
            return CheckRunHealthResult(WorkerStatus.SUCCESS)
        return CheckRunHealthResult(
            WorkerStatus.FAILED,
            f"the run process on worker {record.worker} ended ({record.reason or f'exit code {record.exit_code}'}).",
        )

    def get_run_worker_debug_info(self, run, include_container_logs: bool | None = True) -> str | None:
        task_id, record = self._record(run)
        if record is None:
            return None
        age = time.time() - record.ts
        return (
            f"task id {task_id}: {record.state} on worker {record.worker} (host {record.host}, worker pid "
            f"{record.worker_pid}, run process pid {record.step_pid}), queue {record.queue}, message id "
            f"{record.message_id}, last update {age:.0f} s ago"
            + (f", exit code {record.exit_code}" if record.exit_code is not None else "")
            + (f" ({record.reason})" if record.reason else "")
        )
