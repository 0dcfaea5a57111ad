"""Least-privilege IAM and STS role credentials, proven on a local endpoint that enforces IAM.

A separate moto server runs with ``INITIAL_NO_AUTH_ACTION_COUNT=3``: its first three requests
create an administrator (user, access key, allow-all policy); every later request is signed and
checked against IAM policies. ``tests/moto_iam_server.py`` aligns two details of moto's SQS
authorization with AWS (GetQueueUrl's resource, batch actions) and documents them.

For each role, a principal holding exactly the policy ``dagster-taskiq-sync iam-policy`` prints
makes every call of that role through this package's own code with real encoded messages
(``BrokerClient`` start, send / send_many with S3 offload for a sender; receive, fetch_payload,
change_visibility, delete_many with the payload pointer and dead_letter for a worker), and removing
any one action of the policy makes the call that needs it fail. KMS permissions are printed but not proven here: moto does not call
KMS when it encrypts SQS messages or S3 objects.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

import boto3
import pytest
import yaml
from botocore.exceptions import ClientError

from dagster_taskiq_sync._dagster.names import KnownExecutionState, serialize_value
from dagster_taskiq_sync.config.celery_compat import settings_from_executor_config
from dagster_taskiq_sync.ops import iam
from dagster_taskiq_sync.ops.local_endpoint import LocalEndpoint
from dagster_taskiq_sync.storage.run_report import step_reports
from dagster_taskiq_sync.wire.aws import RoleCredentials, refresh_windows
from dagster_taskiq_sync.wire.bridge import Bridge
from dagster_taskiq_sync.wire.broker_client import BrokerClient
from dagster_taskiq_sync.wire.deliveries import DEAD_LETTER_REASON_ATTRIBUTE, Delivery, Outgoing
from dagster_taskiq_sync.wire.messages import MalformedMessage, RunMessage, StepMessage, TaskKind, encode
from dagster_taskiq_sync.wire.payloads import check_payload, decode_pointer

from ..helpers import CLI, WorkerProcess, run_cli, wait_for

ROOT = Path(__file__).resolve().parents[2]
ACCOUNT = "123456789012"  # moto's
BUCKET, PREFIX = "iam-payloads", "offload"
STEPS, RUNS = "steps", "runs"
ALLOW_ALL = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}


@dataclass(frozen=True)
class Creds:
    key: str
    secret: str

    def env(self) -> dict[str, str]:
        return os.environ | {
            "AWS_ACCESS_KEY_ID": self.key,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_DEFAULT_REGION": "us-east-1",
        }


@dataclass
class Enforcing:
    endpoint: LocalEndpoint
    admin: Creds
    config_dir: Path

    def client(self, service: str, creds: Creds | None = None):
        creds = creds or self.admin
        return boto3.client(
            service,
            endpoint_url=self.endpoint.url,
            region_name="us-east-1",
            aws_access_key_id=creds.key,
            aws_secret_access_key=creds.secret,
        )

    def block(self, default_queue: str = STEPS, **transport) -> dict:
        return {
            "broker": self.endpoint.broker_url,
            "backend": f"s3://{BUCKET}/{PREFIX}",
            "config_source": {
                "task_default_queue": default_queue,
                "broker_transport_options": {
                    "region": "us-east-1",
                    "wait_time_seconds": 1,
                    # a 4 KB message goes through the S3 offload path, a small one does not
                    "sqs-creation-attributes": {"MaximumMessageSize": "2048"},
                    **transport,
                },
            },
        }

    def config(self, default_queue: str = STEPS, **transport) -> str:
        path = self.config_dir / f"{default_queue}-{uuid.uuid4().hex[:6]}.yaml"
        path.write_text(yaml.safe_dump({"execution": {"config": self.block(default_queue, **transport)}}))
        return str(path)

    def user(self, name: str, document: dict) -> Creds:
        """A user holding exactly ``document`` (created once, its policy replaced on later calls)."""
        client = self.client("iam")
        try:
            client.create_user(UserName=name)
            new = client.create_access_key(UserName=name)["AccessKey"]
            self._keys[name] = Creds(new["AccessKeyId"], new["SecretAccessKey"])
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "EntityAlreadyExists":
                raise
        client.put_user_policy(UserName=name, PolicyName="only", PolicyDocument=json.dumps(document))
        return self._keys[name]

    _keys: dict = field(default_factory=dict)
    # `iam-policy`'s answer per (roles, default queue): the config does not change within the module
    policies: dict = field(default_factory=dict)


@pytest.fixture(scope="module")
def enforcing(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("iam-endpoint")
    endpoint = LocalEndpoint(
        log_path=str(log_dir / "moto.log"),
        env={"INITIAL_NO_AUTH_ACTION_COUNT": "3", "PYTHONPATH": str(ROOT)},
        server_module="tests.moto_iam_server",
    )
    with endpoint:
        # The three unauthenticated requests: an administrator for the rest of the set-up.
        bootstrap = boto3.client(
            "iam",
            endpoint_url=endpoint.url,
            region_name="us-east-1",
            aws_access_key_id="bootstrap",
            aws_secret_access_key="bootstrap",
        )
        bootstrap.create_user(UserName="admin")
        key = bootstrap.create_access_key(UserName="admin")["AccessKey"]
        bootstrap.put_user_policy(UserName="admin", PolicyName="all", PolicyDocument=json.dumps(ALLOW_ALL))
        env = Enforcing(endpoint, Creds(key["AccessKeyId"], key["SecretAccessKey"]), log_dir)
        for config in (
            env.config(STEPS),  # 2048 bytes (see block)
            env.config(RUNS, **{"sqs-creation-attributes": {"MaximumMessageSize": "1400"}}),
        ):
            out = run_cli("queues", "create", "-y", config, env=env.admin.env())
            assert out.returncode == 0, out.stderr
        yield env


def printed_policy(enforcing: Enforcing, *roles: str, default_queue: str = STEPS) -> dict:
    """What `iam-policy --role ROLE...` prints for the module's config (asked once per roles and queue;
    the account comes from STS as the administrator)."""
    key = (roles, default_queue)
    if key not in enforcing.policies:
        args = [a for role in roles for a in ("--role", role)]
        out = run_cli("iam-policy", "-y", enforcing.config(default_queue), *args, env=enforcing.admin.env())
        assert out.returncode == 0, out.stderr
        enforcing.policies[key] = json.loads(out.stdout)
    return json.loads(json.dumps(enforcing.policies[key]))  # a copy: tests derive policies from it


# --- each role's calls, through the package's own code --------------------------------------


class Denied(AssertionError):
    """A role's call failed: ``step`` names which one."""

    def __init__(self, step: str, detail: object) -> None:
        super().__init__(f"{step}: {detail}")
        self.step = step


