"""Per-step time limits: what an op's tags and the run's Celery settings ask for, and how a step
message carries it.

Celery's two limits, with Celery's names: the *soft* limit interrupts the step (Dagster raises
``DagsterExecutionInterruptedError`` inside the op, which may clean up; Celery raises
``SoftTimeLimitExceeded``), the *hard* limit kills its process. A step's limit comes from, first
to last: its op's tag (``dagster-taskiq/time_limit``, ``dagster-taskiq/soft_time_limit``), the
run's ``config_source.task_time_limit`` / ``task_soft_time_limit``, the worker's own config (for
messages that carry none). The orchestrator resolves the first two for every step of the plan
before anything is sent (:func:`limits_for_step`, whose errors name the tag and the op), and the
message carries the result (:meth:`StepLimits.to_kwargs`); the worker adds its own defaults
(:meth:`StepLimits.with_defaults`) and enforces them.

A whole run launched by ``TaskiqRunLauncher`` has limits too, as Celery's apply to
dagster-celery's run task: its run tags (the same two names), else the launcher's
``config_source`` (:func:`limits_for_run`, resolved by the launcher, carried by the run's message).
The worker's own config does not bound runs: its limits are sized for steps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from dagster_taskiq_sync.errors import ConfigError

HARD_TAG = "dagster-taskiq/time_limit"
SOFT_TAG = "dagster-taskiq/soft_time_limit"
HARD_SETTING = "task_time_limit"
SOFT_SETTING = "task_soft_time_limit"
# A step message's fields, named as Celery's per-task options (Task.time_limit, Task.soft_time_limit).
HARD_FIELD = "time_limit"
SOFT_FIELD = "soft_time_limit"
HARD, SOFT = "hard", "soft"


class Source(str, Enum):
    """Where a step's limit came from; the value is what a message carries."""

    TAG = "tag"  # the op's tag
    RUN = "run"  # the run's execution config (config_source)
    WORKER = "worker"  # the worker's own config (-y), for a message that carries no limit
    RUN_TAG = "run_tag"  # a launched run's tag
    LAUNCHER = "launcher"  # the run launcher's config (config_source in dagster.yaml)


STEP_SOURCES = (Source.TAG, Source.RUN)  # what a step message may say
RUN_SOURCES = (Source.RUN_TAG, Source.LAUNCHER)  # what a run message may say


@dataclass(frozen=True)
class Limit:
    kind: str  # HARD or SOFT
    seconds: float
    source: Source

    @property
    def origin(self) -> str:
        """Where it was set, in the words of the setting the user wrote."""
        tag = HARD_TAG if self.kind == HARD else SOFT_TAG
        if self.source in (Source.TAG, Source.RUN_TAG):
            return f"{'op' if self.source is Source.TAG else 'run'} tag {tag}"
        setting = HARD_SETTING if self.kind == HARD else SOFT_SETTING
        whose = {Source.RUN: "run", Source.WORKER: "worker", Source.LAUNCHER: "run launcher"}[self.source]
        return f"{setting} in the {whose}'s config"

    def describe(self) -> str:
        return f"{self.kind} time limit of {self.seconds:g} s, set by {self.origin}"

    def interrupted(self, step_key: str) -> str:
        """What the op's interrupt says when this soft limit fires."""
        return f"Step {step_key} exceeded its {self.describe()}, and was interrupted."

    def killed(self) -> str:
        """Why the worker killed the step when this hard limit fired."""
        return f"exceeded its {self.describe()}"

    def run_stopped(self, run_id: str) -> str:
        """What a launched run's failure says when this limit stopped it."""
        done = "was interrupted" if self.kind == SOFT else "its process was killed"
        return f"Run {run_id} exceeded its {self.describe()}, and {done}."


