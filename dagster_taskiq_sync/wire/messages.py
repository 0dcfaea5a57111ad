"""The wire contract: what a message on a dagster-taskiq-sync queue is, built and checked here.

A message is a TaskIQ JSON message (``task_id``, ``task_name``, ``labels``, ``labels_types``,
``args``, ``kwargs``) whose task name says what it asks for (:class:`TaskKind`) and whose kwargs
name a run, a step and an attempt (plus the step's or run's time limits, two checked numbers:
``time_limits.py``), and nothing else: never a Dagster instance, a module, a file or a database. Workers use their own ``DAGSTER_HOME``; what a step needs beyond its identity
comes from the run stored there. The one exception is the step's ``known_state`` (retry counts,
ready outputs, dynamic mappings: the orchestrator's in-memory view that Dagster hands to every
step worker), which is deserialized only as Dagster's ``KnownExecutionState`` and checked
against the attempt it travels with.

Optional signing (:class:`Keyring`): HMAC-SHA256 over the exact SQS message body, carried in a
message attribute. A worker that holds keys rejects an unsigned, tampered or unknown-key message
before it parses anything, and an S3 pointer in a signed body carries the payload's SHA-256, so
the fetched payload is covered too (S3 pointers are ``payloads.py``'s). Keys rotate: senders sign
with the current key; workers accept the current and the previous ones. On FIFO queues the
deduplication id is keyed too (:meth:`Keyring.dedup_id`).

:func:`decode` raises one exception type, :class:`MalformedMessage`, whose ``reason`` is a
sentence for the worker's log and the dead-letter queue.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any, Union

from dagster_taskiq_sync.wire.time_limits import HARD_FIELD, RUN_SOURCES, SOFT_FIELD, StepLimits
from dagster_taskiq_sync.wire.tracing import TraceContext, trace_context

MESSAGE_VERSION = 2

# dagster-celery's tags, so existing ops keep routing; the taskiq alias wins when both are set.
QUEUE_TAGS = ("dagster-taskiq/queue", "dagster-celery/queue")
# The first one set wins; Dagster's own dagster/priority (on an op, or on a run, where Dagster's run
# queue reads it) counts too.
STEP_PRIORITY_TAGS = ("dagster-taskiq/priority", "dagster-celery/priority", "dagster/priority")
RUN_PRIORITY_TAGS = ("dagster-taskiq/run_priority", "dagster-celery/run_priority", "dagster/priority")

SIGNATURE_ATTRIBUTE = "dts-signature"
S3_POINTER_ATTRIBUTE = "s3_extended_message"  # taskiq-aio-sqs's name for an offloaded body
MIN_KEY_CHARS = 32

_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,254}$")
_STEP_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\[\],:-]{0,1023}$")  # op names, graphs, dynamic keys
_LAUNCH = re.compile(r"^(launch|resume-[0-9]{1,6})$")
_MAX_ATTEMPT = 100_000
# A parsed JSON value costs up to ~70 bytes however few bytes it takes on the wire (`{},` is three:
# a 64 MiB payload of them used to take 1.5 GiB to parse). A body's values are counted before it is
# parsed and refused over max(MIN_VALUE_LIMIT, VALUES_PER_MIB per MiB of max_payload_mib): 1,048,576 at
# the default 64 MiB, at most a ~70 MiB parse. A genuine message has about one value per 13 bytes: a
# million is the fan-in after a ~50,000-way fan-out; a larger one needs a larger max_payload_mib.
MIN_VALUE_LIMIT = 1 << 20
VALUES_PER_MIB = 16_384


class TaskKind(str, Enum):
    """What a message asks a worker to do; the value is the TaskIQ task name."""

    STEP = "dagster_taskiq_sync.execute_step"  # taskiq_executor: one step attempt
    RUN = "dagster_taskiq_sync.execute_run"  # TaskiqRunLauncher.launch_run
    RESUME = "dagster_taskiq_sync.resume_run"  # TaskiqRunLauncher.resume_run


class MalformedMessage(Exception):
    """A message that can never run: its ``reason`` says why, in one sentence."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --- identities ---------------------------------------------------------------------------------


def step_task_id(run_id: str, step_key: str, attempt: int) -> str:
    """Deterministic id of one step attempt: its message's task id, FIFO dedup id and the key
    of its liveness record."""
    digest = hashlib.sha256(f"{run_id}\0{step_key}\0{attempt}".encode()).hexdigest()
    return f"{run_id[:8]}-{digest[:40]}"


def run_task_id(run_id: str, launch: str) -> str:
    """Deterministic id of one launch ("launch", "resume-1", ...) of a whole run."""
    return step_task_id(run_id, f"<run:{launch}>", 0)


