"""moto's server, with its SQS authorization brought in line with AWS for the IAM tests.

Run as ``python -m tests.moto_iam_server -H HOST -p PORT`` (the arguments of ``moto.server``).
moto 5 checks SQS calls against IAM policies, with two differences from AWS that would make a
correct least-privilege policy fail (tests/e2e/test_iam.py):

- ``GetQueueUrl`` is checked against resource ``*``: moto looks the queue up from ``QueueUrl``,
  which that call does not have. AWS checks it against the queue's ARN (from ``QueueName``).
- The batch calls are checked as ``sqs:SendMessageBatch``, ``sqs:DeleteMessageBatch`` and
  ``sqs:ChangeMessageVisibilityBatch``, which are not IAM actions: AWS authorizes them with
  ``sqs:SendMessage``, ``sqs:DeleteMessage`` and ``sqs:ChangeMessageVisibility``.

Nothing else is changed; S3, STS and IAM are moto's own.
"""

from __future__ import annotations

from moto.iam.access_control import IAMRequest
from moto.sqs.exceptions import QueueDoesNotExist
from moto.sqs.responses import SQSResponse

BATCH_ACTIONS = {
    "sqs:SendMessageBatch": "sqs:SendMessage",
    "sqs:DeleteMessageBatch": "sqs:DeleteMessage",
    "sqs:ChangeMessageVisibilityBatch": "sqs:ChangeMessageVisibility",
}


class SQSIAMRequest(IAMRequest):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._action = BATCH_ACTIONS.get(self._action, self._action)


_moto_determine_resource = SQSResponse._determine_resource


def _determine_resource(self) -> str:
    if self._get_action() == "GetQueueUrl":
        try:
            return self.sqs_backend.get_queue(self._get_param("QueueName")).queue_arn
        except QueueDoesNotExist:
            return "*"
    return _moto_determine_resource(self)


def _authorize(self, resource: str = "*") -> None:
    self._authenticate_and_authorize_action(SQSIAMRequest, resource)


SQSResponse._determine_resource = _determine_resource
SQSResponse._authenticate_and_authorize_normal_action = _authorize

if __name__ == "__main__":
    from moto.server import main

    main()