def step(name: str, fn):
    try:
        return fn()
    except Denied:
        raise
    except Exception as exc:
        raise Denied(name, " <- ".join(_chain(exc))) from exc


def _chain(exc: BaseException | None):
    """The error and what it was raised from or during (the AWS error message names the action)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield f"{type(exc).__name__}: {exc}"
        exc = exc.__cause__ or exc.__context__


def sqs_settings(enforcing: Enforcing, creds: Creds, default_queue: str = STEPS, **changes):
    settings = settings_from_executor_config(enforcing.block(default_queue)).sqs
    return replace(settings, access_key_id=creds.key, secret_access_key=creds.secret, **changes)


def step_message(big: bool = False) -> StepMessage:
    """A real step message. A small one fits the steps queue (2048 bytes); a fan-in after a wide
    fan-out carries many dynamic mapping keys in its known_state, more than the queue accepts,
    so it is offloaded to S3."""
    mappings = {"fan_out": {"result": [f"key_{i}" for i in range(100)]}} if big else {}
    return StepMessage(
        str(uuid.uuid4()),
        "fan_in" if big else "emit_one",
        1,
        serialize_value(KnownExecutionState(dynamic_mappings=mappings)),
    )


def run_message(big: bool = False) -> RunMessage:
    """A real run launch. The runs queue accepts 1400 bytes: a launch with a Dagster run id (a
    UUID) fits; a resume of a run whose id has the full 255 characters does not, so it is offloaded."""
    if big:
        return RunMessage(TaskKind.RESUME, "r" * 255, "resume-1")
    return RunMessage(TaskKind.RUN, str(uuid.uuid4()), "launch")


def exercise_sender(enforcing: Enforcing, creds: Creds, role: str = "orchestrator") -> None:
    """The orchestrator's calls (taskiq_executor's StepSender: send_many of step messages) or the
    run launcher's (TaskiqRunLauncher: send of one run message), through BrokerClient."""
    queue, make = (RUNS, run_message) if role == "launcher" else (STEPS, step_message)
    settings = sqs_settings(enforcing, creds, queue)

    def outgoing(message) -> Outgoing:
        return Outgoing(queue, message.task_id, encode(message, settings.queue_name(queue)))

    with Bridge() as bridge:
        client = BrokerClient(settings, bridge, [queue], dead_letters=False)  # as executor.py and launcher.py make it
        step("start", client.start)
        try:
            one = outgoing(make())
            assert step("send", lambda: client.send(queue=queue, task_id=one.task_id, body=one.body)) is None
            if role != "launcher":  # several steps ready at once: SendMessageBatch
                results = step("send batch", lambda: client.send_many([outgoing(make()), outgoing(make())]))
                if any(r.error for r in results):
                    raise Denied("send batch", [r.error for r in results])
            big = outgoing(make(big=True))
            url = step("send offloaded", lambda: client.send(queue=queue, task_id=big.task_id, body=big.body))
            assert url == f"s3://{BUCKET}/{PREFIX}/{big.task_id}.json"
        finally:
            client.stop()