# --- routing tags --------------------------------------------------------------------------------


def queue_for_tags(tags: Mapping[str, str], default_queue: str) -> str:
    """The Celery queue name a step or run goes to: its queue tag, else the default queue."""
    for tag in QUEUE_TAGS:
        if tags.get(tag):
            return tags[tag]
    return default_queue


def int_tag(tags: Mapping[str, str], names: tuple[str, ...], default: int) -> int:
    """A whole-number tag (priorities); a non-number is the user's to fix, by name."""
    from dagster_taskiq_sync.errors import ConfigError

    for name in names:
        value = tags.get(name)
        if value is not None:
            try:
                return int(value)
            except (TypeError, ValueError):
                raise ConfigError(f"tag {name}={value!r} must be a whole number; fix the tag.") from None
    return default


# --- the messages ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepMessage:
    """Run one attempt of one step of a run (taskiq_executor)."""

    run_id: str
    step_key: str
    attempt: int
    known_state: str  # Dagster-serialized KnownExecutionState
    limits: StepLimits = field(default_factory=StepLimits)  # from the op's tags and the run's config (time_limits.py)
    trace: TraceContext | None = field(default=None, compare=False)  # W3C, in the labels (wire/tracing)

    kind = TaskKind.STEP

    @property
    def task_id(self) -> str:
        return step_task_id(self.run_id, self.step_key, self.attempt)

    @property
    def label(self) -> str:
        return f"step {self.step_key} (attempt {self.attempt}) of run {self.run_id}"

    def kwargs(self) -> dict[str, Any]:
        return {
            "version": MESSAGE_VERSION,
            "run_id": self.run_id,
            "step_key": self.step_key,
            "attempt": self.attempt,
            "known_state": self.known_state,
            **self.limits.to_kwargs(),  # only when set: a message without limits reads as before
        }


@dataclass(frozen=True)
class RunMessage:
    """Run (``TaskKind.RUN``) or resume (``TaskKind.RESUME``) a whole run (TaskiqRunLauncher)."""

    kind: TaskKind
    run_id: str
    launch: str  # "launch", or "resume-N" for the Nth resume
    limits: StepLimits = field(default_factory=StepLimits)  # from the run's tags and the launcher's config
    trace: TraceContext | None = field(default=None, compare=False)  # W3C, in the labels (wire/tracing)

    @property
    def task_id(self) -> str:
        return run_task_id(self.run_id, self.launch)

    @property
    def label(self) -> str:
        return f"run {self.run_id} ({self.launch})"

    @property
    def step_key(self) -> None:
        return None

    def kwargs(self) -> dict[str, Any]:
        return {
            "version": MESSAGE_VERSION,
            "run_id": self.run_id,
            "launch": self.launch,
            **self.limits.to_kwargs(),  # only when set: a launch without limits reads as before
        }


Message = Union[StepMessage, RunMessage]


def encode(message: Message, sqs_queue: str) -> bytes:
    """The SQS body of ``message``: a TaskIQ JSON message (TaskIQ's own model and formatter)."""
    from taskiq.message import TaskiqMessage

    return (
        TaskiqMessage(
            task_id=message.task_id,
            task_name=message.kind.value,
            labels={"queue": sqs_queue, **(message.trace.labels() if message.trace else {})},
            labels_types=None,
            args=[],
            kwargs=message.kwargs(),
        )
        .model_dump_json()
        .encode()
    )


