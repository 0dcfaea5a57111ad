"""What bin/soak reads back after the runs: the workers' log lines (a step started, a message
dropped, dead-lettered or released, and why) and the ops' start/end markers
(``benchmarks/soak_jobs.py`` writes one line per start and end of user code)."""

from __future__ import annotations

import re
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

STARTED_RE = re.compile(
    r"worker (\S+): step (\S+) \(attempt (\d+)\) of run ([0-9a-f-]{36}) started \(queue (\S+), pid (\d+)\)"
)
DROPPED_RE = re.compile(r"worker (\S+): dropping message (\S+) \(delivered (\d+) times\): (.*); not running it")
LABEL_RE = re.compile(r"step (\S+) \(attempt (\d+)\) of run ([0-9a-f-]{36})")
NEVER_RE = re.compile(r"worker (\S+): message (\S+) on queue (\S+) can never run: (.*)")
RELEASE_RE = re.compile(r"worker (\S+): releasing message (\S+) back to queue (\S+) \((.*)\)")


def worker_logs(logs: list[Path | None]) -> dict[str, Any]:
    """Every worker's log, read: ``started`` and ``dropped`` by (run, step, attempt), the messages
    that can ``never`` run, and ``releases`` by reason."""
    started: dict[tuple, list[dict]] = defaultdict(list)
    dropped: dict[tuple, list[dict]] = defaultdict(list)
    never: list[dict] = []
    releases: Counter = Counter()
    for path in logs:
        text = path.read_text(errors="replace") if path else ""
        for line in text.splitlines():
            if m := STARTED_RE.search(line):
                started[(m[4], m[2], int(m[3]))].append({"worker": m[1], "queue": m[5], "pid": int(m[6])})
            elif m := DROPPED_RE.search(line):
                if lm := LABEL_RE.search(m[4]):
                    dropped[(lm[3], lm[1], int(lm[2]))].append(
                        {"worker": m[1], "message": m[2], "delivered": int(m[3]), "why": m[4], "ts": log_time(line)}
                    )
            elif m := NEVER_RE.search(line):
                never.append({"worker": m[1], "message": m[2], "queue": m[3], "why": m[4]})
            elif m := RELEASE_RE.search(line):
                releases[m[4]] += 1
    return {"started": started, "dropped": dropped, "never": never, "releases": releases}


def log_time(line: str) -> float | None:
    """Wall-clock time of a worker log line ("2026-12-01 16:53:57,024 ..."; local time)."""
    try:
        return time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")) + int(line[20:23]) / 1000
    except (ValueError, IndexError):
        return None


def markers_of(markers: Path, run_id: str) -> list[dict]:
    """The start/end markers of one run's user code, in the order written."""
    path = markers / f"{run_id}.log"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        what, step, retry, pid, worker, inc, ts = line.split()
        out.append(
            {
                "what": what,
                "step": step,
                "retry": int(retry),
                "pid": int(pid),
                "worker": worker,
                "incarnation": int(inc) if inc.isdigit() else None,
                "ts": float(ts),
            }
        )
    return out


def drop_reasons(dropped: dict) -> dict[str, int]:
    counts: Counter = Counter()
    for items in dropped.values():
        for item in items:
            why = item["why"]
            if "and has ended (the run's event log has its outcome)" in why:
                kind = "already started and ended (its outcome in the event log; its record was stale)"
            elif " already started " in why or " already ran " in why:
                kind = (
                    "already started (lost worker)"
                    if "(lost)" in why
                    else ("already ran" if " already ran " in why else "already started")
                )
            elif re.search(r"run \S+ is \w+, so", why):
                kind = "run is over: " + re.search(r"run \S+ is (\w+), so", why).group(1)
            else:
                kind = why[:80]
            counts[kind] += 1
    return dict(counts)
