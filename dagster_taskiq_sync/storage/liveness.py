"""Step liveness and cancellation, shared by orchestrator and workers through the Dagster instance.

Nothing is held in orchestrator memory: each step attempt (and each launch of a whole run) has a
deterministic id (``messages.step_task_id``) and its record lives in the instance's key-value
store, which every process of a deployment already shares (sqlite on one machine, PostgreSQL
across machines). The default ``rpc://`` backend therefore needs no extra service.

Record life cycle: the orchestrator writes ``queued`` when it sends the message (under its own
key, so it can land after the worker's record without hiding it); the worker writes ``running``
when the step process starts and again every heartbeat; ``exited`` (with the exit code) when it
ends abnormally (a step that ran to its end has its result in the event log); ``dead_lettered``
when its message can never run. ``read`` prefers the worker's record. A cancel request is a
separate key, so a heartbeat never overwrites it.

State stays bounded: the orchestrator deletes its run's records when the run's execution ends
(:meth:`LivenessStore.forget`), and workers sweep records nobody updated for ``record_expiry``
seconds (a run whose orchestrator died, a late redelivery).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field

KEY_PREFIX = "dagster-taskiq-sync"
READ_CHUNK = 500  # keys per read: the whole health-check round of a big fan-out in a few queries

QUEUED = "queued"
RUNNING = "running"
EXITED = "exited"
DEAD_LETTERED = "dead_lettered"
# Its last allowed delivery (maxReceiveCount) reached a worker: if it goes back unrun, SQS's
# redrive policy dead-letters it on the next receive, and nobody else would ever say so.
FINAL_DELIVERY = "final_delivery"


def step_record_key(task_id: str) -> str:
    return f"{KEY_PREFIX}/step/{task_id}"


def queued_key(task_id: str) -> str:
    return f"{KEY_PREFIX}/queued/{task_id}"


def cancel_key(task_id: str) -> str:
    return f"{KEY_PREFIX}/cancel/{task_id}"


def claim_key(task_id: str) -> str:
    return f"{KEY_PREFIX}/claim/{task_id}"


def probe_key(run_id: str) -> str:
    return f"{KEY_PREFIX}/probe/{run_id}"


def lost_for(
    ts: float, heartbeat_interval: float | None, lost_timeout: float, now: float | None = None
) -> float | None:
    """The one "worker is lost" rule: seconds since the last heartbeat when that is longer than
    ``lost_timeout`` (and at least three heartbeats), else None. Used for steps, runs and workers."""
    age = (now if now is not None else time.time()) - ts
    return age if age > max(lost_timeout, 3 * (heartbeat_interval or 0.0)) else None


@dataclass(frozen=True)
class StepRecord:
    state: str
    ts: float = field(default_factory=time.time)  # wall clock: compared across machines
    queue: str | None = None
    worker: str | None = None
    host: str | None = None
    worker_pid: int | None = None
    step_pid: int | None = None
    message_id: str | None = None
    heartbeat_interval: float | None = None
    exit_code: int | None = None
    reason: str | None = None
    cannot_run: bool | None = None  # the message cannot run here at all (goes to the dead-letter queue)

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if v is not None})

    @classmethod
    def from_json(cls, text: str) -> StepRecord | None:
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                return None
            return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})
        except (ValueError, TypeError):
            return None

    def age(self, now: float | None = None) -> float:
        return (now if now is not None else time.time()) - self.ts

    def lost_for(self, lost_timeout: float, now: float | None = None) -> float | None:
        return lost_for(self.ts, self.heartbeat_interval, lost_timeout, now)


class LivenessStore:
    """Reads and writes step records and cancel requests in one Dagster instance."""

    def __init__(self, instance) -> None:
        self._storage = instance.run_storage

    def write(self, task_id: str, record: StepRecord) -> None:
        # One key per call: Dagster's set_cursor_values drops new keys of a batch that also
        # updates existing ones.
        self._storage.set_cursor_values({step_record_key(task_id): record.to_json()})

    def write_queued(self, records: Mapping[str, StepRecord]) -> None:
        """``queued`` records of many step attempts, in as few writes as Dagster allows."""
        keys = {queued_key(h): r.to_json() for h, r in records.items()}
        if not keys:
            return
        existing = set(self._storage.get_cursor_values(set(keys)))  # a resumed run re-sends an attempt
        new = {k: v for k, v in keys.items() if k not in existing}
        if new:
            self._storage.set_cursor_values(new)
        for key in existing:  # one per call, as in write()
            self._storage.set_cursor_values({key: keys[key]})

    def claim(self, task_id: str, worker: str, stale_after: float) -> str | None:
        """Claim the right to start this attempt; None when claimed, else who holds it.

        SQS may hand one message to two receivers at once (at-least-once delivery); both would find
        no record of the attempt and start it. The claim is one insert that only one of them can
        make. A claim older than ``stale_after`` whose attempt never started (its worker died
        between the claim and the start) is taken over."""
        from dagster_taskiq_sync._dagster.kv import kv_insert_new

        key = claim_key(task_id)
        value = json.dumps({"worker": worker, "ts": time.time()})
        if kv_insert_new(self._storage, key, value):
            return None
        try:
            holder = json.loads(self._storage.get_cursor_values({key}).get(key) or "{}")
            since = time.time() - float(holder.get("ts", 0))
        except (ValueError, AttributeError, TypeError):
            holder, since = {}, float("inf")
        if since > stale_after:
            self._storage.set_cursor_values({key: value})
            return None
        return str(holder.get("worker") or "another worker")

    def unclaim(self, task_id: str) -> None:
        """Give a claim back (the attempt could not be started here)."""
        from dagster_taskiq_sync._dagster.kv import kv_delete

        kv_delete(self._storage, [claim_key(task_id)])

    def read(self, task_ids: Iterable[str]) -> dict[str, StepRecord]:
        """The latest record of each step attempt: the worker's, else the orchestrator's ``queued``."""
        ids = {}
        for task_id in task_ids:
            ids[step_record_key(task_id)] = task_id
            ids[queued_key(task_id)] = task_id
        if not ids:
            return {}
        keys = list(ids)
        values: dict[str, str] = {}
        for start in range(0, len(keys), READ_CHUNK):  # bounded IN (...) lists
            values.update(self._storage.get_cursor_values(set(keys[start : start + READ_CHUNK])))
        records: dict[str, StepRecord] = {}
        for key, text in values.items():
            record = StepRecord.from_json(text)
            if record is None:
                continue
            task_id = ids[key]
            if record.state != QUEUED or task_id not in records:
                records[task_id] = record
        return records

    def request_cancel(self, task_id: str, reason: str) -> None:
        self._storage.set_cursor_values({cancel_key(task_id): json.dumps({"reason": reason, "ts": time.time()})})

    def cancel_requests(self, task_ids: Iterable[str]) -> Mapping[str, str]:
        ids = {cancel_key(h): h for h in task_ids}
        if not ids:
            return {}
        requests = {}
        for key, value in self._storage.get_cursor_values(set(ids)).items():
            try:
                reason = json.loads(value).get("reason")
            except (ValueError, AttributeError):
                reason = None
            if isinstance(reason, str) and reason:
                requests[ids[key]] = reason
        return requests

    def forget(self, task_ids: Iterable[str], run_id: str | None = None, outage_timeout: float = 0.0) -> int:
        """Delete the records of these step attempts (their run's execution is over). Cancel
        requests stay until the sweep: a terminated run's workers may not have read them yet.

        The delete is a statement of its own (not one of the storage methods ``db_retry`` wraps):
        with ``outage_timeout`` it rides out a database outage (or a pooled connection the
        server closed in a restart) that long, instead of leaving the run's records for the
        sweep a ``record_expiry`` later."""
        from dagster_taskiq_sync._dagster.kv import kv_delete
        from dagster_taskiq_sync.storage.db_retry import retry_transient

        keys = [
            key for task_id in task_ids for key in (step_record_key(task_id), queued_key(task_id), claim_key(task_id))
        ]
        if run_id:
            keys.append(probe_key(run_id))

        def delete() -> int:
            return kv_delete(self._storage, keys)

        if outage_timeout <= 0:
            return delete()
        return retry_transient(
            delete, what=f"deleting the step records of run {run_id}", deadline_seconds=outage_timeout
        )

    def probe(self, run_id: str) -> None:
        """One write, to tell whether the store takes writes now (the orchestrator's check)."""
        self._storage.set_cursor_values({probe_key(run_id): json.dumps({"ts": time.time()})})

    def sweep(self, expiry: float, now: float | None = None, limit: int = 1000) -> int:
        """Delete records nobody updated for ``expiry`` seconds; returns how many."""
        from dagster_taskiq_sync._dagster.kv import kv_delete, kv_scan

        cutoff = (now if now is not None else time.time()) - expiry
        stale = []
        for key, value in kv_scan(self._storage, f"{KEY_PREFIX}/", limit):
            if key.startswith((f"{KEY_PREFIX}/worker", f"{KEY_PREFIX}/workers")):
                continue  # the worker registry expires its own entries
            try:
                ts = float(json.loads(value).get("ts", 0))
            except (ValueError, AttributeError, TypeError):
                ts = 0.0
            if ts < cutoff:
                stale.append(key)
        return kv_delete(self._storage, stale)
