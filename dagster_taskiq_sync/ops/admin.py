"""Who administers the queues: `queues create`, `queues stats` and `queues redrive`.

Everything here is run by an operator from the CLI, never by the executor or the workers, whose
IAM policies (``iam.py``) therefore need none of these calls.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from aiobotocore.session import get_session
from botocore import exceptions as boto_exc

from dagster_taskiq_sync.errors import BrokerError, ConfigError, QueueMissingError
from dagster_taskiq_sync.ops.iam import KMS_KEY_FORMS, check_kms_key, dead_letter_name, is_aws_managed_alias
from dagster_taskiq_sync.wire.aws import client_kwargs, for_service
from dagster_taskiq_sync.wire.broker import QUEUE_CREATE_HINT, SQS_LARGEST_MESSAGE, SQS_MIN_DEFAULT_SIZE
from dagster_taskiq_sync.wire.settings import SQSSettings

DEFAULT_PAYLOAD_EXPIRY_DAYS = 7
LIFECYCLE_RULE_ID = "dagster-taskiq-sync-payload-expiry"
SSE_ATTRIBUTES = ("KmsMasterKeyId", "SqsManagedSseEnabled", "KmsDataKeyReusePeriodSeconds")


def _code(exc: boto_exc.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _message(exc: boto_exc.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Message", ""))


def kms_key_for(settings: SQSSettings, kms_key: str | None) -> str | None:
    """The KMS key to encrypt with: ``--kms-key``, else sqs-creation-attributes' KmsMasterKeyId."""
    configured = settings.queue_attributes.get("KmsMasterKeyId") or None
    if kms_key and configured and kms_key != configured:
        raise ConfigError(
            f"--kms-key {kms_key!r} differs from sqs-creation-attributes.KmsMasterKeyId {configured!r}; "
            "pass the same key or drop one of them."
        )
    key = kms_key or configured
    if key:
        check_kms_key(key, "--kms-key" if kms_key else "sqs-creation-attributes.KmsMasterKeyId")
    return key


async def _check_key_usable(session: Any, settings: SQSSettings, key: str) -> str:
    """Ask KMS whether the key exists, is enabled and symmetric; returns a line for the report.

    SQS and S3 accept any key id at creation time and only fail when a message or object is
    written, so a typo would otherwise surface in the first run.
    """
    if is_aws_managed_alias(key):
        return f"KMS key {key}: AWS managed (created by AWS on first use)"
    try:
        async with session.create_client("kms", **for_service(client_kwargs(settings, session))) as kms:
            meta = (await kms.describe_key(KeyId=key))["KeyMetadata"]
    except boto_exc.ClientError as exc:
        if _code(exc) in ("AccessDenied", "AccessDeniedException"):
            return f"KMS key {key}: not checked (no kms:DescribeKey permission)"
        raise ConfigError(
            f"--kms-key {key!r} is not usable at {settings.describe_endpoint()} ({_code(exc)}: {_message(exc)}); "
            f"pass an existing key as {KMS_KEY_FORMS}."
        ) from None
    state, spec = meta.get("KeyState", "Enabled"), meta.get("KeySpec", "SYMMETRIC_DEFAULT")
    if state != "Enabled":
        raise ConfigError(
            f"--kms-key {key!r} is {state}, so SQS and S3 cannot encrypt with it; enable it or pass another key."
        )
    if spec != "SYMMETRIC_DEFAULT":
        raise ConfigError(
            f"--kms-key {key!r} is a {spec} key; SQS and S3 encrypt only with symmetric keys, pass one of those."
        )
    return f"KMS key {key}: {meta.get('Arn', key)} ({state})"


def _kms_rejected(exc: boto_exc.ClientError, key: str | None, service: str) -> ConfigError | None:
    """A ConfigError when the endpoint refused the KMS key (None for any other error)."""
    code, message = _code(exc), _message(exc)
    if key and (code.startswith("KMS") or "kms" in message.lower() or "KmsMasterKeyId" in message):
        return ConfigError(
            f"{service} rejected --kms-key {key!r} ({code}: {message}); pass an existing, enabled key as {KMS_KEY_FORMS}."
        )
    return None