def drain(enforcing: Enforcing, queue: str) -> None:
    """As the administrator, delete every visible message (PurgeQueue is allowed once a minute)."""
    sqs = enforcing.client("sqs")
    url = sqs.get_queue_url(QueueName=queue)["QueueUrl"]
    while True:
        left = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages", [])
        if not left:
            return
        sqs.delete_message_batch(
            QueueUrl=url, Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(left)]
        )


@dataclass(frozen=True)
class Seeded:
    """What seed_worker_messages sent: a plain step, an offloaded step and a poison message."""

    plain: bytes
    offloaded: bytes  # the payload in S3
    key: str  # its S3 key
    poison: bytes

    def which(self, delivery: Delivery, settings) -> str | None:
        if delivery.offloaded:
            try:
                pointer = decode_pointer(
                    delivery.body, settings.s3_bucket, settings.s3_prefix, settings.max_payload_bytes
                )
            except MalformedMessage:
                return None
            return "offloaded" if pointer.key == self.key else None
        return {self.plain: "plain", self.poison: "poison"}.get(delivery.body)


def seed_worker_messages(enforcing: Enforcing, queue: str) -> Seeded:
    """As the administrator, through BrokerClient: a step, an offloaded step and a message that can
    never run, on a drained queue (and a drained dead-letter queue).

    (PurgeQueue is allowed once a minute, so the queues are drained instead; messages an earlier,
    denied exercise left in flight come back within the short visibility used here and are ignored.)
    """
    drain(enforcing, queue)
    drain(enforcing, iam.dead_letter_name(queue))
    settings = sqs_settings(enforcing, enforcing.admin, queue)
    plain, big = step_message(), step_message(big=True)
    bodies = [encode(plain, queue), encode(big, queue), json.dumps({"not": "a step", "id": uuid.uuid4().hex}).encode()]
    ids = [plain.task_id, big.task_id, f"poison-{uuid.uuid4().hex}"]
    with Bridge() as bridge, BrokerClient(settings, bridge, [queue]) as client:
        results = client.send_many([Outgoing(queue, i, b) for i, b in zip(ids, bodies, strict=True)])
    assert [r.error for r in results] == [None] * 3, results
    assert [bool(r.offloaded_to) for r in results] == [False, True, False], results
    return Seeded(bodies[0], bodies[1], f"{PREFIX}/{big.task_id}.json", bodies[2])


def payload_exists(enforcing: Enforcing, key: str) -> bool:
    try:
        enforcing.client("s3").head_object(Bucket=BUCKET, Key=key)
        return True
    except ClientError:
        return False


