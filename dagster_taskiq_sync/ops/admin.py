"""Who creates the queues: `queues create` (queues, dead-letter queues, encryption, the payload
bucket's encryption and expiry), and how the operator modules read an AWS error.

Everything here is run by an operator from the CLI, never by the executor or the workers, whose
IAM policies (``iam.py``) therefore need none of these calls. Reading the queues' depths is
``queue_depths``; moving dead letters back is ``redrive``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from aiobotocore.session import get_session
from botocore import exceptions as boto_exc

from dagster_taskiq_sync.errors import ConfigError
from dagster_taskiq_sync.ops.iam import KMS_KEY_FORMS, check_kms_key, dead_letter_name, is_aws_managed_alias
from dagster_taskiq_sync.wire.aws import client_kwargs, for_service
from dagster_taskiq_sync.wire.broker import SQS_LARGEST_MESSAGE
from dagster_taskiq_sync.wire.settings import SQSSettings

DEFAULT_PAYLOAD_EXPIRY_DAYS = 7
LIFECYCLE_RULE_ID = "dagster-taskiq-sync-payload-expiry"
SSE_ATTRIBUTES = ("KmsMasterKeyId", "SqsManagedSseEnabled", "KmsDataKeyReusePeriodSeconds")


def error_code(exc: boto_exc.ClientError) -> str:
    """The error code SQS, S3 or KMS answered with ("" when it gave none)."""
    return str(exc.response.get("Error", {}).get("Code", ""))


def error_message(exc: boto_exc.ClientError) -> str:
    """The sentence SQS, S3 or KMS answered with ("" when it gave none)."""
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
        if error_code(exc) in ("AccessDenied", "AccessDeniedException"):
            return f"KMS key {key}: not checked (no kms:DescribeKey permission)"
        raise ConfigError(
            f"--kms-key {key!r} is not usable at {settings.describe_endpoint()} ({error_code(exc)}: {error_message(exc)}); "
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
    code, message = error_code(exc), error_message(exc)
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
        if "QueueAlreadyExists" not in error_code(exc):
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
        if "ServerSideEncryptionConfigurationNotFound" not in error_code(exc):
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
        if "NoSuchLifecycleConfiguration" not in error_code(exc):
            raise
        rules = []
    ours = {"ID": LIFECYCLE_RULE_ID, "Status": "Enabled", "Filter": {"Prefix": prefix}, "Expiration": {"Days": days}}
    rules = [r for r in rules if r.get("ID") != LIFECYCLE_RULE_ID] + [ours]
    await s3.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration={"Rules": rules})
    where = (
        f"s3://{bucket}/{prefix}" if prefix else f"the whole bucket {bucket} (no prefix in execution.config.backend)"
    )
    return f"bucket {bucket}: offloaded payloads under {where} expire after {days} day(s)"