def _same(attribute: str, current: Any, wanted: Any) -> bool:
    if attribute == "RedrivePolicy":  # JSON whose numbers SQS may render as numbers or strings
        try:
            a, b = json.loads(current or "{}"), json.loads(wanted)
            return a.get("deadLetterTargetArn") == b.get("deadLetterTargetArn") and str(
                a.get("maxReceiveCount")
            ) == str(b.get("maxReceiveCount"))
        except (ValueError, AttributeError):
            return False
    return str(current if current is not None else "").lower() == str(wanted).lower()


async def _ensure_queue(
    sqs: Any, name: str, attributes: Mapping[str, str], tags: Mapping[str, str], keep_kms: bool
) -> tuple[str, str]:
    """Create ``name`` or bring an existing queue's attributes to ``attributes``; returns (url, note).

    With ``keep_kms`` an existing queue's own KMS key is kept when this run asks only for
    SQS-managed encryption, so re-running `queues create` never downgrades encryption.
    """
    kwargs: dict[str, Any] = {"QueueName": name, "Attributes": dict(attributes)}
    if tags:
        kwargs["tags"] = dict(tags)
    try:
        return (await sqs.create_queue(**kwargs))["QueueUrl"], ""
    except boto_exc.ClientError as exc:
        if "QueueAlreadyExists" not in _code(exc):
            raise
    # It exists with other attributes: bring them to what this config asks for.
    url = (await sqs.get_queue_url(QueueName=name))["QueueUrl"]
    current = (await sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"]))["Attributes"]
    wanted = dict(attributes)
    if keep_kms and current.get("KmsMasterKeyId"):
        for key in SSE_ATTRIBUTES:
            wanted.pop(key, None)
    changes = {k: v for k, v in wanted.items() if k != "FifoQueue" and not _same(k, current.get(k), v)}
    if changes:
        await sqs.set_queue_attributes(QueueUrl=url, Attributes=changes)
    shown = ", ".join(f"{k} {current.get(k)} -> {v}" for k, v in changes.items() if k != "RedrivePolicy")
    if "RedrivePolicy" in changes:
        shown = ", ".join(filter(None, [shown, "redrive policy"]))
    if keep_kms and current.get("KmsMasterKeyId") and "KmsMasterKeyId" not in changes:
        shown = ", ".join(filter(None, [shown, f"kept its KMS key {current['KmsMasterKeyId']}"]))
    return url, f" (existed; {'updated ' + shown if changes else shown or 'unchanged'})"


def sse_attributes(kms_key: str | None) -> dict[str, str]:
    """Queue attributes for server-side encryption: SQS-managed keys, or the KMS key."""
    if kms_key:
        return {"KmsMasterKeyId": kms_key, "SqsManagedSseEnabled": "false"}
    return {"SqsManagedSseEnabled": "true"}


async def provision(
    settings: SQSSettings,
    queues: Iterable[str],
    max_receive_count: int | None,
    *,
    kms_key: str | None = None,
    payload_expiry_days: int | None = None,
) -> list[str]:
    """Create the queues (and dead-letter queues, and the S3 bucket) a config names.

    Every queue is encrypted at rest (SQS-managed keys, or ``kms_key``); the bucket gets default
    encryption and a lifecycle rule expiring the offload prefix after ``payload_expiry_days``.
    Idempotent: existing queues are brought to these attributes. Returns one line per thing
    created or found, for the CLI to print.
    """
    key = kms_key_for(settings, kms_key)
    if payload_expiry_days is not None and payload_expiry_days < 1:
        raise ConfigError(
            f"--payload-expiry-days {payload_expiry_days} must be a whole number of days of at least 1; pass e.g. 7."
        )
    session = get_session()
    report: list[str] = []
    if key:
        report.append(await _check_key_usable(session, settings, key))
    sse = {k: v for k, v in sse_attributes(key).items() if k not in settings.queue_attributes}
    try:
        async with session.create_client("sqs", **client_kwargs(settings, session)) as sqs:
            for queue in dict.fromkeys([settings.default_queue, *queues]):
                name = settings.queue_name(queue)
                fifo = name.endswith(".fifo")
                # 1 MiB inline (SQS's maximum since August 2025; a queue created before keeps 256 KiB
                # until this sets it): only larger payloads go through S3. sqs-creation-attributes may
                # ask for less; the dead-letter queue always gets 1 MiB, so any message's copy fits.
                size = {"MaximumMessageSize": str(SQS_LARGEST_MESSAGE)}
                attributes = {"VisibilityTimeout": str(settings.visibility_timeout), **size, **sse}
                if fifo:
                    attributes["FifoQueue"] = "true"
                if max_receive_count:
                    dlq_name = dead_letter_name(name)
                    dlq_attrs = {**size, **sse, **({"FifoQueue": "true"} if fifo else {})}
                    dlq_url, note = await _ensure_queue(sqs, dlq_name, dlq_attrs, {}, keep_kms=not key)
                    dlq_arn = (await sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"]))[
                        "Attributes"
                    ]["QueueArn"]
                    attributes["RedrivePolicy"] = json.dumps(
                        {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(max_receive_count)}
                    )
                    report.append(f"dead-letter queue {dlq_name}: {dlq_url}{note}")
                attributes.update(settings.queue_attributes)
                url, note = await _ensure_queue(sqs, name, attributes, settings.queue_tags, keep_kms=not key)
                report.append(f"queue {queue} -> SQS {name}: {url}{note}")
    except boto_exc.ClientError as exc:
        raise _kms_rejected(exc, key, "SQS") or exc from None
    if key:
        report.append(f"encryption: KMS key {key} on every queue")
    elif any("kept its KMS key" in line for line in report):
        report.append(
            "encryption: SQS-managed keys (SSE-SQS), except queues that kept their KMS key (pass --kms-key to change it)"
        )
    else:
        report.append("encryption: SQS-managed keys (SSE-SQS) on every queue")
    if settings.s3_bucket:
        async with session.create_client("s3", **client_kwargs(settings, session)) as s3:
            try:
                await s3.head_bucket(Bucket=settings.s3_bucket)
            except boto_exc.ClientError:
                await s3.create_bucket(Bucket=settings.s3_bucket)
            report.append(f"bucket {settings.s3_bucket}")
            report.append(await _bucket_encryption(s3, settings.s3_bucket, key))
            report.append(await _payload_expiry(s3, settings, payload_expiry_days or DEFAULT_PAYLOAD_EXPIRY_DAYS))
        if kms_key and not settings.queue_attributes.get("KmsMasterKeyId"):
            report.append(
                f"note: the executor and workers do not see --kms-key, so they write offloaded payloads with "
                f"SSE-S3; add KmsMasterKeyId: {kms_key} under broker_transport_options.sqs-creation-attributes "
                "in the run config to write them with this key."
            )
    elif payload_expiry_days is not None:
        report.append(
            "note: --payload-expiry-days has nothing to apply to: no S3 bucket is configured (execution.config.backend)."
        )
    return report


async def _bucket_encryption(s3: Any, bucket: str, key: str | None) -> str:
    """Default encryption of the offload bucket: SSE-KMS with ``key``, else SSE-S3 (an existing KMS default is kept)."""
    try:
        rules = (await s3.get_bucket_encryption(Bucket=bucket))["ServerSideEncryptionConfiguration"]["Rules"]
        current = rules[0]["ApplyServerSideEncryptionByDefault"] if rules else {}
    except boto_exc.ClientError as exc:
        if "ServerSideEncryptionConfigurationNotFound" not in _code(exc):
            raise
        current = {}
    if key:
        wanted = {"SSEAlgorithm": "aws:kms", "KMSMasterKeyID": key}
    elif current.get("SSEAlgorithm", "").startswith("aws:kms"):
        return f"bucket {bucket}: default encryption kept ({current['SSEAlgorithm']}, key {current.get('KMSMasterKeyID', 'aws/s3')})"
    else:
        wanted = {"SSEAlgorithm": "AES256"}
    if all(current.get(k) == v for k, v in wanted.items()):
        return f"bucket {bucket}: default encryption {wanted['SSEAlgorithm']} (already set)"
    rule: dict[str, Any] = {"ApplyServerSideEncryptionByDefault": wanted}
    if key:
        rule["BucketKeyEnabled"] = True  # one data key per bucket key period, not one KMS call per object
    try:
        await s3.put_bucket_encryption(Bucket=bucket, ServerSideEncryptionConfiguration={"Rules": [rule]})
    except boto_exc.ClientError as exc:
        raise _kms_rejected(exc, key, "S3") or exc from None
    shown = f"SSE-KMS with {key}" if key else "SSE-S3 (AES256)"
    return f"bucket {bucket}: default encryption {shown}"


async def _payload_expiry(s3: Any, settings: SQSSettings, days: int) -> str:
    """Expire offloaded payloads after ``days``: those of dead-lettered or purged messages are never deleted otherwise.

    Other lifecycle rules on the bucket are kept; ours is replaced by its id.
    """
    bucket = settings.s3_bucket
    prefix = f"{settings.s3_prefix.strip('/')}/" if settings.s3_prefix.strip("/") else ""
    try:
        rules = (await s3.get_bucket_lifecycle_configuration(Bucket=bucket)).get("Rules", [])
    except boto_exc.ClientError as exc:
        if "NoSuchLifecycleConfiguration" not in _code(exc):
            raise
        rules = []
    ours = {"ID": LIFECYCLE_RULE_ID, "Status": "Enabled", "Filter": {"Prefix": prefix}, "Expiration": {"Days": days}}
    rules = [r for r in rules if r.get("ID") != LIFECYCLE_RULE_ID] + [ours]
    await s3.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration={"Rules": rules})
    where = (
        f"s3://{bucket}/{prefix}" if prefix else f"the whole bucket {bucket} (no prefix in execution.config.backend)"
    )
    return f"bucket {bucket}: offloaded payloads under {where} expire after {days} day(s)"


