"""Who may do what: the least-privilege IAM policy of each runtime role.

``dagster-taskiq-sync iam-policy`` prints the policy a principal needs for the queues, dead-letter
queues and S3 offload prefix a run config names. Each action below is here because a call in this
package makes it (tests/e2e/test_iam.py proves, against a local endpoint enforcing IAM, that a principal
holding exactly this policy can make every call its role makes, and that removing any one action
breaks one of them):

orchestrator (the run's ``taskiq_executor``), launcher (``TaskiqRunLauncher`` on the run queues)
    ``sqs:GetQueueUrl`` and ``sqs:GetQueueAttributes`` (``MaximumMessageSize``) when the broker
    starts, ``sqs:SendMessage`` per step or run (``SendMessageBatch`` is authorized by the same
    action); with an S3 backend ``s3:PutObject`` for payloads larger than the queue accepts.
    Nothing on the dead-letter queues: a sender's start looks its dead-letter queue up
    (``GetQueueUrl``) but only workers use it, and a refusal there is logged and ignored. Senders
    delete nothing in S3: a payload whose message could not be sent is left to the bucket's
    expiry rule (``queues create --payload-expiry-days``).
worker
    ``sqs:GetQueueUrl``, ``sqs:GetQueueAttributes`` (``MaximumMessageSize``, ``RedrivePolicy``),
    ``sqs:ReceiveMessage``, ``sqs:DeleteMessage`` (``DeleteMessageBatch`` too),
    ``sqs:ChangeMessageVisibility`` (heartbeat, release) on its queues; ``sqs:GetQueueUrl`` (at
    start, from the queue's ``RedrivePolicy``) and ``sqs:SendMessage`` on their dead-letter queues
    (a message that can never run is moved there at once; without ``GetQueueUrl`` the worker
    finds no dead-letter queue and deletes such a message instead); ``s3:GetObject`` and
    ``s3:DeleteObject`` on the offload prefix (payloads are read, and deleted with their
    messages). A worker serving ``TaskiqRunLauncher`` runs whose steps it sends needs the
    orchestrator's statements too (``--role worker --role orchestrator``).
KMS (``--kms-key``, or ``KmsMasterKeyId`` in ``sqs-creation-attributes``)
    senders need ``kms:GenerateDataKey`` and ``kms:Decrypt`` (AWS requires both to send to an
    SSE-KMS queue; S3 needs ``GenerateDataKey`` to write an SSE-KMS object), receivers
    ``kms:Decrypt``; a worker also sends to its dead-letter queue, so it gets both.

``queues create``, ``queues stats`` and ``queues redrive`` are operator commands and are not part
of any runtime role.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dagster_taskiq_sync.errors import ConfigError

ROLES = ("orchestrator", "worker", "launcher")
SENDER_SQS = ("sqs:GetQueueAttributes", "sqs:GetQueueUrl", "sqs:SendMessage")
SENDER_S3 = ("s3:PutObject",)
WORKER_SQS = (
    "sqs:ChangeMessageVisibility",
    "sqs:DeleteMessage",
    "sqs:GetQueueAttributes",
    "sqs:GetQueueUrl",
    "sqs:ReceiveMessage",
)
WORKER_DLQ = ("sqs:GetQueueUrl", "sqs:SendMessage")
WORKER_S3 = ("s3:DeleteObject", "s3:GetObject")
KMS_SEND = ("kms:Decrypt", "kms:GenerateDataKey")
KMS_RECEIVE = ("kms:Decrypt",)

_KEY_ID = re.compile(
    r"^(mrk-[0-9a-f]{32}|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})$"
)
_ALIAS = re.compile(r"^alias/[a-zA-Z0-9/_-]{1,250}$")
_KEY_ARN = re.compile(r"^arn:aws[a-z-]*:kms:[a-z0-9-]+:\d{12}:(key/[a-zA-Z0-9-]+|alias/[a-zA-Z0-9/_-]+)$")
_ACCOUNT = re.compile(r"^\d{12}$")
KMS_KEY_FORMS = "a key id (1234abcd-...), a key ARN (arn:aws:kms:REGION:ACCOUNT:key/ID) or an alias (alias/NAME)"


def check_kms_key(value: str, setting: str = "--kms-key") -> str:
    """``value`` if it has the shape of a KMS key id, key ARN, alias or alias ARN."""
    value = (value or "").strip()
    if not (_KEY_ID.fullmatch(value) or _ALIAS.fullmatch(value) or _KEY_ARN.fullmatch(value)):
        raise ConfigError(f"{setting} {value!r} is not a KMS key; pass {KMS_KEY_FORMS}.")
    return value


def is_alias(key: str) -> bool:
    return key.startswith("alias/") or ":alias/" in key


def is_aws_managed_alias(key: str) -> bool:
    """alias/aws/sqs, alias/aws/s3: AWS creates these keys on first use, so they cannot be looked up before."""
    return key.startswith("alias/aws/") or ":alias/aws/" in key


def partition_of(region: str) -> str:
    if region.startswith("cn-"):
        return "aws-cn"
    if region.startswith("us-gov-"):
        return "aws-us-gov"
    return "aws"


def check_account_id(value: str) -> str:
    if not _ACCOUNT.fullmatch(value or ""):
        raise ConfigError(
            f"--account-id {value!r} is not an AWS account id; pass the 12 digits of the account that owns the queues."
        )
    return value


def dead_letter_name(sqs_name: str) -> str:
    """The dead-letter queue `queues create` makes for an SQS queue: NAME-dlq (NAME-dlq.fifo)."""
    if sqs_name.endswith(".fifo"):
        return sqs_name[: -len(".fifo")] + "-dlq.fifo"
    return sqs_name + "-dlq"


@dataclass(frozen=True)
class Resources:
    """The ARNs a policy is about."""

    queues: tuple[str, ...]
    dead_letter_queues: tuple[str, ...]
    payload_objects: str | None  # arn:aws:s3:::BUCKET/PREFIX/* (None: no S3 backend)
    kms_key: str | None  # key ARN (None: no KMS)


_SQS_NAME = re.compile(r"[A-Za-z0-9_-]{1,75}(\.fifo)?|[A-Za-z0-9_-]{1,80}")
_WILDCARDS = ("*", "?")  # what IAM matches in a resource ARN


def queue_arn(partition: str, region: str, account: str, name: str) -> str:
    """The queue's ARN; a name SQS could not have (a wildcard, a '/') is refused: in an ARN it
    would grant more queues than the configuration names."""
    if not _SQS_NAME.fullmatch(name):
        raise ConfigError(
            f"SQS queue name {name[:100]!r} (from the configuration's queues or predefined_queues URLs) is not a "
            "name SQS allows (letters, digits, '-', '_', optional '.fifo'); fix it, as iam-policy would otherwise "
            "write it into an ARN."
        )
    return f"arn:{partition}:sqs:{region}:{account}:{name}"


def payload_objects_arn(partition: str, bucket: str, prefix: str) -> str:
    prefix = prefix.strip("/")
    for what, value in (("bucket", bucket), ("prefix", prefix)):
        if any(c in value for c in _WILDCARDS):
            raise ConfigError(
                f"execution.config.backend's {what} {value[:100]!r} holds '*' or '?', which IAM reads as a "
                "wildcard: the policy would reach other objects; use a literal s3://BUCKET/PREFIX."
            )
    return f"arn:{partition}:s3:::{bucket}/{prefix}/*" if prefix else f"arn:{partition}:s3:::{bucket}/*"


def kms_key_arn(key: str, partition: str, region: str, account: str) -> str | None:
    """The key ARN for a key id or key ARN; None for an alias (it must be looked up)."""
    if key.startswith("arn:"):
        return None if ":alias/" in key else key
    if is_alias(key):
        return None
    return f"arn:{partition}:kms:{region}:{account}:key/{key}"


def statements(role: str, resources: Resources) -> list[dict[str, Any]]:
    """The statements one role needs (Sid, actions, resources), in a stable order."""
    if role not in ROLES:
        raise ConfigError(f"--role {role!r} is not a role; use one of {', '.join(ROLES)}.")
    title = role.capitalize()
    found: list[dict[str, Any]] = []

    def add(sid: str, actions: Sequence[str], resource: Sequence[str] | str | None) -> None:
        if not resource:
            return
        found.append({"Sid": sid, "Effect": "Allow", "Action": sorted(actions), "Resource": resource})

    if role in ("orchestrator", "launcher"):
        add(f"{title}SendMessages", SENDER_SQS, list(resources.queues))
        add(f"{title}OffloadPayloads", SENDER_S3, resources.payload_objects)
        add(f"{title}EncryptWithKey", KMS_SEND, resources.kms_key)
    else:
        add("WorkerReceiveMessages", WORKER_SQS, list(resources.queues))
        add("WorkerDeadLetter", WORKER_DLQ, list(resources.dead_letter_queues))
        add("WorkerReadPayloads", WORKER_S3, resources.payload_objects)
        add("WorkerDecryptWithKey", KMS_SEND if resources.dead_letter_queues else KMS_RECEIVE, resources.kms_key)
    return found


def policy(roles: Iterable[str], resources: Resources) -> dict[str, Any]:
    """One policy document for the union of ``roles``; statements on the same resources merge."""
    merged: dict[str, dict[str, Any]] = {}
    for role in dict.fromkeys(roles):
        for statement in statements(role, resources):
            key = json.dumps(statement["Resource"], sort_keys=True)
            if key in merged:
                existing = merged[key]
                existing["Action"] = sorted(set(existing["Action"]) | set(statement["Action"]))
                if statement["Sid"] not in existing["Sid"]:
                    existing["Sid"] += "And" + statement["Sid"]
            else:
                merged[key] = dict(statement)
    return {"Version": "2012-10-17", "Statement": list(merged.values())}


def actions_of(document: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(Sid, action) for every action of a policy: what the minimality test removes one at a time."""
    return [(s["Sid"], a) for s in document["Statement"] for a in s["Action"]]