def exercise_worker(enforcing: Enforcing, creds: Creds, queue: str = STEPS, **settings_changes) -> None:
    """A worker's calls, as its threads make them through BrokerClient: receive, read an offloaded
    payload, extend visibility, delete (with the payload), dead-letter a message that can never run."""
    seeded = seed_worker_messages(enforcing, queue)
    settings = sqs_settings(enforcing, creds, queue, visibility_timeout=5, **settings_changes)
    with Bridge() as bridge:
        client = BrokerClient(settings, bridge, [queue])
        step("start", client.start)
        try:
            got: dict[str, Delivery] = {}
            deadline = time.monotonic() + 20
            while len(got) < 3 and time.monotonic() < deadline:
                for delivery in step("receive", lambda: client.receive(queue, 10, 1)):
                    which = seeded.which(delivery, settings)
                    if which:
                        got[which] = delivery
            assert set(got) == {"plain", "offloaded", "poison"}, got
            pointer = decode_pointer(
                got["offloaded"].body, settings.s3_bucket, settings.s3_prefix, settings.max_payload_bytes
            )
            payload = step("read payload", lambda: client.fetch_payload(pointer, settings.max_payload_bytes))
            check_payload(pointer, payload, signed=False)
            assert payload == seeded.offloaded
            lost = step("extend visibility", lambda: client.change_visibility(list(got.values()), 30))
            if lost:
                raise Denied("extend visibility", lost)
            refused = step("delete", lambda: client.delete_many([got["plain"], got["offloaded"]], [pointer]))
            if refused:
                raise Denied("delete", refused)
            if payload_exists(enforcing, seeded.key):  # delete_many logs a payload it could not delete
                raise Denied("delete", "the offloaded payload was not deleted with its message")
            moved_to = step("dead-letter", lambda: client.dead_letter(got["poison"], "exercise: it can never run"))
            if moved_to != iam.dead_letter_name(queue):  # no dead-letter queue found at start: deleted instead
                raise Denied("dead-letter", f"the message was deleted, not moved to {iam.dead_letter_name(queue)}")
        finally:
            client.stop()
    # The dead-letter queue holds the message as it was, with the reason.
    sqs = enforcing.client("sqs")
    dlq = sqs.get_queue_url(QueueName=iam.dead_letter_name(queue))["QueueUrl"]
    held = sqs.receive_message(QueueUrl=dlq, MaxNumberOfMessages=10, MessageAttributeNames=["All"]).get("Messages", [])
    assert [
        (m["Body"].encode(), m["MessageAttributes"][DEAD_LETTER_REASON_ATTRIBUTE]["StringValue"]) for m in held
    ] == [(seeded.poison, "exercise: it can never run")], held


# Which (statement, action) each step of a role needs: removing one must break that step.
NEEDS = {
    "orchestrator": {
        "start": {
            ("OrchestratorSendMessages", "sqs:GetQueueUrl"),
            ("OrchestratorSendMessages", "sqs:GetQueueAttributes"),
        },
        "send": {("OrchestratorSendMessages", "sqs:SendMessage")},
        "send batch": {("OrchestratorSendMessages", "sqs:SendMessage")},
        "send offloaded": {("OrchestratorOffloadPayloads", "s3:PutObject")},
    },
    "worker": {
        # A worker looks its dead-letter queue up at start: one it may not find fails the start.
        "start": {
            ("WorkerReceiveMessages", "sqs:GetQueueUrl"),
            ("WorkerReceiveMessages", "sqs:GetQueueAttributes"),
            ("WorkerDeadLetter", "sqs:GetQueueUrl"),
        },
        "receive": {("WorkerReceiveMessages", "sqs:ReceiveMessage")},
        "read payload": {("WorkerReadPayloads", "s3:GetObject")},
        "extend visibility": {("WorkerReceiveMessages", "sqs:ChangeMessageVisibility")},
        "delete": {("WorkerReceiveMessages", "sqs:DeleteMessage"), ("WorkerReadPayloads", "s3:DeleteObject")},
        "dead-letter": {("WorkerDeadLetter", "sqs:GetQueueUrl"), ("WorkerDeadLetter", "sqs:SendMessage")},
    },
}
NEEDS["launcher"] = {
    s: {(sid.replace("Orchestrator", "Launcher"), a) for sid, a in needs}
    for s, needs in NEEDS["orchestrator"].items()
    if s != "send batch"
}