# --- queues stats ----------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSlots:
    name: str
    state: str
    concurrency: int
    running: int
    free: int


@dataclass
class QueueStats:
    """One queue's depth, dead-letter depth, consumers and the replicas its backlog calls for."""

    queue: str  # Celery name
    sqs_name: str
    url: str | None = None
    error: str | None = None  # the queue cannot be read (missing, refused)
    visible: int = 0
    in_flight: int = 0
    delayed: int = 0
    max_message_size: int | None = None  # bytes the queue accepts inline (MaximumMessageSize); larger goes through S3
    dead_letter_queue: str | None = None
    dead_letter_depth: int | None = None
    dead_letter_error: str | None = None
    workers: list[WorkerSlots] | None = None  # None: no registry (DAGSTER_HOME not set)
    target_backlog_per_worker: int = 1
    target_source: str = ""
    replicas_needed: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def free_slots(self) -> int | None:
        return None if self.workers is None else sum(w.free for w in self.workers)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["free_slots"] = self.free_slots
        out["live_workers"] = None if self.workers is None else len(self.workers)
        return out


def size_text(size: int | None) -> str:
    """A message size as `queues stats` shows it: 1 MiB, 256 KiB, 1000 B."""
    if size is None:
        return "?"
    for unit, factor in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= factor and size % factor == 0:
            return f"{size // factor} {unit}"
    return f"{size} B"