def without_action(document: Mapping[str, Any], sid: str, action: str) -> dict[str, Any]:
    """A copy of ``document`` with one action removed from one statement."""
    out = []
    for statement in document["Statement"]:
        statement = dict(statement)
        if statement["Sid"] == sid:
            statement["Action"] = [a for a in statement["Action"] if a != action]
        if statement["Action"]:
            out.append(statement)
    return {"Version": document["Version"], "Statement": out}


async def resolve_resources(
    settings: Any,
    queues: Iterable[str],
    *,
    account_id: str | None = None,
    kms_key: str | None = None,
    dead_letter: bool = True,
) -> Resources:
    """The ARNs for a config's queues (Celery names), dead-letter queues, offload prefix and key.

    The account comes from ``account_id``, else from the predefined queue URLs, else from STS
    GetCallerIdentity with the configured credentials; an alias is looked up with KMS DescribeKey.
    """
    from aiobotocore.session import get_session

    from dagster_taskiq_sync.wire.aws import client_kwargs, for_service

    session = get_session()
    region = settings.region or session.get_config_variable("region")
    if not region:
        raise ConfigError(
            "no AWS region is set; set config_source.broker_transport_options.region or AWS_DEFAULT_REGION."
        )
    partition = partition_of(region)
    names = [settings.queue_name(q) for q in dict.fromkeys([settings.default_queue, *queues])]
    owners: dict[str, str] = {}
    for celery_name, url in settings.predefined_queues.items():
        parts = url.rstrip("/").split("/")
        if len(parts) >= 2 and _ACCOUNT.fullmatch(parts[-2]):
            owners[settings.queue_name(celery_name)] = parts[-2]
    account = check_account_id(account_id) if account_id else None
    if account is None and not all(n in owners for n in names):
        try:
            async with session.create_client("sts", **for_service(client_kwargs(settings, session))) as sts:
                account = (await sts.get_caller_identity())["Account"]
        except Exception as exc:  # noqa: BLE001 - any failure has the same fix
            raise ConfigError(
                f"could not find the AWS account that owns the queues (STS GetCallerIdentity failed: {exc}); "
                "pass --account-id ACCOUNT."
            ) from None
    arns = [queue_arn(partition, region, owners.get(n, account or ""), n) for n in names]
    dlqs = (
        [queue_arn(partition, region, owners.get(n, account or ""), dead_letter_name(n)) for n in names]
        if dead_letter
        else []
    )
    objects = payload_objects_arn(partition, settings.s3_bucket, settings.s3_prefix) if settings.s3_bucket else None
    key_arn = None
    if kms_key:
        key_arn = kms_key_arn(check_kms_key(kms_key), partition, region, account or next(iter(owners.values()), ""))
        if key_arn is None:
            try:
                async with session.create_client("kms", **for_service(client_kwargs(settings, session))) as kms:
                    key_arn = (await kms.describe_key(KeyId=kms_key))["KeyMetadata"]["Arn"]
            except Exception as exc:  # noqa: BLE001 - any failure has the same fix
                raise ConfigError(
                    f"--kms-key {kms_key!r} is an alias and looking it up failed ({exc}); pass the key's ARN instead."
                ) from None
    return Resources(tuple(arns), tuple(dlqs), objects, key_arn)
