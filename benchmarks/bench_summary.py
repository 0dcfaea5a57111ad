"""Where bin/bench's figures came from: each storage's invocation records its provenance in
benchmark.json (``invocations``): the command, the commit, when it started and ended, the load
average at both ends, the machine and the versions; ``--include`` carries it along."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .bench_results import Results, versions

UNKNOWN = "unknown"


# -- provenance --


def _commit(root: Path) -> str:
    """The checkout's short commit, ``-dirty`` with uncommitted changes to tracked files."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return UNKNOWN
    return f"{head}-dirty" if dirty else head or UNKNOWN


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def _load() -> str:
    """The 1, 5 and 15 minute load averages, as ``uptime`` prints them."""
    return ", ".join(f"{v:.2f}" for v in os.getloadavg())


def invocation_started(argv: list[str], root: Path) -> dict[str, Any]:
    """A storage's invocation as it starts (``ended``/``load_end`` follow from ``invocation_ended``)."""
    return {
        "command": "bin/bench " + shlex.join(argv),
        "commit": _commit(root),
        "started": _now(),
        "load_start": _load(),
        "ended": None,
        "load_end": None,
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "versions": versions(),
    }


def invocation_ended(invocation: dict[str, Any]) -> None:
    invocation.update(ended=_now(), load_end=_load())


def provenance(results: Results, storage: str) -> str:
    """One line: which invocation measured ``storage``, where and when (``unknown`` for what an
    older results file did not record)."""
    inv = results.invocations.get(storage, {})

    def get(key: str) -> str:
        value = inv.get(key)
        return UNKNOWN if value is None else str(value)

    command = f"`{inv['command']}`" if inv.get("command") else f"command {UNKNOWN}"
    when = f"{get('started')} to {get('ended')}" if inv.get("started") else f"date {UNKNOWN}"
    load = (
        f"load average (1, 5, 15 min) {get('load_start')} at start, {get('load_end')} at end"
        if inv.get("load_start")
        else f"load average {UNKNOWN}"
    )
    machine = f"{get('cpus')} CPUs, Python {get('python')}" if inv.get("cpus") else f"machine {UNKNOWN}"
    return f"{storage}: {command}; commit {get('commit')}; {when}; {load}; {machine}"
