"""Step liveness and cancellation, shared by orchestrator and workers through the Dagster instance.

Nothing is held in orchestrator memory: each step attempt has a deterministic id (run id, step
key, attempt; see ``executor.step_handle_id``) and its record lives in the instance's key-value
store, which every process of a deployment already shares (sqlite on one machine, PostgreSQL
across machines). The default ``rpc://`` backend therefore needs no extra service.

Record life cycle: the orchestrator writes ``queued`` when it sends the message (under its own
key, in batches, so it can land after the worker's record without hiding it); the worker
writes ``running`` when the step process starts and again every heartbeat; ``exited`` (with the
exit code) when it ends abnormally (a step that ran to its end has its result in the event log). ``read`` prefers the worker's record. A cancel request is a separate
key, so a heartbeat never overwrites it.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Iterable, Mapping

KEY_PREFIX = "dagster-taskiq-sync"

QUEUED = "queued"
RUNNING = "running"
EXITED = "exited"


def step_handle_id(run_id: str, step_key: str, attempt: int) -> str:
    """Deterministic id of one step attempt: the message's task id, FIFO dedup id and the key
    of its liveness record."""
    digest = hashlib.sha256(f"{run_id}\0{step_key}\0{attempt}".encode()).hexdigest()
    return f"{run_id[:8]}-{digest[:40]}"


def run_handle_id(run_id: str, launch: str) -> str:
    """Deterministic id of one launch ("launch", "resume-1", ...) of a whole run."""
    return step_handle_id(run_id, f"<run:{launch}>", 0)


def step_record_key(handle_id: str) -> str:
    return f"{KEY_PREFIX}/step/{handle_id}"


def queued_key(handle_id: str) -> str:
    return f"{KEY_PREFIX}/queued/{handle_id}"


def cancel_key(handle_id: str) -> str:
    return f"{KEY_PREFIX}/cancel/{handle_id}"


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
    def from_json(cls, text: str) -> "StepRecord | None":
        try:
            data = json.loads(text)
            return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})
        except (ValueError, TypeError):
            return None

    def age(self, now: float | None = None) -> float:
        return (now or time.time()) - self.ts


class LivenessStore:
    """Reads and writes step records and cancel requests in one Dagster instance."""

    def __init__(self, instance) -> None:
        self._storage = instance.run_storage

    def write(self, handle_id: str, record: StepRecord) -> None:
        # One key per call: Dagster's set_cursor_values drops new keys of a batch that also
        # updates existing ones.
        self._storage.set_cursor_values({step_record_key(handle_id): record.to_json()})

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

    def read(self, handle_ids: Iterable[str]) -> dict[str, StepRecord]:
        """The latest record of each step attempt: the worker's, else the orchestrator's ``queued``."""
        ids = {}
        for handle in handle_ids:
            ids[step_record_key(handle)] = handle
            ids[queued_key(handle)] = handle
        if not ids:
            return {}
        values = self._storage.get_cursor_values(set(ids))
        records: dict[str, StepRecord] = {}
        for key, text in values.items():
            record = StepRecord.from_json(text)
            if record is None:
                continue
            handle = ids[key]
            if record.state != QUEUED or handle not in records:
                records[handle] = record
        return records

    def request_cancel(self, handle_id: str, reason: str) -> None:
        self._storage.set_cursor_values({cancel_key(handle_id): reason})

    def cancel_requests(self, handle_ids: Iterable[str]) -> Mapping[str, str]:
        ids = {cancel_key(h): h for h in handle_ids}
        if not ids:
            return {}
        return {ids[k]: v for k, v in self._storage.get_cursor_values(set(ids)).items() if v}
