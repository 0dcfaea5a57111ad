"""What keeps the worker's signing keys from the code of the jobs it runs.

A step's own code runs in a step child, and with the signing key it could forge messages for every
run the workers serve. So:

- **Scrubbed environment.** The processes the worker execs (the fork server, which forks every
  child, and multiprocessing's resource tracker) start without the environment variables the
  worker's keys came from (:func:`scrub_environment_of_spawned`). The fork server is a fresh
  interpreter, so no copy of a key is anywhere in its memory, nor in its children's. A run child,
  which signs the step messages of its run, gets the variables on its pipe instead
  (:func:`send_key_environment`), and only takes them when its job's executor is taskiq's.
- **Not dumpable.** The worker itself still holds the keys (in its environment block and its
  keyring): :func:`set_dumpable` (``PR_SET_DUMPABLE`` 0) makes the kernel refuse other processes of
  the same user ``/proc/<worker>/environ``, ``/proc/<worker>/mem`` and ptrace, unless they have
  ``CAP_SYS_PTRACE`` (root usually has it; Docker's default root does not). A child that exec's is
  dumpable again, so the fork server and its children are ordinary processes.
- **Another user.** A worker running as root can run its children as ``--step-user``
  (:class:`StepUser`): they then cannot read a key file only root may read, nor anything of the
  worker's process.
"""

from __future__ import annotations

import ctypes
import json
import logging
import multiprocessing.util as mp_util
import os
import pwd
import sys
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from dagster_taskiq_sync.errors import ConfigError

log = logging.getLogger("dagster_taskiq_sync.worker")
_PR_SET_DUMPABLE = 4
KEY_ENV_MAX_BYTES = 65536  # the variables a run child gets on its pipe; a few keys are ~100 bytes each


def set_dumpable(dumpable: bool) -> bool:
    """``prctl(PR_SET_DUMPABLE)`` on Linux; False where there is no such call (nothing changes)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_DUMPABLE, 1 if dumpable else 0, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def forget_initial_environment(names: Iterable[str]) -> int:
    """Overwrite the values of ``names`` in this process's initial environment block, which is what
    ``/proc/<pid>/environ`` shows; they stay in ``os.environ`` and the C environment (on the heap).

    Not dumpable is not enough for that file: on Linux, root without ``CAP_SYS_PTRACE`` (root in a
    default Docker container) still reads a non-dumpable root process's environ (not its memory).
    Returns how many values were overwritten.
    """
    wanted = {name.encode() + b"=" for name in names if name in os.environ}
    if not wanted or not sys.platform.startswith("linux"):
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    entries = ctypes.POINTER(ctypes.c_void_p).in_dll(libc, "environ")
    done = []
    i = 0
    while entries[i]:
        address = entries[i]
        entry = ctypes.string_at(address)
        prefix = next((p for p in wanted if entry.startswith(p)), None)
        if prefix is not None:
            ctypes.memset(address + len(prefix), 0, len(entry) - len(prefix))
            done.append(prefix[:-1].decode())
        i += 1
    for name in done:  # the C environment gets its value back, as a copy on the heap
        os.putenv(name, os.environ[name])
    return len(done)


def guard_worker(name: str, signs: bool, step_user: StepUser | None, key_env: Iterable[str] = ()) -> None:
    """In the worker, as it starts: not dumpable, its environment block without the keys, and a
    warning where step code can read the keys anyway."""
    set_dumpable(False)
    forget_initial_environment(key_env)
    if signs and step_user is None and os.geteuid() == 0:
        log.warning(
            "worker %s runs as root without --step-user, so a step's code can read its signing key "
            "(a key file, the worker's process); add --step-user USER (README: Security model).",
            name,
        )


# --- the environment of what the worker execs ---------------------------------------------------------

_scrubbed: set[str] = set()  # variable names no process this one spawns through multiprocessing gets
_spawn_lock = threading.Lock()
_host_spawnv_passfds = mp_util.spawnv_passfds


@contextmanager
def _without_variables(names: Iterable[str]) -> Iterator[None]:
    """Unset ``names`` in the C environment (what an exec hands on) while this block runs.

    ``os.environ`` is left alone, so Python code in other threads (an embedding host's too) never
    sees them missing; only the process spawned in the block starts without them.
    """
    removed = [name for name in names if name in os.environ]
    for name in removed:
        os.unsetenv(name)
    try:
        yield
    finally:
        for name in removed:
            if name in os.environ:
                os.putenv(name, os.environ[name])


def _spawnv_passfds(path: Any, args: Any, passfds: Any) -> int:
    with _spawn_lock, _without_variables(sorted(_scrubbed)):
        return _host_spawnv_passfds(path, args, passfds)


mp_util.spawnv_passfds = _spawnv_passfds  # multiprocessing's fork server and resource tracker start through it


def scrub_environment_of_spawned(names: Iterable[str]) -> None:
    """From now on, the fork server and resource tracker this process starts lack ``names``."""
    _scrubbed.update(names)


def encode_key_environment(variables: Mapping[str, str]) -> bytes:
    """What a run child gets on its pipe: the signing-key variables, as JSON."""
    data = json.dumps(dict(variables)).encode()
    if len(data) > KEY_ENV_MAX_BYTES:
        raise ConfigError(
            f"the signing-key environment variables ({', '.join(sorted(variables))}) hold more than "
            f"{KEY_ENV_MAX_BYTES} bytes; keep only the keys in them."
        )
    return data


def send_key_environment(conn: Any, data: bytes) -> None:
    """Hand a run child the signing-key variables (it takes them if its run signs step messages)."""
    try:
        conn.send_bytes(data)
    except (OSError, ValueError):  # the child is gone already: its exit code says why
        pass


def take_key_environment(conn: Any) -> None:
    """In a run child: put the variables its worker sent into this process's environment."""
    variables = json.loads(conn.recv_bytes(KEY_ENV_MAX_BYTES))
    os.environ.update({str(k): str(v) for k, v in variables.items()})


# --- the step user ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepUser:
    """The user a worker running as root runs its children as (``--step-user``)."""

    name: str
    uid: int
    gid: int
    home: str

    @classmethod
    def lookup(cls, user: str, euid: int | None = None) -> StepUser:
        """The user named (or numbered) ``user``, checked where the worker starts."""
        try:
            entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        except (KeyError, OverflowError):
            raise ConfigError(
                f"--step-user {user!r} is not a user on this machine; create it, or name an existing user."
            ) from None
        euid = os.geteuid() if euid is None else euid
        if euid != 0:
            raise ConfigError(
                f"--step-user {user!r} needs the worker to run as root (it runs as uid {euid}); "
                "start the worker as root, or leave --step-user out."
            )
        if entry.pw_uid == 0:
            raise ConfigError(
                f"--step-user {user!r} is root, which can read everything the worker holds; name an unprivileged user."
            )
        return cls(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir)

    def become(self) -> None:
        """In a child: drop to this user for good (groups first, then the gid, then the uid)."""
        os.initgroups(self.name, self.gid)
        os.setgid(self.gid)
        os.setuid(self.uid)
        try:
            os.setuid(0)
        except PermissionError:
            pass
        else:  # should never happen: a process that can become root again is not dropped
            os._exit(70)
        os.environ.update(HOME=self.home, USER=self.name, LOGNAME=self.name)