def exercise(enforcing: Enforcing, role: str, creds: Creds) -> None:
    if role == "worker":
        exercise_worker(enforcing, creds, STEPS)
    else:
        exercise_sender(enforcing, creds, role)


def role_policy(enforcing: Enforcing, role: str) -> dict:
    return printed_policy(enforcing, role, default_queue=RUNS if role == "launcher" else STEPS)


def test_the_endpoint_enforces_iam(enforcing):
    nobody = enforcing.user(
        "nobody",
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "sqs:ListQueues", "Resource": "*"}]},
    )
    with pytest.raises(Denied, match="(?s)start.*sqs:GetQueueUrl"):
        exercise_sender(enforcing, nobody)
    with pytest.raises(ClientError, match="InvalidClientTokenId|403"):
        enforcing.client("sqs", Creds("unknown", "unknown")).list_queues()


@pytest.mark.parametrize("role", ["orchestrator", "worker", "launcher"])
def test_a_principal_with_exactly_the_printed_policy_makes_every_call_of_its_role(enforcing, role):
    document = role_policy(enforcing, role)
    # Every statement is on the config's own queues, dead-letter queues and offload prefix.
    resources = {
        r for s in document["Statement"] for r in ([s["Resource"]] if isinstance(s["Resource"], str) else s["Resource"])
    }
    queue = RUNS if role == "launcher" else STEPS
    expected = {f"arn:aws:sqs:us-east-1:{ACCOUNT}:{queue}", f"arn:aws:s3:::{BUCKET}/{PREFIX}/*"}
    if role == "worker":
        expected.add(f"arn:aws:sqs:us-east-1:{ACCOUNT}:{queue}-dlq")
    assert resources == expected
    exercise(enforcing, role, enforcing.user(f"{role}-exact", document))


def minimality_cases():
    # The printed policy's (statement, action) pairs are known from iam.statements for this config.
    resources = iam.Resources(("q",), ("q-dlq",), "arn:aws:s3:::b/p/*", None)
    return [(role, sid, action) for role in iam.ROLES for sid, action in iam.actions_of(iam.policy([role], resources))]


@pytest.mark.parametrize("role, sid, action", minimality_cases(), ids=lambda v: str(v))
def test_removing_any_one_action_breaks_the_call_that_needs_it(enforcing, role, sid, action):
    document = role_policy(enforcing, role)
    assert (sid, action) in iam.actions_of(document)
    creds = enforcing.user(f"{role}-minus-one", iam.without_action(document, sid, action))
    with pytest.raises(Denied) as denied:
        exercise(enforcing, role, creds)
    assert (sid, action) in NEEDS[role][denied.value.step], str(denied.value)


def test_workers_cannot_send_steps_unless_given_the_orchestrator_statements(enforcing):
    worker = enforcing.user("worker-only", role_policy(enforcing, "worker"))
    with pytest.raises(Denied, match="(?s)send: .*sqs:SendMessage"):
        exercise_sender(enforcing, worker)
    # A worker that serves TaskiqRunLauncher runs whose steps it sends: both roles in one policy.
    both = enforcing.user("worker-and-orchestrator", printed_policy(enforcing, "worker", "orchestrator"))
    exercise_worker(enforcing, both)
    exercise_sender(enforcing, both)


# --- iam-policy output and bad input --------------------------------------------------------


def test_policy_with_a_kms_key_predefined_queues_and_merged_roles():
    key = f"arn:aws:kms:eu-west-1:{ACCOUNT}:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    resources = iam.Resources(
        (f"arn:aws:sqs:eu-west-1:{ACCOUNT}:q",), (f"arn:aws:sqs:eu-west-1:{ACCOUNT}:q-dlq",), None, key
    )
    worker = iam.policy(["worker"], resources)
    assert {s["Sid"]: s["Action"] for s in worker["Statement"]}["WorkerDecryptWithKey"] == [
        "kms:Decrypt",
        "kms:GenerateDataKey",
    ]
    sender = iam.policy(["orchestrator"], resources)
    assert {s["Sid"]: (s["Action"], s["Resource"]) for s in sender["Statement"]}["OrchestratorEncryptWithKey"] == (
        ["kms:Decrypt", "kms:GenerateDataKey"],
        key,
    )
    assert not any(s["Resource"] == "arn:aws:s3:::b/p/*" for s in sender["Statement"])  # no backend, no S3
    both = iam.policy(["worker", "orchestrator"], resources)
    queue_statement = next(s for s in both["Statement"] if s["Resource"] == [f"arn:aws:sqs:eu-west-1:{ACCOUNT}:q"])
    assert set(queue_statement["Action"]) == set(iam.WORKER_SQS) | set(iam.SENDER_SQS)


