"""A job whose op tries every route a step's code has to its worker's signing keys (issue 19).

The op does not know the keys: it is told their prefix, length and SHA-256 digests, and reports each
route where a string of that prefix and length hashes to one of them (so the search pattern in its
own memory never counts as a find). It logs its report as one ``KEYHUNT {json}`` line.
"""

import hashlib
import itertools
import json
import os
import re

from dagster import Config, job, op

from dagster_taskiq_sync import taskiq_executor

_REGION = re.compile(rb"^([0-9a-f]+)-([0-9a-f]+) r")
MAX_REGION = 1 << 30


class Hunt(Config):
    prefix: str
    length: int
    digests: list[str]  # SHA-256 of each key, hex


class _Hunter:
    def __init__(self, config: Hunt) -> None:
        self.prefix = config.prefix.encode()
        self.length = config.length
        self.digests = set(config.digests)
        self.routes: dict[str, str] = {}  # route -> "found" | "clean" | "denied (...)" | "absent"

    def has_key(self, data: bytes) -> bool:
        at = data.find(self.prefix)
        while at != -1:
            if hashlib.sha256(data[at : at + self.length]).hexdigest() in self.digests:
                return True
            at = data.find(self.prefix, at + 1)
        return False

    def look(self, route: str, read) -> None:
        try:
            data = read()
        except FileNotFoundError:
            self.routes[route] = "absent"
            return
        except OSError as exc:
            self.routes[route] = f"denied ({exc.strerror})"
            return
        self.routes[route] = "found" if self.has_key(data) else "clean"

    def memory(self, pid: str) -> bytes:
        """Where a key is in the readable memory of a process (its heap, stacks, environment block):
        the key itself when found, else b"" (PermissionError when none of it is readable)."""
        regions = 0
        with open(f"/proc/{pid}/maps", "rb") as maps, open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
            for line in maps.read().splitlines():
                found = _REGION.match(line)
                if not found or b"[vvar" in line or b"[vsyscall" in line:
                    continue
                start, end = int(found.group(1), 16), int(found.group(2), 16)
                if end - start > MAX_REGION:
                    continue
                try:
                    mem.seek(start)
                    data = mem.read(end - start)
                except (OSError, ValueError, OverflowError):
                    continue
                regions += 1
                if self.has_key(data):
                    return data
        if not regions:
            raise PermissionError(13, "no region readable")
        return b""


def _read(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as fh:
        return int(fh.read().rsplit(b")", 1)[1].split()[1])


def _named_files(cmdline: list[str]) -> list[str]:
    """The files a worker's command line names: its -y YAML and its --signing-key-file."""
    named = []
    for flag, value in itertools.pairwise(cmdline):
        if flag in ("-y", "--config-yaml", "--signing-key-file"):
            named.append(value)
    return named


def hunt_for_keys(config: Hunt) -> dict:
    hunter = _Hunter(config)
    fork_server = os.getppid()
    worker = _ppid(fork_server)
    cmdline = [a.decode() for a in _read(f"/proc/{worker}/cmdline").split(b"\0") if a]
    hunter.look("os.environ", lambda: "\n".join(os.environ.values()).encode())
    hunter.look("own memory", lambda: hunter.memory("self"))
    hunter.look("fork server environ", lambda: _read(f"/proc/{fork_server}/environ"))
    hunter.look("worker environ", lambda: _read(f"/proc/{worker}/environ"))
    hunter.look("worker memory", lambda: hunter.memory(str(worker)))
    for path in _named_files(cmdline):
        hunter.look(f"file {path}", lambda path=path: _read(path))
    others = [p for p in os.listdir("/proc") if p.isdigit() and int(p) not in (os.getpid(), worker, fork_server)]
    found_in = []
    for pid in others:
        try:
            if hunter.has_key(_read(f"/proc/{pid}/environ")):
                found_in.append(pid)
        except OSError:
            continue
    hunter.routes["any other process's environ"] = f"found in pids {found_in}" if found_in else "clean"
    # The fork server's other children: idle step children, and on a worker serving launched runs the
    # run child orchestrating this very run (alive while its step runs)
    siblings = []
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit() and int(pid) != os.getpid() and _ppid(int(pid)) == fork_server:
                status = _read(f"/proc/{pid}/status").decode()
                siblings.append(int(next(x for x in status.splitlines() if x.startswith("Uid:")).split()[1]))
        except (OSError, ValueError):
            continue
    caps = next(line for line in _read("/proc/self/status").decode().splitlines() if line.startswith("CapEff:"))
    return {
        "uid": os.getuid(),
        "cap_sys_ptrace": bool(int(caps.split()[1], 16) & (1 << 19)),
        "worker_pid": worker,
        "sibling_uids": siblings,
        "files": _named_files(cmdline),
        "routes": hunter.routes,
    }


@op
def hunt(context, config: Hunt) -> None:
    context.log.info("KEYHUNT " + json.dumps(hunt_for_keys(config)))


@job(executor_def=taskiq_executor)
def key_hunt():
    hunt()
