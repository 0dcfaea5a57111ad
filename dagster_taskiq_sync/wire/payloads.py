"""Offloaded payloads: where a body too large for its queue lives in S3, and what a worker checks.

A sender puts the TaskIQ body at ``PREFIX/TASK_ID.json`` in the offload bucket and sends a pointer
(bucket, key, size, SHA-256, and the identity of the message: run, step and attempt, or launch).
A worker reads a pointer only inside the configured bucket and prefix, only up to
``max_payload_mib``, and checks the payload against the SHA-256 (a signed pointer must carry it).
A payload that is gone or altered still names the step it was for, so that step fails promptly.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from dagster_taskiq_sync.wire.messages import MalformedMessage, Message, identity, identity_dict, shown

_S3_KEY = re.compile(r"^[A-Za-z0-9_.=-]+(/[A-Za-z0-9_.=-]+)*$")


@dataclass(frozen=True)
class S3Pointer:
    """Where an offloaded body lives; only ever inside the configured bucket and prefix."""

    bucket: str
    key: str
    size: int | None = None
    sha256: str | None = None
    # The run, step and attempt (or launch) of the message in the payload, so that a payload that
    # is gone or altered still fails its step promptly. Only as trusted as the pointer: signed, or
    # (unsigned) admitted only where a whole message for that attempt would be.
    names: Message | None = None

    def encode(self) -> bytes:
        data: dict[str, Any] = {"s3_bucket": self.bucket, "s3_key": self.key, "size": self.size, "sha256": self.sha256}
        if self.names is not None:
            data["names"] = identity_dict(self.names)
        return json.dumps(data).encode()

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def pointer_for(bucket: str, prefix: str, task_id: str, payload: bytes) -> S3Pointer:
    key = "/".join(part for part in (prefix.strip("/"), f"{task_id}.json") if part)
    return S3Pointer(bucket, key, len(payload), hashlib.sha256(payload).hexdigest(), _identity_in(payload, task_id))


def _identity_in(payload: bytes, task_id: str) -> Message | None:
    """The identity of the (sender's own) message in ``payload``, when it is one of ours."""
    try:
        data = json.loads(payload)
        names = identity({"task_name": data["task_name"], **data["kwargs"]})
    except (ValueError, KeyError, TypeError, MalformedMessage):
        return None
    return names if names.task_id == task_id else None


def decode_pointer(body: bytes, bucket: str | None, prefix: str, max_bytes: int) -> S3Pointer:
    """The pointer in an SQS body, refused unless it names the configured bucket and prefix."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        data = None
    if not isinstance(data, dict):
        raise MalformedMessage("the S3 pointer is not a JSON object")
    where, key = data.get("s3_bucket"), data.get("s3_key")
    if not bucket:
        raise MalformedMessage(
            "the message points at S3, and this worker has no offload bucket configured (execution.config.backend)"
        )
    if where != bucket:
        raise MalformedMessage(f"the S3 pointer names bucket {shown(where)}, not the configured {bucket!r}")
    prefix = prefix.strip("/")
    if (
        not isinstance(key, str)
        or len(key) > 1024
        or ".." in key
        or not _S3_KEY.fullmatch(key)
        or (prefix and not key.startswith(prefix + "/"))
    ):
        raise MalformedMessage(f"the S3 pointer's key {shown(key)} is not under the offload prefix {prefix!r}")
    size, digest = data.get("size"), data.get("sha256")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise MalformedMessage("the S3 pointer's size is not a whole number")
    if size is not None and size > max_bytes:
        raise MalformedMessage(
            f"the offloaded payload is {size} bytes, over the {max_bytes}-byte limit (execution.config.max_payload_mib)"
        )
    if digest is not None and (not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest)):
        raise MalformedMessage("the S3 pointer's sha256 is malformed")
    return S3Pointer(bucket, key, size, digest, _named(data.get("names"), key))


def _named(names: Any, key: str) -> Message | None:
    """The message a pointer names (None for a pointer of an older sender, which names none)."""
    if names is None:
        return None
    if not isinstance(names, dict):
        raise MalformedMessage("the S3 pointer's names are not a JSON object")
    message = identity(names)
    if key.rsplit("/", 1)[-1] != f"{message.task_id}.json":
        raise MalformedMessage(f"the S3 pointer's key {shown(key)} is not the payload of {message.label}")
    return message


def check_payload(pointer: S3Pointer, payload: bytes, signed: bool) -> None:
    """A fetched payload must be what the (signed) pointer says it is."""
    if pointer.sha256 is not None and hashlib.sha256(payload).hexdigest() != pointer.sha256:
        raise MalformedMessage(f"the payload at {pointer.url} does not match the SHA-256 in its message")
    if signed and pointer.sha256 is None:
        raise MalformedMessage("a signed message points at S3 without the payload's SHA-256")