def replicas_needed(visible: int, in_flight: int, target: int) -> int:
    """Workers needed so that each holds at most ``target`` messages: ceil((visible + in_flight) / target)."""
    return math.ceil((visible + in_flight) / max(1, target))


async def queue_depths(settings: SQSSettings, queues: Sequence[str]) -> list[QueueStats]:
    """Visible / in flight / delayed messages of each queue and the depth of its dead-letter queue."""
    session = get_session()
    found: list[QueueStats] = []
    async with session.create_client("sqs", **client_kwargs(settings, session)) as sqs:
        for queue in dict.fromkeys(queues):
            stats = QueueStats(queue=queue, sqs_name=settings.queue_name(queue))
            found.append(stats)
            try:
                stats.url = (
                    settings.predefined_queues.get(queue)
                    or (await sqs.get_queue_url(QueueName=stats.sqs_name))["QueueUrl"]
                )
                attrs = (await sqs.get_queue_attributes(QueueUrl=stats.url, AttributeNames=["All"]))["Attributes"]
            except boto_exc.ClientError as exc:
                stats.error = _queue_error(exc, stats.sqs_name, settings)
                continue
            stats.visible = int(attrs.get("ApproximateNumberOfMessages", 0))
            stats.in_flight = int(attrs.get("ApproximateNumberOfMessagesNotVisible", 0))
            stats.delayed = int(attrs.get("ApproximateNumberOfMessagesDelayed", 0))
            stats.max_message_size = int(attrs.get("MaximumMessageSize", SQS_MIN_DEFAULT_SIZE))
            target_arn = _dead_letter_arn(attrs)
            if target_arn is None:
                continue
            stats.dead_letter_queue = target_arn.rsplit(":", 1)[-1]
            try:
                dlq_url = await _url_for_arn(sqs, target_arn)
                dlq = await sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["ApproximateNumberOfMessages"])
                stats.dead_letter_depth = int(dlq["Attributes"].get("ApproximateNumberOfMessages", 0))
            except boto_exc.ClientError as exc:
                stats.dead_letter_error = _queue_error(exc, stats.dead_letter_queue, settings)
    return found


