"""Who administers the queues: `queues create` (provisioning).

Everything here is run by an operator from the CLI, never by the executor or the workers, whose
IAM policies (``iam.py``) therefore need none of these calls.
"""

from __future__ import annotations

import json
from typing import Any, Iterable

from aiobotocore.session import get_session
from botocore import exceptions as boto_exc

from .broker import client_kwargs
from .settings import SQSSettings


async def provision(settings: SQSSettings, queues: Iterable[str], max_receive_count: int | None) -> list[str]:
    """Create the queues (and dead-letter queues, and the S3 bucket) a config names.

    Idempotent: existing queues with the same attributes are left as they are. Returns one
    line per thing created or found, for the CLI to print.
    """
    session = get_session()
    report: list[str] = []
    async with session.create_client("sqs", **client_kwargs(settings, session)) as sqs:
        for queue in dict.fromkeys([settings.default_queue, *queues]):
            name = settings.queue_name(queue)
            fifo = name.endswith(".fifo")
            attributes = {"VisibilityTimeout": str(settings.visibility_timeout)}
            if fifo:
                attributes["FifoQueue"] = "true"
            if max_receive_count:
                dlq_name = (name[: -len(".fifo")] + "-dlq.fifo") if fifo else name + "-dlq"
                dlq_attrs = {"FifoQueue": "true"} if fifo else {}
                dlq_url = (await sqs.create_queue(QueueName=dlq_name, Attributes=dlq_attrs))["QueueUrl"]
                dlq_arn = (await sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"]))[
                    "Attributes"
                ]["QueueArn"]
                attributes["RedrivePolicy"] = json.dumps(
                    {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(max_receive_count)}
                )
                report.append(f"dead-letter queue {dlq_name}: {dlq_url}")
            attributes.update(settings.queue_attributes)
            kwargs: dict[str, Any] = {"QueueName": name, "Attributes": attributes}
            if settings.queue_tags:
                kwargs["tags"] = dict(settings.queue_tags)
            try:
                url = (await sqs.create_queue(**kwargs))["QueueUrl"]
                report.append(f"queue {queue} -> SQS {name}: {url}")
            except boto_exc.ClientError as exc:
                if "QueueAlreadyExists" not in exc.response.get("Error", {}).get("Code", ""):
                    raise
                # It exists with other attributes: bring them to what this config asks for.
                url = (await sqs.get_queue_url(QueueName=name))["QueueUrl"]
                current = (await sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"]))["Attributes"]
                changes = {k: v for k, v in attributes.items() if k != "FifoQueue" and current.get(k) != v}
                await sqs.set_queue_attributes(QueueUrl=url, Attributes=changes)
                shown = ", ".join(f"{k} {current.get(k)} -> {v}" for k, v in changes.items() if k != "RedrivePolicy")
                report.append(f"queue {queue} -> SQS {name}: {url} (existed; updated {shown or 'redrive policy'})")
    if settings.s3_bucket:
        async with session.create_client("s3", **client_kwargs(settings, session)) as s3:
            try:
                await s3.head_bucket(Bucket=settings.s3_bucket)
            except boto_exc.ClientError:
                await s3.create_bucket(Bucket=settings.s3_bucket)
            report.append(f"bucket {settings.s3_bucket}")
    return report


