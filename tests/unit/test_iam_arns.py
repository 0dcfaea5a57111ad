"""What `iam-policy` writes into ARNs: only names the configuration really has, never wildcards."""

from __future__ import annotations

import pytest

from dagster_taskiq_sync.errors import ConfigError
from dagster_taskiq_sync.ops.iam import payload_objects_arn, queue_arn


def test_queue_and_object_arns_are_literal():
    assert queue_arn("aws", "us-east-1", "123456789012", "dagster") == "arn:aws:sqs:us-east-1:123456789012:dagster"
    assert queue_arn("aws", "us-east-1", "123456789012", "steps.fifo").endswith(":steps.fifo")
    assert payload_objects_arn("aws", "bucket", "/steps/") == "arn:aws:s3:::bucket/steps/*"


@pytest.mark.parametrize("name", ["*", "prod-*", "q?", "a/b", "x" * 81, ""])
def test_a_queue_name_sqs_could_not_have_is_refused(name):
    with pytest.raises(ConfigError, match=r"is not a name SQS allows .*iam-policy"):
        queue_arn("aws", "us-east-1", "123456789012", name)


@pytest.mark.parametrize(("bucket", "prefix"), [("bucket", "steps/*"), ("bucket", "st?ps"), ("bu*", "steps")])
def test_a_wildcard_in_the_backend_is_refused(bucket, prefix):
    with pytest.raises(ConfigError, match=r"execution.config.backend's .* holds '\*' or '\?'"):
        payload_objects_arn("aws", bucket, prefix)