def add_workers(
    stats: Sequence[QueueStats],
    workers: Sequence[Any] | None,
    *,
    prefetch_multiplier: int,
    config_concurrency: int | None,
    target: int | None,
) -> None:
    """Fill in each queue's live workers, free slots and replicas needed.

    ``workers`` are registry records (None when there is no registry). The target backlog per
    worker is ``target`` if given, else a worker's concurrency x prefetch: the most messages one
    worker holds, so a backlog above it waits for a worker. The concurrency is the smallest of the
    live workers' on that queue, else the config's worker_concurrency, else 1.
    """
    for item in stats:
        live = None
        if workers is not None:
            live = [
                WorkerSlots(
                    name=w.name,
                    state=w.state,
                    concurrency=w.concurrency,
                    running=len(w.running),
                    # A stopping worker takes no new messages.
                    free=max(0, w.concurrency - len(w.running)) if w.state == "running" else 0,
                )
                for w in workers
                if item.queue in w.queues and w.looks_alive()
            ]
        item.workers = live
        if target:
            item.target_backlog_per_worker, item.target_source = target, "--target-backlog-per-worker"
        else:
            if live:
                concurrency, source = min(w.concurrency for w in live), "smallest live worker's"
            elif config_concurrency:
                concurrency, source = config_concurrency, "worker_concurrency"
            else:
                concurrency, source = 1, "no live worker or worker_concurrency"
            item.target_backlog_per_worker = concurrency * prefetch_multiplier
            item.target_source = f"concurrency {concurrency} ({source}) x prefetch {prefetch_multiplier}"
        item.replicas_needed = replicas_needed(item.visible, item.in_flight, item.target_backlog_per_worker)


def _dead_letter_arn(attrs: Mapping[str, str]) -> str | None:
    raw = attrs.get("RedrivePolicy")
    if not raw:
        return None
    try:
        return str(json.loads(raw)["deadLetterTargetArn"])
    except (ValueError, KeyError, TypeError):
        return None


async def _url_for_arn(sqs: Any, arn: str) -> str:
    parts = arn.split(":")
    return (await sqs.get_queue_url(QueueName=parts[5], QueueOwnerAWSAccountId=parts[4]))["QueueUrl"]


def _queue_error(exc: boto_exc.ClientError, name: str, settings: SQSSettings) -> str:
    code = _code(exc)
    if "NonExistentQueue" in code or code == "QueueDoesNotExist":
        return f"SQS queue {name!r} does not exist at {settings.describe_endpoint()}; {QUEUE_CREATE_HINT}"
    return f"reading SQS queue {name!r} failed ({code}: {_message(exc)})"


# --- queues redrive --------------------------------------------------------------------------


@dataclass(frozen=True)
class RedriveResult:
    queue: str
    dead_letter_queue: str
    moved: int
    failed: int
    left: int  # messages still in the dead-letter queue (approximate)


def _sendable_attributes(attributes: Mapping[str, Any]) -> dict[str, Any]:
    """Message attributes as SendMessage takes them (receive adds empty list fields)."""
    out = {}
    for name, value in attributes.items():
        kept = {k: value[k] for k in ("DataType", "StringValue", "BinaryValue") if k in value}
        if "DataType" in kept:
            out[name] = kept
    return out