def max_values(max_payload_bytes: int) -> int:
    """The most JSON values a worker parses in one message, for its ``max_payload_mib``."""
    return max(MIN_VALUE_LIMIT, max_payload_bytes // (1024 * 1024) * VALUES_PER_MIB)


def count_values(body: bytes) -> int:
    """An upper bound on the JSON values in ``body`` (objects, arrays, and the items and members
    they hold), counted without parsing it; nested JSON in a string (``known_state``) counts too."""
    return sum(body.count(c) for c in (b"{", b"[", b",", b":"))


def decode(body: bytes, value_limit: int | None = None) -> Message:
    """The message in an SQS body (already verified and fetched); every field is checked. With
    ``value_limit``, a body holding more JSON values than that is refused before it is parsed, so
    parsing it stays bounded in memory."""
    if value_limit is not None:
        values = count_values(body)
        if values > value_limit:
            raise MalformedMessage(
                f"the message holds up to {values} JSON values, over the {value_limit} a worker parses "
                f"({VALUES_PER_MIB} per MiB of execution.config.max_payload_mib; raise it for a larger fan-out)"
            )
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise MalformedMessage(f"the body is not JSON ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise MalformedMessage("the body is not a TaskIQ message (not a JSON object)")
    task_name = data.get("task_name")
    try:
        kind = TaskKind(task_name)
    except ValueError:
        raise MalformedMessage(f"the message is for unknown task {shown(task_name)}") from None
    kwargs = data.get("kwargs")
    if not isinstance(kwargs, dict):
        raise MalformedMessage("the message has no kwargs object")
    if data.get("args") not in ([], None):
        raise MalformedMessage("the message has positional args; dagster-taskiq-sync messages have none")
    version = kwargs.get("version")
    if version != MESSAGE_VERSION or isinstance(version, bool):
        raise MalformedMessage(
            f"the message has version {shown(version)}, and this worker reads version {MESSAGE_VERSION}; "
            "run the same dagster-taskiq-sync version on orchestrators, launchers and workers"
        )
    message = _step(kwargs) if kind is TaskKind.STEP else _run(kind, kwargs)
    if data.get("task_id") != message.task_id:
        raise MalformedMessage("the message's task_id does not match its run, step and attempt")
    trace = trace_context(data.get("labels"))  # advisory: a malformed one is ignored, never fatal
    return replace(message, trace=trace) if trace else message


def queue_label(body: bytes) -> str | None:
    """The SQS queue a sender addressed a body to (signed messages are checked against it)."""
    try:
        labels = json.loads(body).get("labels")
        return labels.get("queue") if isinstance(labels, dict) else None
    except (ValueError, AttributeError, RecursionError):
        return None


def shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _expect_keys(kwargs: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = set(kwargs) - allowed
    if unknown:
        raise MalformedMessage(f"the message has fields this version does not define: {sorted(unknown)[:5]}")


def _text(kwargs: Mapping[str, Any], name: str, pattern: re.Pattern[str]) -> str:
    value = kwargs.get(name)
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise MalformedMessage(f"the message's {name} is missing or malformed: {shown(value)}")
    return value


def _step(kwargs: Mapping[str, Any]) -> StepMessage:
    _expect_keys(kwargs, {"version", "run_id", "step_key", "attempt", "known_state", HARD_FIELD, SOFT_FIELD})
    run_id = _text(kwargs, "run_id", _RUN_ID)
    step_key = _text(kwargs, "step_key", _STEP_KEY)
    attempt = _attempt(kwargs)
    known_state = kwargs.get("known_state")
    if not isinstance(known_state, str):
        raise MalformedMessage("the message's known_state is missing")
    _check_known_state(known_state, step_key, attempt)
    try:
        limits = StepLimits.from_kwargs(kwargs)
    except ValueError as exc:
        raise MalformedMessage(str(exc)) from None
    return StepMessage(run_id, step_key, attempt, known_state, limits)


def _attempt(kwargs: Mapping[str, Any]) -> int:
    attempt = kwargs.get("attempt")
    if not isinstance(attempt, int) or isinstance(attempt, bool) or not 1 <= attempt <= _MAX_ATTEMPT:
        raise MalformedMessage(f"the message's attempt is not a whole number from 1: {shown(attempt)}")
    return attempt


def _check_known_state(text: str, step_key: str, attempt: int) -> None:
    from dagster_taskiq_sync._dagster.names import KnownExecutionState, deserialize_value

    try:
        state = deserialize_value(text, KnownExecutionState)
    except Exception as exc:  # noqa: BLE001 - serdes raises many types; all mean the same here
        raise MalformedMessage(
            f"the message's known_state is not a Dagster execution state ({type(exc).__name__})"
        ) from None
    previous = state.get_retry_state().get_attempt_count(step_key)
    if previous + 1 != attempt:
        raise MalformedMessage(
            f"the message's attempt {attempt} disagrees with its known_state ({previous} earlier attempts)"
        )


def _run(kind: TaskKind, kwargs: Mapping[str, Any]) -> RunMessage:
    _expect_keys(kwargs, {"version", "run_id", "launch", HARD_FIELD, SOFT_FIELD})
    launch = _text(kwargs, "launch", _LAUNCH)
    if (kind is TaskKind.RUN) != (launch == "launch"):
        raise MalformedMessage(f"the message's launch {launch!r} does not fit task {kind.value}")
    try:
        limits = StepLimits.from_kwargs(kwargs, RUN_SOURCES)
    except ValueError as exc:
        raise MalformedMessage(str(exc)) from None
    return RunMessage(kind, _text(kwargs, "run_id", _RUN_ID), launch, limits)


# --- identities in S3 pointers ------------------------------------------------------------------


def identity_dict(message: Message) -> dict[str, Any]:
    """The JSON of a message's identity (what an S3 pointer names)."""
    names: dict[str, Any] = {"task_name": message.kind.value, "run_id": message.run_id}
    if isinstance(message, StepMessage):
        names.update(step_key=message.step_key, attempt=message.attempt)
    else:
        names["launch"] = message.launch
    return names


def identity(data: Mapping[str, Any]) -> Message:
    """The message that ``identity_dict`` describes (a step's without its known_state: it is only
    ever a name, never run); every field is checked as in :func:`decode`."""
    try:
        kind = TaskKind(data.get("task_name"))
    except ValueError:
        raise MalformedMessage(f"the S3 pointer names unknown task {shown(data.get('task_name'))}") from None
    if kind is not TaskKind.STEP:
        return _run(kind, {"version": MESSAGE_VERSION, "run_id": data.get("run_id"), "launch": data.get("launch")})
    return StepMessage(_text(data, "run_id", _RUN_ID), _text(data, "step_key", _STEP_KEY), _attempt(data), "")


# --- signing ---------------------------------------------------------------------------------------


class SignatureError(MalformedMessage):
    """Unsigned, tampered or signed with a key this worker does not hold."""


def key_id(key: bytes) -> str:
    """A short public name for a key, so a worker knows which of its keys to check against."""
    return hashlib.sha256(b"dagster-taskiq-sync/key-id\0" + key).hexdigest()[:12]


@dataclass(frozen=True)
class Keyring:
    """Signing keys: senders sign with ``current``; receivers accept ``current`` and ``previous``."""

    current: bytes | None = field(default=None, repr=False)
    previous: tuple[bytes, ...] = field(default=(), repr=False)

    def __repr__(self) -> str:
        # key ids only: error trackers capture locals (and their reprs) by default
        current = key_id(self.current) if self.current else None
        return f"Keyring(current={current}, previous={[key_id(k) for k in self.previous]})"

    @classmethod
    def from_secrets(cls, current: str | None, previous: tuple[str, ...] = (), setting: str = "signing_key") -> Keyring:
        from dagster_taskiq_sync.errors import ConfigError

        previous_setting = setting.replace("signing_key", "previous_signing_keys")
        for name, secret in [(setting, current), *((previous_setting, p) for p in previous)]:
            if secret is not None and len(secret.strip()) < MIN_KEY_CHARS:
                raise ConfigError(
                    f"{name} is {len(secret.strip())} characters; use a random secret of at least "
                    f"{MIN_KEY_CHARS} characters (for example `openssl rand -hex 32`), from {{env: NAME}}."
                )
        return cls(current.strip().encode() if current else None, tuple(p.strip().encode() for p in previous if p))

    @property
    def verifies(self) -> bool:
        """Whether a receiver with this keyring requires signed messages."""
        return self.current is not None or bool(self.previous)

    def _accepted(self) -> dict[str, bytes]:
        keys = [k for k in (self.current, *self.previous) if k]
        return {key_id(k): k for k in keys}

    def sign(self, body: bytes) -> dict[str, str]:
        """Message attributes carrying the signature of ``body`` ({} without a current key)."""
        if self.current is None:
            return {}
        digest = hmac.new(self.current, body, hashlib.sha256).hexdigest()
        return {SIGNATURE_ATTRIBUTE: f"v1:{key_id(self.current)}:{digest}"}

    def dedup_id(self, task_id: str) -> str:
        """A FIFO queue's MessageDeduplicationId for a message: keyed with the current signing key,
        else random. Never the task id itself: whoever can send to the queue could compute that
        and send junk under it first, and SQS would drop the real message for five minutes. A
        duplicate that gets through is dropped by the worker's claim on the attempt."""
        if self.current is None:
            return uuid.uuid4().hex
        return hmac.new(self.current, b"fifo-dedup\0" + task_id.encode(), hashlib.sha256).hexdigest()

    def verify(self, body: bytes, attributes: Mapping[str, str]) -> None:
        """Raise :class:`SignatureError` unless ``body`` carries a valid signature by an accepted key."""
        value = attributes.get(SIGNATURE_ATTRIBUTE)
        if not value:
            raise SignatureError("the message is not signed, and this worker requires signed messages")
        parts = value.split(":")
        if len(parts) != 3 or parts[0] != "v1":
            raise SignatureError("the message's signature is malformed")
        key = self._accepted().get(parts[1])
        if key is None:
            raise SignatureError(
                f"the message is signed with key {shown(parts[1][:12])}, which this worker "
                "does not hold (rotate keys: add it to previous_signing_keys)"
            )
        expected = hmac.new(key, body, hashlib.sha256).hexdigest()
        if not parts[2].isascii() or not hmac.compare_digest(expected, parts[2]):
            raise SignatureError("the message's signature does not match its body (tampered or wrong key)")