def iam_policy_cli(tmp_path, block: dict, *args, env=None) -> subprocess.CompletedProcess:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"execution": {"config": block}}))
    return run_cli("iam-policy", "-y", path, *args, env=env)


def test_iam_policy_cli_with_predefined_queues_and_key_id_needs_no_aws_call(tmp_path):
    block = {
        "broker": "sqs://127.0.0.1:1",  # nothing listens: the account comes from the queue URL
        "backend": "s3://b/p",
        "config_source": {
            "broker_transport_options": {
                "region": "eu-west-1",
                "predefined_queues": {
                    "dagster": {"url": "https://sqs.eu-west-1.amazonaws.com/210987654321/prod-dagster"}
                },
                "sqs-creation-attributes": {"KmsMasterKeyId": "1234abcd-12ab-34cd-56ef-1234567890ab"},
            }
        },
    }
    out = iam_policy_cli(tmp_path, block)
    assert out.returncode == 0, out.stderr
    by_role = json.loads(out.stdout)
    assert set(by_role) == {"orchestrator", "worker", "launcher"}
    statements = {s["Sid"]: s for s in by_role["worker"]["Statement"]}
    assert statements["WorkerReceiveMessages"]["Resource"] == ["arn:aws:sqs:eu-west-1:210987654321:prod-dagster"]
    assert statements["WorkerDeadLetter"]["Resource"] == ["arn:aws:sqs:eu-west-1:210987654321:prod-dagster-dlq"]
    assert statements["WorkerDecryptWithKey"]["Resource"] == (
        "arn:aws:kms:eu-west-1:210987654321:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    )
    out = iam_policy_cli(tmp_path, block, "--role", "worker", "--no-dead-letter")
    assert "WorkerDeadLetter" not in out.stdout and "kms:GenerateDataKey" not in out.stdout


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--role", "admin"], "Invalid value for '--role': 'admin' is not one of 'orchestrator', 'worker', 'launcher'"),
        (["--account-id", "12ab"], "--account-id '12ab' is not an AWS account id; pass the 12 digits"),
        (["--kms-key", "my key"], "--kms-key 'my key' is not a KMS key; pass a key id"),
    ],
)
def test_iam_policy_refuses_garbage(tmp_path, args, expected):
    block = {"broker": "sqs://127.0.0.1:1", "config_source": {"broker_transport_options": {"region": "us-east-1"}}}
    out = iam_policy_cli(tmp_path, block, *args)
    assert out.returncode != 0 and expected in out.stderr, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in out.stderr, out.stderr  # one sentence (after click's usage hint)


def test_iam_policy_without_a_reachable_sts_asks_for_the_account(tmp_path):
    block = {
        "broker": "sqs://127.0.0.1:1",
        "config_source": {
            "broker_transport_options": {
                "region": "us-east-1",
                "client-config": {"connect_timeout": 1, "retries": {"max_attempts": 1}},
            }
        },
    }
    out = iam_policy_cli(tmp_path, block, "--role", "worker")
    assert out.returncode == 1 and "pass --account-id ACCOUNT" in out.stderr, out.stderr
    out = iam_policy_cli(tmp_path, block, "--role", "worker", "--account-id", ACCOUNT)
    assert out.returncode == 0 and f"arn:aws:sqs:us-east-1:{ACCOUNT}:dagster" in out.stdout


# --- sts_role_arn: AssumeRole credentials that refresh ----------------------------------------


