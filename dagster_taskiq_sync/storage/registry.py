"""Who records the live workers: the registry behind `worker list` and `worker terminate`.

SQS has no remote control (dagster-celery's `worker list` / `terminate` do nothing there), so the
registry lives where every worker and the CLI already meet: the Dagster instance of
``DAGSTER_HOME`` (as ``dagster-celery worker start`` requires too). Each worker keeps a record
(name, host, pid, queues, running steps, last heartbeat) under its own key and its name in an
index; a terminate request is a separate key the worker polls, so it never races a heartbeat.

The index is read-modify-write; two workers registering at the same instant can drop one name,
which its next heartbeat puts back (each heartbeat re-adds a missing name). Workers killed without
a chance to say "stopped" (SIGKILL, a lost node) are shown as lost, and pruned from the registry
``lost_worker_expiry`` seconds after their last heartbeat.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from dagster_taskiq_sync.storage.liveness import KEY_PREFIX, lost_for

INDEX_KEY = f"{KEY_PREFIX}/workers"


def worker_key(name: str) -> str:
    return f"{KEY_PREFIX}/worker/{name}"


def control_key(name: str) -> str:
    return f"{KEY_PREFIX}/worker-control/{name}"


@dataclass(frozen=True)
class WorkerRecord:
    name: str
    host: str
    pid: int
    queues: list[str]
    concurrency: int
    running: list[str] = field(default_factory=list)  # step keys ("run ID" for a whole run)
    # The same steps in full: {"run_id", "step_key" (None: a whole run), "attempt", "queue",
    # "since" (wall clock)}. Written by a worker, read by the dashboard as untrusted text.
    steps: list[dict[str, Any]] = field(default_factory=list)
    state: str = "running"  # running | stopping | stopped
    heartbeat_interval: float = 5.0
    signing_required: bool = False
    ts: float = field(default_factory=time.time)

    def age(self, now: float | None = None) -> float:
        return (now if now is not None else time.time()) - self.ts

    def looks_alive(self, now: float | None = None) -> bool:
        # The one "lost" rule, with a short floor: the registry is refreshed every heartbeat.
        return self.state != "stopped" and lost_for(self.ts, self.heartbeat_interval, 5.0, now) is None

    @classmethod
    def from_json(cls, text: str) -> WorkerRecord | None:
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                return None
            record = cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})
            if not isinstance(record.name, str) or not isinstance(record.queues, list):
                return None
            if not isinstance(record.steps, list) or not all(isinstance(s, dict) for s in record.steps):
                return replace(record, steps=[])
            return record
        except (ValueError, TypeError):
            return None


class WorkerRegistry:
    def __init__(self, instance: Any) -> None:
        self._storage = instance.run_storage

    def _index(self) -> list[str]:
        raw = self._storage.get_cursor_values({INDEX_KEY}).get(INDEX_KEY)
        try:
            names = json.loads(raw) if raw else []
        except ValueError:
            names = []
        return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []

    def _set(self, key: str, value: str) -> None:
        # One key per call: Dagster's set_cursor_values drops new keys of a mixed batch.
        self._storage.set_cursor_values({key: value})

    def record(self, worker: WorkerRecord) -> None:
        self._set(worker_key(worker.name), json.dumps(asdict(worker)))
        names = self._index()
        if worker.state == "stopped":
            if worker.name in names:
                self._set(INDEX_KEY, json.dumps([n for n in names if n != worker.name]))
        elif worker.name not in names:
            self._set(INDEX_KEY, json.dumps([*names, worker.name]))

    def workers(self) -> list[WorkerRecord]:
        names = self._index()
        if not names:
            return []
        values = self._storage.get_cursor_values({worker_key(n) for n in names})
        records = []
        for name in names:
            record = WorkerRecord.from_json(values.get(worker_key(name), ""))
            if record is not None:
                records.append(record)
        return records

    def prune(self, expiry: float, now: float | None = None) -> list[str]:
        """Forget workers whose last heartbeat is older than ``expiry`` seconds; returns their names."""
        from dagster_taskiq_sync._dagster.kv import kv_delete

        now = now if now is not None else time.time()
        gone = [r.name for r in self.workers() if r.age(now) > expiry]
        if gone:
            self._set(INDEX_KEY, json.dumps([n for n in self._index() if n not in gone]))
            kv_delete(self._storage, [key for name in gone for key in (worker_key(name), control_key(name))])
        return gone

    def request_terminate(self, name: str) -> None:
        self._set(control_key(name), json.dumps({"action": "terminate", "ts": time.time()}))

    def terminate_requested(self, name: str, since: float) -> bool:
        raw = self._storage.get_cursor_values({control_key(name)}).get(control_key(name))
        try:
            request = json.loads(raw) if raw else None
            return (
                isinstance(request, dict)
                and request.get("action") == "terminate"
                and float(request.get("ts", 0)) >= since
            )
        except (ValueError, TypeError):
            return False
