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
    """SQS or S3 answered with an error we do not handle more specifically.

    ``code`` is AWS's error code (``SlowDown``, ``NoSuchKey``) and ``http_status`` the HTTP status
    of the answer, when the error came from one: decisions (is it worth retrying?) read those,
    never the message text, which can hold names an attacker chose (an S3 key, a queue name).
    """

    def __init__(self, message: str, *, code: str | None = None, http_status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.http_status = http_status


class BridgeStoppedError(TaskiqSyncError):
    """A call was made through the async bridge after it was stopped."""


class UnsupportedVersionError(TaskiqSyncError, ImportError):
    """The installed dagster or taskiq is outside the range this release supports."""
