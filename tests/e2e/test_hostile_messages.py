"""A queue message is untrusted input: what an attacker holding only sqs:SendMessage can send.

Real workers on the local endpoint get a corpus of hostile messages: messages of the old format
that named their own Dagster instance and code (the attack that used to run `os.system`), a
reference to a module that raises SystemExit on import, garbage and wrong-typed fields, an unknown
version, S3 pointers outside the offload prefix or over the size cap mixed with valid messages,
and, with signing on, unsigned, tampered and foreign-key messages. For each: no code of the
attacker's ran (marker files), nothing was imported that the worker did not choose, the message
is in the dead-letter queue with its reason, the worker is alive at full concurrency, and the next
genuine run succeeds.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
import yaml
from dagster import DagsterInstance, DagsterRunStatus, execute_job, reconstructable
from dagster._core.code_pointer import CustomPointer, ModuleCodePointer
from dagster._core.execution.retries import RetryMode
from dagster._core.instance.ref import InstanceRef
from dagster._grpc.types import ExecuteRunArgs, ExecuteStepArgs
from dagster._serdes import ConfigurableClassData, serialize_value

from dagster_taskiq_sync._dagster.names import KnownExecutionState
from dagster_taskiq_sync.storage.run_report import step_reports
from dagster_taskiq_sync.wire.broker import DEAD_LETTER_REASON_ATTRIBUTE
from dagster_taskiq_sync.wire.messages import Keyring, RunMessage, StepMessage, TaskKind, encode, step_handle_id

from .. import jobs
from ..helpers import CLI, WorkerProcess, queue_counts, sqs_client, wait_for

ROOT = Path(__file__).resolve().parents[2]
QUEUE = "hostile"
SIGNED = "signed"
BUCKET = "hostile-payloads"
KEY = "new-key-" + "n" * 40
OLD_KEY = "old-key-" + "o" * 40


@dataclass
class Setup:
    config: dict
    worker: WorkerProcess
    markers: Path
    url: str
    dlq_url: str


def _create(config: dict, path: Path, *extra: str) -> None:
    path.write_text(yaml.safe_dump({"execution": {"config": config}}))
    out = subprocess.run([CLI, "queues", "create", "-y", str(path), *extra], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


@pytest.fixture(scope="module")
def hostile(endpoint, tmp_path_factory):
    base = tmp_path_factory.mktemp("hostile")
    markers, evil = base / "markers", base / "evil"
    markers.mkdir()
    evil.mkdir()
    # A module the worker *could* import (it is on its path): it marks, then raises SystemExit.
    (evil / "hostile_module_xyz.py").write_text(
        f"open({str(markers / 'imported')!r}, 'w').write('imported')\nraise SystemExit(3)\n"
    )
    config = {
        "broker": endpoint.broker_url,
        "backend": f"s3://{BUCKET}/steps",
        "max_payload_mib": 1,
        "config_source": {
            "task_default_queue": QUEUE,
            "worker_prefetch_multiplier": 5,
            "broker_transport_options": {"wait_time_seconds": 1, "visibility_timeout": 5},
        },
    }
    _create(config, base / "hostile.yaml", "--max-receive-count", "3")
    env = os.environ | {"PYTHONPATH": f"{evil}{os.pathsep}{ROOT}"}
    worker = WorkerProcess(base / "hostile.yaml", "hostile", base, ["-q", QUEUE, "-c", "2"], env=env).wait_ready()
    client = sqs_client(endpoint.url)
    setup = Setup(
        config,
        worker,
        markers,
        client.get_queue_url(QueueName=QUEUE)["QueueUrl"],
        client.get_queue_url(QueueName=f"{QUEUE}-dlq")["QueueUrl"],
    )
    yield setup
    assert worker.stop() == 0, worker.log()[-3000:]


def send_raw(endpoint, url: str, bodies: list[bytes | str], attributes: dict | None = None, pointer=False) -> None:
    client = sqs_client(endpoint.url)
    attrs = {k: {"DataType": "String", "StringValue": v} for k, v in (attributes or {}).items()}
    if pointer:
        attrs["s3_extended_message"] = {"DataType": "String", "StringValue": "True"}
    entries = [
        {
            "Id": str(i),
            "MessageBody": b.decode() if isinstance(b, bytes) else b,
            **({"MessageAttributes": attrs} if attrs else {}),
        }
        for i, b in enumerate(bodies)
    ]
    for start in range(0, len(entries), 10):
        answer = client.send_message_batch(QueueUrl=url, Entries=entries[start : start + 10])
        assert not answer.get("Failed"), answer


def drain_dlq(endpoint, dlq_url: str, expected: int, queue: str, timeout: float = 60) -> list[tuple[str, str]]:
    """(body, reason) of ``expected`` dead-lettered messages, once the source queue is empty."""
    client = sqs_client(endpoint.url)
    seen: dict[str, tuple[str, str]] = {}

    def collect():
        answer = client.receive_message(
            QueueUrl=dlq_url, MaxNumberOfMessages=10, VisibilityTimeout=300, MessageAttributeNames=["All"]
        )
        for m in answer.get("Messages", []):
            reason = m.get("MessageAttributes", {}).get(DEAD_LETTER_REASON_ATTRIBUTE, {}).get("StringValue", "")
            seen[m["MessageId"]] = (m["Body"], reason)
            client.delete_message(QueueUrl=dlq_url, ReceiptHandle=m["ReceiptHandle"])
        return len(seen) >= expected and queue_counts(endpoint.url, queue) == (0, 0)

    wait_for(collect, timeout=timeout, interval=0.2, what=f"{expected} messages in the dead-letter queue of {queue}")
    assert len(seen) == expected, seen
    return list(seen.values())


def taskiq_body(task: TaskKind, kwargs: dict, task_id: str = "t-1") -> bytes:
    return json.dumps(
        {"task_id": task_id, "task_name": task.value, "labels": {}, "labels_types": None, "args": [], "kwargs": kwargs}
    ).encode()


def assert_unharmed(setup: Setup) -> None:
    assert not list(setup.markers.iterdir()), "attacker code ran or an attacker's module was imported"
    assert setup.worker.proc.poll() is None
    log = setup.worker.log()
    assert "died" not in log and "ended unexpectedly" not in log and "Traceback" not in log


def genuine_run_uses_both_slots(instance, setup: Setup) -> None:
    """The next genuine run succeeds on this worker, two steps at a time (both threads alive)."""
    with execute_job(
        reconstructable(jobs.fan_out_fan_in), instance=instance, run_config={"execution": {"config": setup.config}}
    ) as result:
        assert result.success
    reports = step_reports(instance, result.run_id)
    squares = [reports[f"square_{i}"] for i in range(6)]
    assert {r.worker for r in squares} == {setup.worker.full_name}
    assert any(a.started < b.finished and b.started < a.finished for a in squares for b in squares if a is not b)


# --- the attack that used to work: a message naming its own instance and code -----------------------------


def attacker_instance(tmp_path: Path, victim_run, markers: Path):
    """Another sqlite instance holding a STARTED run with the victim's run id whose code origin is
    `os.system("touch MARKER")`."""
    home = tmp_path / "attacker_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    origin = victim_run.job_code_origin
    pointer = CustomPointer(
        ModuleCodePointer("os", "system", working_directory=None), [f"touch {markers / 'pwned'}"], []
    )
    evil_origin = origin._replace(repository_origin=origin.repository_origin._replace(code_pointer=pointer))
    with DagsterInstance.from_config(str(home)) as attacker:
        attacker.add_run(
            victim_run._replace(
                status=DagsterRunStatus.STARTED,
                job_code_origin=evil_origin,
                job_snapshot_id=None,
                execution_plan_snapshot_id=None,
            )
        )
        return attacker.get_ref(), evil_origin


def test_messages_naming_their_own_instance_or_module_run_nothing(endpoint, instance, hostile, tmp_path):
    # Given a real finished run in the worker's instance, and an attacker's instance with the same run id
    with execute_job(
        reconstructable(jobs.diamond), instance=instance, run_config={"execution": {"config": hostile.config}}
    ) as done:
        victim = instance.get_run_by_id(done.run_id)
    attacker_ref, evil_origin = attacker_instance(tmp_path, victim, hostile.markers)
    state = serialize_value(KnownExecutionState())
    v1_step = ExecuteStepArgs(
        job_origin=evil_origin,
        run_id=victim.run_id,
        step_keys_to_execute=["emit_one"],
        instance_ref=attacker_ref,
        retry_mode=RetryMode.DEFERRED,
        known_state=KnownExecutionState(),
        should_verify_step=False,
        print_serialized_events=False,
    )
    v1_run = ExecuteRunArgs(job_origin=evil_origin, run_id=victim.run_id, instance_ref=attacker_ref)
    exiting_ref = InstanceRef.from_dir(str(tmp_path))._replace(
        run_storage_data=ConfigurableClassData("hostile_module_xyz", "Storage", "{}")
    )
    other_run = str(uuid.uuid4())
    attacks = [
        # the old format, re-pointed at the attacker's instance and code (used to run os.system)
        taskiq_body(
            TaskKind.STEP,
            {
                "version": 1,
                "run_id": victim.run_id,
                "step_key": "emit_one",
                "attempt": 1,
                "execute_step_args": serialize_value(v1_step),
            },
        ),
        taskiq_body(
            TaskKind.RUN,
            {"version": 1, "run_id": victim.run_id, "launch": "launch", "execute_run_args": serialize_value(v1_run)},
        ),
        # the same with the current version: extra fields are refused, not ignored
        taskiq_body(
            TaskKind.STEP,
            {
                "version": 2,
                "run_id": victim.run_id,
                "step_key": "emit_one",
                "attempt": 1,
                "known_state": state,
                "instance_ref": serialize_value(attacker_ref),
            },
        ),
        # a reference to a module that raises SystemExit on import
        taskiq_body(
            TaskKind.STEP,
            {
                "version": 2,
                "run_id": victim.run_id,
                "step_key": "emit_one",
                "attempt": 1,
                "known_state": state,
                "instance_ref": serialize_value(exiting_ref),
            },
        ),
        # a well-formed message for a run that exists only in the attacker's instance
        encode(StepMessage(other_run, "emit_one", 1, state), QUEUE),
        encode(RunMessage(TaskKind.RUN, other_run, "launch"), QUEUE),
    ]
    send_raw(endpoint, hostile.url, attacks)

    reasons = [reason for _, reason in drain_dlq(endpoint, hostile.dlq_url, len(attacks), QUEUE)]
    assert sum("version 1, and this worker reads version 2" in r for r in reasons) == 2
    assert sum("fields this version does not define" in r for r in reasons) == 2
    assert sum(f"run {other_run} is not in this worker's Dagster instance" in r for r in reasons) == 2
    assert_unharmed(hostile)
    genuine_run_uses_both_slots(instance, hostile)


def wrong_types() -> list[bytes]:
    good = json.loads(
        encode(StepMessage(str(uuid.uuid4()), "emit_one", 1, serialize_value(KnownExecutionState())), QUEUE)
    )
    bodies = []
    for field, value in [("task_id", 7), ("task_name", ["x"]), ("labels", "x"), ("args", {"a": 1}), ("kwargs", "run")]:
        bodies.append(json.dumps({**good, field: value}).encode())
    for field, value in [("run_id", 5), ("step_key", None), ("attempt", "1"), ("known_state", {}), ("version", "2")]:
        bodies.append(json.dumps({**good, "kwargs": {**good["kwargs"], field: value}}).encode())
    return bodies


def test_garbage_wrong_types_and_unknown_versions_are_dead_lettered_with_their_reason(endpoint, instance, hostile):
    good = encode(StepMessage(str(uuid.uuid4()), "emit_one", 1, serialize_value(KnownExecutionState())), QUEUE)
    unknown_version = json.loads(good)
    unknown_version["kwargs"]["version"] = 3
    bodies = [
        b"this is not json {",
        good[: len(good) // 2],
        good[::-1],
        b"[]",
        json.dumps(unknown_version).encode(),
        *wrong_types(),
    ]
    send_raw(endpoint, hostile.url, bodies)

    dead = drain_dlq(endpoint, hostile.dlq_url, len(bodies), QUEUE)
    reasons = [reason for _, reason in dead]
    assert all(reasons), dead  # every one says why
    assert sum("not JSON" in r for r in reasons) == 3
    assert any("version 3, and this worker reads version 2" in r for r in reasons)
    assert any("task_id does not match" in r for r in reasons) and any("positional args" in r for r in reasons)
    assert_unharmed(hostile)
    genuine_run_uses_both_slots(instance, hostile)


def test_s3_pointers_outside_the_prefix_or_over_the_cap_only_affect_their_own_message(endpoint, instance, hostile):
    s3 = boto3.client("s3", endpoint_url=endpoint.url, region_name="us-east-1")
    s3.create_bucket(Bucket="other-bucket")
    s3.put_object(Bucket="other-bucket", Key="steps/x.json", Body=b"{}")
    s3.put_object(Bucket=BUCKET, Key="steps/big.json", Body=b"x" * (2 * 1024 * 1024))  # cap is 1 MiB
    pointers = [
        {"s3_bucket": "other-bucket", "s3_key": "steps/x.json"},
        {"s3_bucket": BUCKET, "s3_key": "steps/missing.json"},
        {"s3_bucket": "Invalid_Bucket!!", "s3_key": "steps/x.json"},
        {"s3_bucket": BUCKET, "s3_key": "steps/big.json"},
        {"s3_bucket": BUCKET, "s3_key": "elsewhere/x.json"},
    ]
    # two valid messages in the same receive batch: steps of a finished run, dropped (not dead-lettered)
    with execute_job(
        reconstructable(jobs.diamond), instance=instance, run_config={"execution": {"config": hostile.config}}
    ) as done:
        assert done.success
    state = serialize_value(KnownExecutionState())
    valid = [encode(StepMessage(done.run_id, key, 1, state), QUEUE) for key in ("emit_one", "add_one")]
    client = sqs_client(endpoint.url)
    entries = [
        {
            "Id": f"p{i}",
            "MessageBody": json.dumps(p),
            "MessageAttributes": {"s3_extended_message": {"DataType": "String", "StringValue": "True"}},
        }
        for i, p in enumerate(pointers)
    ] + [{"Id": f"v{i}", "MessageBody": v.decode()} for i, v in enumerate(valid)]
    assert not client.send_message_batch(QueueUrl=hostile.url, Entries=entries).get("Failed")

    reasons = [reason for _, reason in drain_dlq(endpoint, hostile.dlq_url, len(pointers), QUEUE)]
    assert any("names bucket 'other-bucket', not the configured 'hostile-payloads'" in r for r in reasons)
    assert any("Invalid_Bucket!!" in r for r in reasons)
    assert any("steps/missing.json cannot be read" in r for r in reasons)
    assert any("over the 1048576-byte limit" in r for r in reasons)
    assert any("not under the offload prefix" in r for r in reasons)
    assert hostile.worker.log().count(f"run {done.run_id} is SUCCESS") >= 2  # the valid ones were handled
    assert_unharmed(hostile)
    assert s3.head_object(Bucket="other-bucket", Key="steps/x.json")  # never deleted on a stranger's say-so


# --- signing -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def signed(endpoint, tmp_path_factory):
    os.environ["TASKIQ_TEST_KEY"], os.environ["TASKIQ_TEST_OLD_KEY"] = KEY, OLD_KEY
    base = tmp_path_factory.mktemp("signed")
    config = {
        "broker": endpoint.broker_url,
        "signing_key": {"env": "TASKIQ_TEST_KEY"},
        "previous_signing_keys": [{"env": "TASKIQ_TEST_OLD_KEY"}],
        "config_source": {
            "task_default_queue": SIGNED,
            "broker_transport_options": {"wait_time_seconds": 1, "visibility_timeout": 5},
        },
    }
    _create(config, base / "signed.yaml")
    worker = WorkerProcess(base / "signed.yaml", "signed", base, ["-q", SIGNED, "-c", "2"]).wait_ready()
    client = sqs_client(endpoint.url)
    yield Setup(
        config,
        worker,
        base,
        client.get_queue_url(QueueName=SIGNED)["QueueUrl"],
        client.get_queue_url(QueueName=f"{SIGNED}-dlq")["QueueUrl"],
    )
    assert worker.stop() == 0, worker.log()[-3000:]


def test_signed_runs_succeed_also_with_the_previous_key_during_rotation(instance, signed):
    assert "signed messages required" in signed.worker.log()
    for key_env in ("TASKIQ_TEST_KEY", "TASKIQ_TEST_OLD_KEY"):  # a sender not yet rotated still works
        config = {**signed.config, "signing_key": {"env": key_env}}
        with execute_job(
            reconstructable(jobs.diamond), instance=instance, run_config={"execution": {"config": config}}
        ) as result:
            assert result.success, key_env


def test_unsigned_tampered_and_foreign_key_messages_are_refused_before_parsing(endpoint, instance, signed):
    with execute_job(
        reconstructable(jobs.diamond), instance=instance, run_config={"execution": {"config": signed.config}}
    ) as done:
        assert done.success
    run_id = done.run_id
    # A pending attempt of that run (attempt 2 was never sent), signed properly, as a template.
    state = serialize_value(KnownExecutionState({"emit_one": 1}))
    body = encode(StepMessage(run_id, "emit_one", 2, state), SIGNED)
    ring, stranger = Keyring.from_secrets(KEY), Keyring.from_secrets("s" * 48)
    client = sqs_client(endpoint.url)

    def send(payload: bytes, attributes: dict) -> None:
        attrs = {k: {"DataType": "String", "StringValue": v} for k, v in attributes.items()}
        client.send_message(
            QueueUrl=signed.url, MessageBody=payload.decode(), **({"MessageAttributes": attrs} if attrs else {})
        )

    send(body, {})  # unsigned
    send(body, stranger.sign(body))  # a key the worker does not hold
    parsed = json.loads(body)
    for field, value in [("run_id", str(uuid.uuid4())), ("step_key", "add_one"), ("attempt", 3), ("known_state", "{}")]:
        tampered = json.loads(body)
        tampered["kwargs"][field] = value
        send(json.dumps(tampered).encode(), ring.sign(body))  # signature of the original body
    send(json.dumps({**parsed, "task_id": "x"}).encode(), ring.sign(body))
    other_queue = encode(StepMessage(run_id, "emit_one", 2, state), "some-other-queue")
    send(other_queue, ring.sign(other_queue))  # genuinely signed, but for another queue

    reasons = [r for _, r in drain_dlq(endpoint, signed.dlq_url, 8, SIGNED)]
    assert sum("not signed" in r for r in reasons) == 1
    assert sum("which this worker does not hold" in r for r in reasons) == 1
    assert sum("signature does not match its body" in r for r in reasons) == 5
    assert sum("signed for queue 'some-other-queue'" in r for r in reasons) == 1
    log = signed.worker.log()
    assert "Traceback" not in log and signed.worker.proc.poll() is None
    # nothing in the instance was touched on their behalf: attempt 2 has no record
    from dagster_taskiq_sync.storage.liveness import LivenessStore

    assert LivenessStore(instance).read([step_handle_id(run_id, "emit_one", 2)]) == {}
    assert instance.get_run_by_id(run_id).status == DagsterRunStatus.SUCCESS


def test_worker_without_keys_warns_that_queue_writers_can_run_steps(hostile):
    assert (
        "no signing key is configured, so anyone who can send to its queues (hostile) can run steps"
        in hostile.worker.log()
    )


def test_task_serializer_auth_requires_a_signing_key(endpoint, tmp_path):
    path = tmp_path / "auth.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "execution": {
                    "config": {
                        "broker": endpoint.broker_url,
                        "config_source": {"task_serializer": "auth", "security_key": "/etc/ssl/private/worker.key"},
                    }
                }
            }
        )
    )
    out = subprocess.run(
        [CLI, "worker", "start", "-y", str(path), "-q", QUEUE],
        capture_output=True,
        text=True,
        timeout=60,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
    )
    assert out.returncode != 0
    assert "task_serializer 'auth' / security_* ask for signed messages" in out.stderr
    assert "execution.config.signing_key" in out.stderr


def test_worker_refuses_to_start_without_dagster_home(endpoint, hostile, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"}
    out = subprocess.run(
        [CLI, "worker", "start", "-y", str(hostile.worker.command[4]), "-q", QUEUE],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert out.returncode != 0
    assert "DAGSTER_HOME is not set" in out.stderr and "set DAGSTER_HOME to a directory" in out.stderr
