"""One message's life in a worker, from receipt to settlement, in one object (celery's ``Request``).

:meth:`Request.handle` runs the whole life and never raises (steps 1 and 2 are in ``received.py``,
the ``Received`` half of a request: what it knows of its message and the checks before it runs):

1. **open**: check the signature (before anything is parsed), fetch an offloaded payload (only
   from the configured bucket and prefix, under a size cap, checked against its SHA-256), decode
   the wire contract (``messages.decode``). Anything wrong: the message can never run.
2. **admit**: read the message's run and its attempt's liveness record from the worker's own
   instance, riding out database outages while the message stays held (infrastructure errors
   never count a genuine step toward the dead-letter policy), then apply the drop rules
   (``DROP_RULES``: small named predicates over plain data).
3. **start / supervise**: hand it to a step child (or a run child), record it ``running``, wait for
   it while honouring the time limit, cancel requests and shutdown, escalating a run's interrupt
   to a kill after its grace period.
4. **settle**: delete (it ran, or need not run), release (not run here), or dead-letter it (it can
   never run: moved to the queue's dead-letter queue at once, and its step failed promptly by the
   orchestrator, which reads the ``dead_lettered`` record).
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

from dagster import DagsterRunStatus

from dagster_taskiq_sync.errors import TaskiqSyncError
from dagster_taskiq_sync.storage.liveness import DEAD_LETTERED, EXITED, FINAL_DELIVERY, RUNNING, StepRecord
from dagster_taskiq_sync.wire.lanes import is_bulk_lane
from dagster_taskiq_sync.wire.messages import (
    RunMessage,
    StepMessage,
    TaskKind,
)
from dagster_taskiq_sync.wire.time_limits import HARD, SOFT
from dagster_taskiq_sync.worker.admission import Drop, Outcome, Verdict
from dagster_taskiq_sync.worker.child_pipe import Pickup, StepTask
from dagster_taskiq_sync.worker.launched import fail_run, run_child_ended
from dagster_taskiq_sync.worker.received import Received, Stopping
from dagster_taskiq_sync.worker.traces import RequestSpans

log = logging.getLogger("dagster_taskiq_sync.worker")

RUN_INTERRUPT_GRACE = 15.0  # seconds a terminated run gets to stop its steps before SIGKILL
SUPERVISE_TICK = 0.5
ERROR_VISIBILITY_MAX = 900  # seconds: a message that broke this worker's own code comes back slower each time


class Request(Received):
    """One received message, from :meth:`handle` to its settlement (see the module docstring).

    What it knows of its message and the checks before it runs are ``received.Received``'s."""

    # --- the whole life ----------------------------------------------------------------------

    def handle(self) -> Verdict:
        verdict = Verdict(Outcome.RELEASE)
        self.worker.metrics.step_received(self.delivery.queue)
        spans = RequestSpans.begin()  # None unless OpenTelemetry tracing is on
        try:
            admitted = self.admit()  # None: it runs
            if spans is not None:
                spans.admitted(self, admitted)
            verdict = admitted or self.execute()
        except Stopping:
            verdict = Verdict(Outcome.RELEASE, "the worker is stopping")
        except BaseException as exc:  # nothing in one message may take a worker thread down
            if isinstance(exc, TaskiqSyncError):  # ours: one sentence says it all
                log.error(
                    "worker %s: %s from queue %s goes back to the queue: %s",
                    self.worker.name,
                    self.label,
                    self.delivery.queue,
                    exc,
                )
            else:
                log.exception(
                    "worker %s: unexpected error handling %s from queue %s",
                    self.worker.name,
                    self.label,
                    self.delivery.queue,
                )
            backoff = min(ERROR_VISIBILITY_MAX, 15 * 2 ** min(self.delivery.receive_count, 6))
            verdict = Verdict(Outcome.RELEASE, f"{type(exc).__name__}: {exc}", release_after=backoff)
        finally:
            verdict = self.settle(verdict) if spans is None else spans.settle(self, verdict)
        return verdict

    # --- running it ----------------------------------------------------------------------------

    def execute(self) -> Verdict:
        try:
            self._start()
        except BaseException:
            # Not started: give the claim back, so that the message's next delivery may start it.
            try:
                self.worker.store.unclaim(self.task_id)
            except Exception as exc:  # noqa: BLE001 - the start's own error is the one to raise
                log.warning("worker %s: could not give back the claim on %s: %s", self.worker.name, self.label, exc)
            raise
        code = self._supervise()
        return self._finish(code)

    def _pickup(self) -> Pickup:
        d, w, m = self.delivery, self.worker, self.message
        assert m is not None
        return Pickup(
            worker=w.name,
            host=w.host,
            worker_pid=w.pid,
            queue=d.queue,
            message_id=d.message_id,
            receive_count=d.receive_count,
            received_at=d.received_at,
            run_id=m.run_id,
            step_key=getattr(m, "step_key", None),
            attempt=getattr(m, "attempt", None),
        )

    def _start(self) -> None:
        worker, message = self.worker, self.message
        assert message is not None
        worker.on_step_moved(self.delivery.queue)  # admitted: refused messages never hold the bulk lane
        self._started = worker.clock()
        self._started_wall = time.time()
        if isinstance(message, StepMessage):
            settings = worker.settings
            self.limits = message.limits.with_defaults(settings.task_time_limit, settings.task_soft_time_limit)
            soft = self.limits.soft
            self.child = worker.runner.start_step(
                StepTask(
                    message.run_id,
                    message.step_key,
                    message.attempt,
                    message.known_state,
                    self._pickup(),
                    soft.interrupted(message.step_key) if soft else None,
                    message.trace,
                ),
                bulk=settings.lanes and is_bulk_lane(self.delivery.queue),
            )
        else:
            self.limits = message.limits  # the run's tags, else the launcher's config; never the worker's
            self.child = worker.runner.start_run(
                "run" if message.kind is TaskKind.RUN else "resume", message.run_id, self._pickup(), message.trace
            )
        self.write_record(
            StepRecord(
                RUNNING,
                queue=self.delivery.queue,
                worker=worker.name,
                host=worker.host,
                worker_pid=worker.pid,
                step_pid=self.child.pid,
                message_id=self.delivery.message_id,
                heartbeat_interval=worker.settings.heartbeat_interval,
            )
        )
        worker.running.add(self)
        log.info(
            "worker %s: %s started (queue %s, pid %s)", worker.name, message.label, self.delivery.queue, self.child.pid
        )
        if isinstance(message, StepMessage):
            sent = self.delivery.sent_at
            worker.metrics.step_started(
                self.delivery.queue, self.run.job_name, self.delivery.received_at - sent if sent else None
            )

    def _supervise(self) -> int:
        assert self.child is not None and self.message is not None
        hard, soft = self.limits.hard, self.limits.soft
        try:
            while True:
                code = self.child.wait(self._tick())
                if code is not None:
                    return code
                elapsed = self.worker.clock() - self._started
                if self.worker.killing.is_set():
                    self.kill("the worker is shutting down", force=True)
                elif hard is not None and elapsed > hard.seconds:
                    if self.kill_reason is None:
                        self._count_limit(HARD)
                        self.limit_hit = hard
                    self.kill(hard.killed(), force=True)
                elif soft is not None and elapsed > soft.seconds and not self._soft_sent:
                    self._soft_interrupt()
                elif self.kill_reason is not None:
                    self.kill(self.kill_reason)  # escalates a run's interrupt after its grace
        finally:
            self.worker.running.remove(self)

    def _tick(self) -> float:
        """How long to wait for the child: a tick, or until a time limit falls due."""
        return self.limits.next_due(self.worker.clock() - self._started, self._soft_sent, SUPERVISE_TICK)

    def _soft_interrupt(self) -> None:
        """The soft limit: Dagster's interrupt inside the op, which may clean up; the hard limit
        (if any) still kills it if it does not stop. A launched run is failed first, naming the
        limit (``launched``), then interrupted as a terminate would: Dagster stops its steps."""
        assert self.child is not None and self.limits.soft is not None and self.message is not None
        self._soft_sent = True
        soft = self.limits.soft
        if isinstance(self.message, StepMessage):
            why = soft.interrupted(self.step_key)
        else:
            self.limit_hit = soft
            why = fail_run(self.worker.instance, self.message.run_id, soft, self.worker.name)
        log.warning("worker %s: interrupting %s (pid %s): %s", self.worker.name, self.label, self.child.pid, why)
        self._count_limit(SOFT)
        self.child.soft_interrupt()

    def _count_limit(self, kind: str) -> None:
        metrics = self.worker.metrics
        count = metrics.step_time_limited if isinstance(self.message, StepMessage) else metrics.run_time_limited
        count(self.delivery.queue, kind)

    def kill(self, why: str, force: bool = False) -> None:
        """Stop the child: a step is killed at once; a run is interrupted (so Dagster stops its
        steps and ends it CANCELED) and killed only if it is still there after its grace period."""
        assert self.child is not None and self.message is not None
        if self.kill_reason is None:
            self.kill_reason = why
            log.warning(
                "worker %s: %s %s (pid %s): %s",
                self.worker.name,
                "killing" if self.message.kind is TaskKind.STEP else "stopping",
                self.label,
                self.child.pid,
                why,
            )
        now = self.worker.clock()
        if force or self.message.kind is TaskKind.STEP:
            self.child.kill()
        elif self._interrupted_at is None:
            self._interrupted_at = now
            self.child.interrupt()
        elif now - self._interrupted_at > RUN_INTERRUPT_GRACE:
            self.child.kill()

    def heartbeat(self) -> None:
        """Refresh the running record so the orchestrator can tell a live worker from a lost one."""
        if self.kill_reason is None and self.record is not None:
            self.write_record(replace(self.record, ts=time.time()))

    def _finish(self, code: int) -> Verdict:
        worker, message, child = self.worker, self.message, self.child
        assert message is not None and child is not None
        worker.on_step_moved(self.delivery.queue)
        cannot = child.cannot_run_reason()
        cannot_run = cannot.sentence if cannot else None
        step_failed = child.step_failed()
        child.close()
        reason = f"killed: {self.kill_reason}" if self.kill_reason else cannot_run
        if reason is None and self._soft_sent and code != 0 and self.limits.soft is not None:
            # The step's failure event (if Dagster wrote one) names the limit; should it have ended
            # without one, the orchestrator's health check names it with this reason.
            reason = f"interrupted: {self.limits.soft.killed()}"
        log.info(
            "worker %s: %s finished in %.2f s (exit code %s%s)",
            worker.name,
            message.label,
            worker.clock() - self._started,
            code,
            f", {reason}" if reason else "",
        )
        worker.count_done()
        if isinstance(message, StepMessage):
            count = (
                worker.metrics.step_killed
                if self.kill_reason
                else worker.metrics.step_succeeded
                if code == 0 and not step_failed
                else worker.metrics.step_failed
            )
            count(self.delivery.queue, self.run.job_name, worker.clock() - self._started)
        if cannot_run and not self.kill_reason:
            return Verdict(Outcome.DEAD_LETTER, cannot_run)
        if message.kind is not TaskKind.STEP:
            self._finish_run(code, reason)
        elif code != 0 or reason:
            # A step that ran to its end has its result in the event log, which is what the
            # orchestrator reads; its "running" record already stops a redelivery from running it
            # again. Only an abnormal end needs saying (one instance write per step fewer).
            self._finish_record(code, reason)
        return Verdict(Outcome.DONE)

    def _finish_record(self, code: int | None, reason: str | None) -> None:
        if self.record is not None:
            self.write_record(replace(self.record, state=EXITED, ts=time.time(), exit_code=code, reason=reason))

    def _finish_run(self, code: int, reason: str | None) -> None:
        """A run child ended. Its launch record is kept while monitoring may still read it."""
        run_id = self.message.run_id if self.message else ""
        run_child_ended(self.worker.instance, run_id, self.worker.name, self.kill_reason, self.limit_hit)
        self._finish_record(code, reason)

    def write_record(self, record: StepRecord) -> None:
        self.record = record
        try:
            self.worker.store.write(self.task_id, record)
        except Exception as exc:  # noqa: BLE001 - liveness must not take the step down
            log.warning("worker %s: could not record liveness of %s: %s", self.worker.name, self.label, exc)

    # --- settling ------------------------------------------------------------------------------------

    def settle(self, verdict: Verdict) -> Verdict:
        """Delete, release or dead-letter the message, and say so; never raises."""
        try:
            self._say(verdict)
            self._after_drop(verdict)
        except Exception as exc:  # noqa: BLE001 - a failed report (run log, metrics) must not keep the message
            log.warning(
                "worker %s: could not report the %s of %s in its run's log: %s: %s",
                self.worker.name,
                verdict.outcome.value,
                self.label,
                type(exc).__name__,
                exc,
            )
        try:
            if verdict.outcome is Outcome.DONE:
                self.worker.acks.delete(self.delivery, self.pointer)
            elif verdict.outcome is Outcome.RELEASE:
                self._release(verdict)
            else:
                self._dead_letter(verdict)
        except Exception as exc:  # noqa: BLE001 - settling must never raise; the message reappears after its visibility timeout
            # Not fatal: the message reappears after its visibility timeout, and a step attempt
            # that already ran is dropped then without running user code again.
            log.warning(
                "worker %s: could not settle %s (%s) on queue %s: %s: %s",
                self.worker.name,
                self.label,
                verdict.outcome.value,
                self.delivery.queue,
                type(exc).__name__,
                exc,
            )
        return verdict

    def _say(self, verdict: Verdict) -> None:
        d, name = self.delivery, self.worker.name
        if verdict.outcome is Outcome.DEAD_LETTER:
            log.error("worker %s: message %s on queue %s can never run: %s", name, d.message_id, d.queue, verdict.why)
        elif verdict.outcome is Outcome.DONE and verdict.why:
            log.warning(
                "worker %s: dropping message %s (delivered %d times): %s; not running it",
                name,
                d.message_id,
                d.receive_count,
                verdict.why,
            )
        elif verdict.outcome is Outcome.RELEASE and verdict.why:
            log.info("worker %s: releasing message %s back to queue %s (%s)", name, d.message_id, d.queue, verdict.why)

    def _after_drop(self, verdict: Verdict) -> None:
        """What a message that was not run still owes: its metric, the run's log, a canceled run."""
        d = self.delivery
        if verdict.dropped is Drop.DUPLICATE:
            self.worker.metrics.step_dropped_duplicate(d.queue)
        if verdict.dropped is not None:
            # A first delivery of a started attempt is a re-send (a resumed run), not SQS delivering
            # twice; a lost one will never end by itself: say in the run's own log why it does not run.
            if (
                verdict.resent_started
                and (d.receive_count == 1 or verdict.lost)
                and self.run is not None
                and isinstance(self.message, StepMessage)
            ):
                self._explain_resent_attempt(verdict.why)
            # A launch dropped for a CANCELING run ends it only when no run child is running it:
            # never started (RUN_OVER), or started on a worker since lost. A live duplicate's run
            # child is still stopping its steps and reports the cancel itself.
            if (
                isinstance(self.message, RunMessage)
                and self.run is not None
                and self.run.status == DagsterRunStatus.CANCELING
                and (verdict.dropped is Drop.RUN_OVER or verdict.lost)
            ):
                said = "before a worker started it" if verdict.dropped is Drop.RUN_OVER else f"({verdict.why})"
                self.worker.instance.report_run_canceled(self.run, message=f"Run canceled {said}.")

    def _explain_resent_attempt(self, why: str) -> None:
        """A resumed run re-sent a step attempt that already started: say in the run's own log why
        it does not run again, instead of only in this worker's log."""
        assert isinstance(self.message, StepMessage)
        self.worker.instance.report_engine_event(
            f"Step {self.message.step_key} is not run again: {why}. Dagster does not re-run a step attempt "
            "that already started; its health check fails it (or retries it under its RetryPolicy).",
            self.run,
            step_key=self.message.step_key,
        )

    def _release(self, verdict: Verdict) -> None:
        self.mark_final_delivery()
        self.worker.client.change_visibility([self.delivery], verdict.release_after)

    def mark_final_delivery(self) -> None:
        """Before a message goes back unrun at its last allowed receive (maxReceiveCount), record
        it: SQS's redrive policy dead-letters it on the next receive, and nobody else would say so."""
        facts = self.worker.client.facts.get(self.delivery.queue)
        if facts is None or not facts.max_receive_count or self.delivery.receive_count < facts.max_receive_count:
            return
        try:
            if self.message is None:
                self.message = self._open()
            if self.run is None:
                self.run = self.worker.instance.get_run_by_id(self.message.run_id)
        except Exception as exc:  # noqa: BLE001 - unreadable or unverifiable: nothing to record on its behalf
            log.debug("worker %s: not recording the final delivery of %s: %s", self.worker.name, self.label, exc)
            return
        if isinstance(self.message, StepMessage) and self.run is not None:
            self.write_record(
                StepRecord(
                    FINAL_DELIVERY,
                    queue=facts.dead_letter_name,
                    worker=self.worker.name,
                    message_id=self.delivery.message_id,
                    reason=f"{self.delivery.receive_count} times (maxReceiveCount {facts.max_receive_count})",
                )
            )

    def _dead_letter(self, verdict: Verdict) -> None:
        dlq = self.worker.client.dead_letter(self.delivery, verdict.why)
        reason = (
            self._unreadable
            if self.message is None
            else "unknown_run"
            if self.run is None
            else "never_sent"
            if verdict.unrecorded
            else "cannot_run"
        )
        self.worker.metrics.message_dead_lettered(self.delivery.queue, reason)
        if self.message is None or self.run is None or verdict.unrecorded:
            return  # unverified, run-less or never sent: nothing in the instance is touched on its behalf
        where = f"to dead-letter queue {dlq!r}" if dlq else "and deleted it (the queue has no dead-letter queue)"
        self.write_record(
            StepRecord(
                DEAD_LETTERED,
                queue=self.delivery.queue,
                worker=self.worker.name,
                message_id=self.delivery.message_id,
                cannot_run=True,
                reason=f"{where}: {verdict.why}.",
            )
        )