async def redrive(
    settings: SQSSettings, queue: str, max_messages: int | None = None, *, visibility: int = 60
) -> RedriveResult:
    """Move messages from ``queue``'s dead-letter queue back to ``queue``.

    SQS's StartMessageMoveTask would do this server-side, but the local endpoint (moto) does not
    implement it, so this receives from the dead-letter queue, sends each message to the source
    queue with its body and message attributes (FIFO: its group id, and a deduplication id derived
    from the dead-letter message's id), and deletes it from the dead-letter queue only once the
    send succeeded: a crash in between leaves a duplicate, which workers drop as already run,
    never a loss. Without ``max_messages`` it moves what the dead-letter queue held when it started.
    """
    sqs_name = settings.queue_name(queue)
    session = get_session()
    async with session.create_client("sqs", **client_kwargs(settings, session)) as sqs:
        try:
            url = settings.predefined_queues.get(queue) or (await sqs.get_queue_url(QueueName=sqs_name))["QueueUrl"]
            attrs = (await sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["RedrivePolicy"])).get(
                "Attributes", {}
            )
        except boto_exc.ClientError as exc:
            if "NonExistentQueue" in _code(exc) or _code(exc) == "QueueDoesNotExist":
                raise QueueMissingError(
                    f"SQS queue {sqs_name!r} does not exist at {settings.describe_endpoint()}; check the queue name "
                    "(`dagster-taskiq-sync queues stats` lists the config's queues) and the run config's queue_name_prefix."
                ) from None
            raise
        target_arn = _dead_letter_arn(attrs)
        if target_arn is None:
            raise ConfigError(
                f"SQS queue {sqs_name!r} has no dead-letter queue (no RedrivePolicy), so there is nothing to redrive; "
                f"give it one with `dagster-taskiq-sync queues create -y RUN_CONFIG.yaml -q {queue}` (without --no-dead-letter)."
            )
        dlq_name = target_arn.rsplit(":", 1)[-1]
        try:
            dlq_url = await _url_for_arn(sqs, target_arn)
        except boto_exc.ClientError:
            raise QueueMissingError(
                f"the dead-letter queue {dlq_name!r} of SQS queue {sqs_name!r} does not exist; "
                f"recreate it with `dagster-taskiq-sync queues create -y RUN_CONFIG.yaml -q {queue}`."
            ) from None
        depth = await _depth(sqs, dlq_url)
        limit = depth if max_messages is None else max_messages
        fifo = sqs_name.endswith(".fifo")
        moved = failed = 0
        while moved + failed < limit:
            received = (
                await sqs.receive_message(
                    QueueUrl=dlq_url,
                    MaxNumberOfMessages=max(1, min(10, limit - moved - failed)),
                    WaitTimeSeconds=1,
                    VisibilityTimeout=visibility,
                    MessageAttributeNames=["All"],
                    MessageSystemAttributeNames=["MessageGroupId"],
                )
            ).get("Messages", [])
            if not received:
                break
            entries = []
            for i, message in enumerate(received):
                entry: dict[str, Any] = {"Id": str(i), "MessageBody": message["Body"]}
                attributes = _sendable_attributes(message.get("MessageAttributes", {}))
                if attributes:
                    entry["MessageAttributes"] = attributes
                if fifo:
                    entry["MessageGroupId"] = message.get("Attributes", {}).get("MessageGroupId", "redrive")
                    # The original id would be deduplicated (and dropped) within SQS's 5-minute window.
                    entry["MessageDeduplicationId"] = f"redrive-{message['MessageId']}"[:128]
                entries.append(entry)
            answer = await sqs.send_message_batch(QueueUrl=url, Entries=entries)
            sent = [received[int(ok["Id"])] for ok in answer.get("Successful", [])]
            failed += len(answer.get("Failed", []))
            if sent:
                await sqs.delete_message_batch(
                    QueueUrl=dlq_url,
                    Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(sent)],
                )
            moved += len(sent)
        left = await _depth(sqs, dlq_url)
    if failed:
        raise BrokerError(
            f"moved {moved} message(s) from {dlq_name!r} back to {sqs_name!r}, but SQS refused {failed}; they stay "
            f"in {dlq_name!r} (visible again after {visibility} s): run `dagster-taskiq-sync queues redrive {queue}` again."
        )
    return RedriveResult(queue=sqs_name, dead_letter_queue=dlq_name, moved=moved, failed=failed, left=left)


async def _depth(sqs: Any, url: str) -> int:
    attrs = (await sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"]))["Attributes"]
    return int(attrs.get("ApproximateNumberOfMessages", 0))