@pytest.fixture(scope="module")
def worker_role(enforcing):
    """A role holding the worker policy, and a user who may do nothing but assume it."""
    client = enforcing.client("iam")
    trust = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:user/assumer"},
                "Action": "sts:AssumeRole",
            }
        ],
    }
    arn = client.create_role(RoleName="dagster-worker", AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"]
    client.put_role_policy(
        RoleName="dagster-worker", PolicyName="worker", PolicyDocument=json.dumps(role_policy(enforcing, "worker"))
    )
    assumer = enforcing.user(
        "assumer",
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole", "Resource": arn}]},
    )
    return arn, assumer


def test_sts_role_arn_signs_every_call_as_the_role(enforcing, worker_role):
    arn, assumer = worker_role
    # The assumer alone may not touch the queues...
    with pytest.raises(Denied, match="start"):
        exercise_worker(enforcing, assumer)
    # ...but with sts_role_arn every worker call is made as the role.
    exercise_worker(enforcing, assumer, sts_role_arn=arn)


def test_a_role_that_cannot_be_assumed_is_one_sentence(enforcing, worker_role):
    _, assumer = worker_role
    other = f"arn:aws:iam::{ACCOUNT}:role/not-mine"
    with pytest.raises(Denied) as denied:
        exercise_worker(enforcing, assumer, sts_role_arn=other)
    message = str(denied.value.__cause__)
    assert f"assuming broker_transport_options.sts_role_arn {other!r} failed" in message
    assert "allow sts:AssumeRole on it" in message


def test_role_credentials_refresh_across_token_expiry(enforcing, worker_role):
    # Given a worker's broker signing as the role with 3-second tokens (STS's floor is 900 s, which
    # botocore checks unless told not to; moto accepts less, which lets the test cross an expiry)
    arn, assumer = worker_role
    settings = sqs_settings(
        enforcing, assumer, sts_role_arn=arn, sts_token_timeout=3, client_config={"parameter_validation": False}
    )
    signed_with = []

    def record_key(request, **_):
        authorization = request.headers.get("Authorization", b"")
        authorization = authorization.decode() if isinstance(authorization, bytes) else authorization
        signed_with.append(authorization.split("Credential=")[1].split("/")[0])

    with Bridge() as bridge:
        client = BrokerClient(settings, bridge, [STEPS]).start()
        try:
            client.broker._sqs_client.meta.events.register("before-send.sqs", record_key)
            client.receive(STEPS, 1, 0)
            time.sleep(3.5)  # the first token has expired
            client.receive(STEPS, 1, 0)  # Then the call still succeeds...
        finally:
            client.stop()
        credentials = client.broker._session._dagster_taskiq_sync_role[1]
    # ...signed with a new token from a second AssumeRole
    assert len(signed_with) == 2 and signed_with[0] != signed_with[1], signed_with
    assert all(key.startswith("ASIA") for key in signed_with)  # temporary (assumed-role) keys
    assert credentials.refreshes >= 2


def test_role_credentials_refresh_before_they_expire():
    # Given credentials of a 900 s token on a fake clock
    now = [datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)]
    issued = []

    async def assume():
        issued.append(now[0])
        expiry = now[0] + datetime.timedelta(seconds=900)
        return {"access_key": f"ASIA{len(issued)}", "secret_key": "s", "token": "t", "expiry_time": expiry.isoformat()}

    credentials = RoleCredentials(assume, 900, time_fetcher=lambda: now[0])
    assert refresh_windows(900) == (300, 150)
    assert refresh_windows(3600) == (900, 600)  # botocore's own windows for hour-long tokens

    import asyncio

    def key_at(seconds: float) -> str:
        now[0] = issued[0] + datetime.timedelta(seconds=seconds) if issued else now[0]
        return asyncio.run(credentials.get_frozen_credentials()).access_key

    assert key_at(0) == "ASIA1"
    assert key_at(500) == "ASIA1"  # 400 s left: no AssumeRole per request
    # When less than the advisory window (a third of the token) is left, a new token is fetched
    # while the old one is still valid
    assert key_at(650) == "ASIA2"
    assert len(issued) == 2


