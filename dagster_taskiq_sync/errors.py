"""The project's own small exception types.

Vendor errors (botocore, aiobotocore, taskiq-aio-sqs) are translated into these at the edge
(``wire/broker_client.py``, ``wire/aws.py``, ``ops/admin.py``) so that what a user reads is one sentence naming the setting and the fix.
"""


class TaskiqSyncError(Exception):
    """Base class: every error this package raises on purpose."""


class ConfigError(TaskiqSyncError):
    """A configuration value (executor YAML, CLI flag, environment) cannot be used."""


class PayloadTooLargeError(ConfigError):
    """A step message is larger than its queue accepts and no S3 bucket is configured."""


class QueueMissingError(TaskiqSyncError):
    """An SQS queue named by the configuration does not exist."""


class EndpointUnreachableError(TaskiqSyncError):
    """The SQS/S3 endpoint could not be reached (connection refused, DNS, timeout)."""


class BrokerError(TaskiqSyncError):
    """SQS answered with an error we do not handle more specifically."""


class BridgeStoppedError(TaskiqSyncError):
    """A call was made through the async bridge after it was stopped."""


class UnsupportedVersionError(TaskiqSyncError, ImportError):
    """The installed dagster or taskiq is outside the range this release supports."""