@dataclass(frozen=True)
class StepLimits:
    """A step's hard and soft limit (None: none)."""

    hard: Limit | None = None
    soft: Limit | None = None

    def to_kwargs(self) -> dict[str, Any]:
        """Message fields; none when the step has no limit, so such messages read as before."""
        return {
            name: {"seconds": limit.seconds, "from": limit.source.value}
            for name, limit in ((HARD_FIELD, self.hard), (SOFT_FIELD, self.soft))
            if limit is not None
        }

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any], sources: tuple[Source, ...] = STEP_SOURCES) -> StepLimits:
        """The limits a message carries; ValueError (one sentence) when a field is malformed.
        ``sources``: where a limit of this kind of message may come from."""
        allowed = {source.value for source in sources}
        found: dict[str, Limit] = {}
        for name, kind in ((HARD_FIELD, HARD), (SOFT_FIELD, SOFT)):
            value = kwargs.get(name)
            if value is None:
                continue
            if not isinstance(value, dict) or set(value) != {"seconds", "from"}:
                raise ValueError(f"the message's {name} is not a {{seconds, from}} object")
            seconds, source = value["seconds"], value["from"]
            if source not in allowed or not _positive_seconds(seconds):
                said = " or ".join(repr(value) for value in sorted(allowed))
                raise ValueError(f"the message's {name} is not a positive number of seconds from {said}")
            found[kind] = Limit(kind, float(seconds), Source(source))
        limits = cls(found.get(HARD), found.get(SOFT))
        if limits.hard and limits.soft and limits.soft.seconds >= limits.hard.seconds:
            raise ValueError(f"the message's {SOFT_FIELD} is not below its {HARD_FIELD}")
        return limits

    def with_defaults(self, hard: float | None, soft: float | None) -> StepLimits:
        """These limits, with the worker's own config where the message set none."""
        limits = self
        if limits.hard is None and hard is not None:
            limits = StepLimits(Limit(HARD, hard, Source.WORKER), limits.soft)
        if limits.soft is None and soft is not None:
            limits = StepLimits(limits.hard, Limit(SOFT, soft, Source.WORKER))
        if limits.hard and limits.soft and limits.soft.seconds >= limits.hard.seconds:
            limits = StepLimits(limits.hard, None)  # the hard limit comes first: the soft one never would
        return limits

    def next_due(self, elapsed: float, soft_sent: bool, tick: float) -> float:
        """Seconds a supervisor may wait before looking again: ``tick``, or less when a limit
        falls due sooner (so a 1 s limit fires at about 1 s, not at the next tick)."""
        due = [
            limit.seconds - elapsed
            for limit in (self.hard, None if soft_sent else self.soft)
            if limit is not None and limit.seconds >= elapsed
        ]
        return min([tick, *due]) + 0.01


def _positive_seconds(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def tag_seconds(tags: Mapping[str, str], tag: str, name: str, owner: str = "op") -> float | None:
    """A limit tag's value in seconds (None: not set); anything but a positive number of seconds
    is a ConfigError naming the tag and the ``owner`` ("op" or "run") ``name``."""
    raw = tags.get(tag)
    if raw is None:
        return None
    try:
        seconds = float(str(raw).strip())
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(
            f"tag {tag}={raw!r} on {owner} {name} must be a positive number of seconds (for example '300' or "
            "'1.5'); fix the tag."
        )
    return seconds


def limits_for_step(op: str, tags: Mapping[str, str], run_hard: float | None, run_soft: float | None) -> StepLimits:
    """Op ``op``'s limits from its tags, else the run's ``task_time_limit`` / ``task_soft_time_limit``.

    A soft limit from the tag must be below the step's hard limit (it could never fire); the
    run-wide soft default simply does not apply to a step whose own hard limit is shorter.
    """
    return _from_tags(tags, "op", op, (Source.TAG, Source.RUN), run_hard, run_soft)


def limits_for_run(run_id: str, tags: Mapping[str, str], hard: float | None, soft: float | None) -> StepLimits:
    """A launched run's limits: its tags, else the launcher's ``task_time_limit`` /
    ``task_soft_time_limit`` (``hard``, ``soft``); the same rules and sentences as an op's."""
    return _from_tags(tags, "run", run_id, (Source.RUN_TAG, Source.LAUNCHER), hard, soft)


def _from_tags(
    tags: Mapping[str, str],
    owner: str,
    name: str,
    sources: tuple[Source, Source],
    hard_default: float | None,
    soft_default: float | None,
) -> StepLimits:
    """Limits from ``owner`` ``name``'s tags (``sources[0]``), else the config's defaults (``sources[1]``)."""
    by_tag, by_config = sources
    found: dict[str, Limit] = {}
    for kind, tag, default in ((HARD, HARD_TAG, hard_default), (SOFT, SOFT_TAG, soft_default)):
        seconds = tag_seconds(tags, tag, name, owner)
        if seconds is not None:
            found[kind] = Limit(kind, seconds, by_tag)
        elif default is not None:
            found[kind] = Limit(kind, default, by_config)
    hard, soft = found.get(HARD), found.get(SOFT)
    if hard is not None and soft is not None and soft.seconds >= hard.seconds:
        if soft.source is not by_tag:
            return StepLimits(hard, None)
        raise ConfigError(
            f"tag {SOFT_TAG}={tags[SOFT_TAG]!r} on {owner} {name} must be below the {owner}'s {hard.describe()}, or "
            f"the soft limit never fires; lower it or raise {HARD_TAG}."
        )
    return StepLimits(hard, soft)


def check_run_limits(hard: float | None, soft: float | None, path: str) -> None:
    """The run-wide soft limit must be below the run-wide hard limit (config time)."""
    if hard is not None and soft is not None and soft >= hard:
        raise ConfigError(
            f"{path}.{SOFT_SETTING} ({soft:g} s) must be below {path}.{HARD_SETTING} ({hard:g} s), or the soft "
            "limit never fires; lower it or remove it."
        )