def test_a_worker_process_assumes_the_role_from_its_config(enforcing, worker_role, tmp_path):
    arn, assumer = worker_role
    config = enforcing.config(STEPS, sts_role_arn=arn)
    env = assumer.env() | {"DAGSTER_HOME": str(tmp_path)}
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    worker = WorkerProcess(Path(config), "sts", tmp_path, ["-c", "1"], env=env)
    try:
        worker.wait_ready()
        # it keeps polling as the role: a message sent now is taken (and dropped as malformed)
        sqs = enforcing.client("sqs")
        url = sqs.get_queue_url(QueueName=STEPS)["QueueUrl"]
        sqs.send_message(QueueUrl=url, MessageBody="not a step")
        wait_for(
            lambda: (
                "not a step" in worker.log()
                or "malformed" in worker.log().lower()
                or int(
                    sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["ApproximateNumberOfMessagesNotVisible"])[
                        "Attributes"
                    ]["ApproximateNumberOfMessagesNotVisible"]
                )
                > 0
            ),
            timeout=30,
            what="the worker to receive as the role",
        )
    finally:
        assert worker.stop() == 0, worker.log()
    assert "AccessDenied" not in worker.log() and "not authorized" not in worker.log()


def test_a_job_runs_end_to_end_with_only_the_printed_policies(enforcing, worker_role, tmp_path):
    # Given an orchestrator user holding exactly the orchestrator policy, and a worker that holds no
    # permission but assuming the role that holds exactly the worker policy (sts_role_arn)
    arn, assumer = worker_role
    orchestrator = enforcing.user("orchestrator-e2e", role_policy(enforcing, "orchestrator"))
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    drain(enforcing, STEPS)
    worker = WorkerProcess(
        Path(enforcing.config(STEPS, sts_role_arn=arn)),
        "e2e",
        tmp_path,
        ["-c", "2"],
        env=assumer.env() | {"DAGSTER_HOME": str(home)},
    )
    try:
        worker.wait_ready()
        # When the orchestrator runs a job (dagster job execute, as a user would)
        out = subprocess.run(
            [
                str(Path(CLI).parent / "dagster"),
                "job",
                "execute",
                "-f",
                str(ROOT / "tests" / "jobs.py"),
                "-j",
                "diamond",
                "-c",
                enforcing.config(STEPS),
            ],
            capture_output=True,
            text=True,
            timeout=180,
            cwd=ROOT,
            env=orchestrator.env() | {"DAGSTER_HOME": str(home)},
        )
    finally:
        assert worker.stop() == 0, worker.log()
    # Then the run succeeds, its steps ran on that worker, and nobody was refused anything
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    from dagster import DagsterInstance, DagsterRunStatus

    with DagsterInstance.from_config(str(home)) as instance:
        run = instance.get_runs(limit=1)[0]
        assert run.status == DagsterRunStatus.SUCCESS
        reports = step_reports(instance, run.run_id)
        assert set(reports) == {"emit_one", "add_one", "times_ten", "combine"}
        assert {r.worker for r in reports.values()} == {worker.full_name}
    refused = [
        line for line in (worker.log() + out.stderr).splitlines() if "AccessDenied" in line or "not authorized" in line
    ]
    assert not refused, refused


def test_sts_and_kms_use_boto_endpoints_when_the_broker_names_an_aws_sqs_host():
    from dagster_taskiq_sync.wire.aws import for_service

    aws = {"endpoint_url": "https://sqs.eu-west-1.amazonaws.com:443", "region_name": "eu-west-1"}
    assert for_service(aws) == {"endpoint_url": None, "region_name": "eu-west-1"}
    local = {"endpoint_url": "http://127.0.0.1:9324"}
    assert for_service(local) == local  # a local endpoint (moto) serves STS and KMS too


def test_sts_options_map_from_broker_transport_options():
    transport = {"sts_role_arn": f"arn:aws:iam::{ACCOUNT}:role/dagster-worker", "sts_token_timeout": "3600"}
    settings = settings_from_executor_config({"config_source": {"broker_transport_options": transport}})
    assert (settings.sqs.sts_role_arn, settings.sqs.sts_token_timeout) == (transport["sts_role_arn"], 3600)
    assert settings.notes == ()
    alone = settings_from_executor_config({"config_source": {"broker_transport_options": {"sts_token_timeout": 900}}})
    assert alone.notes == (
        "execution.config.config_source.broker_transport_options.sts_token_timeout has no "
        "effect without sts_role_arn; set both or remove it.",
    )
