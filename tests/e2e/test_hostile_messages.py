"""A queue message is untrusted input: what an attacker holding only sqs:SendMessage can send.

Real workers on the local endpoint get a corpus of hostile messages: messages of the old format
that named their own Dagster instance and code (the attack that used to run `os.system`), a
reference to a module that raises SystemExit on import, garbage and wrong-typed fields, an unknown
version, S3 pointers outside the offload prefix or over the size cap mixed with valid messages,
and, with signing on, unsigned, tampered and foreign-key messages. For each: no code of the
attacker's ran (marker files), nothing was imported that the worker did not choose, the message
is in the dead-letter queue with its reason, the worker is alive at full concurrency, and the next
genuine run succeeds.

``CORPUS`` holds the attacks of issue 19 as data (message body, S3 objects, expected outcome and the
record left for the attempt it names), checked by name in one test: forged launches, resumes and
attempts nobody sent, S3 pointers whose payload is gone, altered or names another attempt, payloads
that would take 25x their size to parse. Add an attack there with its outcome; a change that reopens
one fails with its name. Attacks that need a live run (a genuine payload deleted under a run, junk
sent ahead under a FIFO deduplication id) have a test each.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import threading
import uuid
from collections.abc import Callable
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
from dagster_taskiq_sync.storage.liveness import DEAD_LETTERED, QUEUED, RUNNING, LivenessStore, StepRecord
from dagster_taskiq_sync.storage.run_report import step_reports
from dagster_taskiq_sync.wire.deliveries import DEAD_LETTER_REASON_ATTRIBUTE
from dagster_taskiq_sync.wire.messages import Keyring, RunMessage, StepMessage, TaskKind, encode, step_task_id

from .. import jobs
from ..helpers import CLI, BackgroundRun, WorkerProcess, queue_counts, run_cli, sqs_client, wait_for

ROOT = Path(__file__).resolve().parents[2]
QUEUE = "hostile"
SIGNED = "signed"
HELD = "hostile-held"  # a queue no worker consumes: messages are taken from it by hand
SIGNED_FIFO = "signed.fifo"
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
    out = run_cli("queues", "create", "-y", str(path), *extra)
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
        "max_payload_mib": 8,
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


def drain_dlq(
    endpoint, dlq_url: str, expected: int, queue: str, timeout: float = 60, exact: bool = True
) -> list[tuple[str, str]]:
    """(body, reason) of ``expected`` dead-lettered messages, once the source queue is empty (with
    ``exact=False``: whatever came by then, for the caller to check one by one)."""
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

    try:
        wait_for(
            collect, timeout=timeout, interval=0.2, what=f"{expected} messages in the dead-letter queue of {queue}"
        )
    except AssertionError:
        if exact:
            raise
    assert len(seen) == expected or not exact, seen
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
    s3.put_object(Bucket=BUCKET, Key="steps/big.json", Body=b"x" * (9 * 1024 * 1024))  # cap is 8 MiB
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
    assert any("over the 8388608-byte limit" in r for r in reasons)
    assert any("not under the offload prefix" in r for r in reasons)
    assert hostile.worker.log().count(f"run {done.run_id} is SUCCESS") >= 2  # the valid ones were handled
    assert_unharmed(hostile)
    assert s3.head_object(Bucket="other-bucket", Key="steps/x.json")  # never deleted on a stranger's say-so


# --- the hostile corpus (issue 19): each attack as data, with its expected outcome ---------------------------


@dataclass(frozen=True)
class Victims:
    """What the corpus aims at, all in the worker's own instance: a finished run, and a STARTED run
    whose emit_one and times_ten attempts its orchestrator sent (queued) and whose add_one is running."""

    finished: str
    started: str


@dataclass(frozen=True)
class Hostile:
    """One attack: the SQS body, the S3 objects put first, and what must come of it."""

    name: str  # the issue row it comes from, and what it is
    body: Callable[[Victims], bytes]
    outcome: str  # "dead_letter" (its reason contains `says`) or "drop" (deleted unrun; the worker's log says it)
    says: str | Callable[[Victims], str]
    objects: Callable[[Victims], dict[str, bytes]] = lambda v: {}
    pointer: bool = False  # sent with the S3-pointer attribute
    # the record of the attempt the message names afterwards: None (nothing written on its behalf) or a state
    record: Callable[[Victims], tuple[str, str | None]] | None = None


def _state(**retries: int) -> str:
    return serialize_value(KnownExecutionState(dict(retries)))


def _step(run_id: str, key: str, attempt: int = 1) -> StepMessage:
    return StepMessage(run_id, key, attempt, _state(**({key: attempt - 1} if attempt > 1 else {})))


def _pointer_to(message) -> dict:
    """The S3 pointer a sender writes for ``message``, spelled out as data (bucket, key, size,
    SHA-256 of its body, and the run, step and attempt or launch it names)."""
    body = encode(message, QUEUE)
    names = {"task_name": message.kind.value, "run_id": message.run_id}
    names.update(
        {"step_key": message.step_key, "attempt": message.attempt}
        if isinstance(message, StepMessage)
        else {"launch": message.launch}
    )
    key = f"steps/{message.task_id}.json"
    return {
        "s3_bucket": BUCKET,
        "s3_key": key,
        "size": len(body),
        "sha256": hashlib.sha256(body).hexdigest(),
        "names": names,
    }


def _pointer_body(message) -> bytes:
    return json.dumps(_pointer_to(message)).encode()


CORPUS = [
    Hostile(
        "row 6: a forged RESUME of a STARTED run (started a second orchestrator)",
        lambda v: encode(RunMessage(TaskKind.RESUME, v.started, "resume-1"), QUEUE),
        "dead_letter",
        lambda v: f"no orchestrator or run launcher of this instance sent run {v.started} (resume-1)",
        record=lambda v: (RunMessage(TaskKind.RESUME, v.started, "resume-1").task_id, None),
    ),
    Hostile(
        "row 6: a forged launch of a STARTED run",
        lambda v: encode(RunMessage(TaskKind.RUN, v.started, "launch"), QUEUE),
        "dead_letter",
        lambda v: f"no orchestrator or run launcher of this instance sent run {v.started} (launch)",
        record=lambda v: (RunMessage(TaskKind.RUN, v.started, "launch").task_id, None),
    ),
    Hostile(
        "row 6: a forged attempt 2 of a step that ended (re-ran user code, failed the run)",
        lambda v: encode(_step(v.started, "emit_one", 2), QUEUE),
        "dead_letter",
        lambda v: f"sent step emit_one (attempt 2) of run {v.started}",
        record=lambda v: (_step(v.started, "emit_one", 2).task_id, None),
    ),
    Hostile(
        "row 6: attempt 1 of a step its orchestrator has not sent yet",
        lambda v: encode(_step(v.started, "combine"), QUEUE),
        "dead_letter",
        lambda v: f"sent step combine (attempt 1) of run {v.started}",
        record=lambda v: (_step(v.started, "combine").task_id, None),
    ),
    Hostile(
        "row 3: a pointer for a sent attempt whose payload was deleted fails that step",
        lambda v: _pointer_body(_step(v.started, "emit_one")),
        "dead_letter",
        "cannot be read (NoSuchKey)",
        pointer=True,
        record=lambda v: (_step(v.started, "emit_one").task_id, DEAD_LETTERED),
    ),
    Hostile(
        "row 3: a pointer for a sent attempt whose payload was overwritten fails that step",
        lambda v: _pointer_body(_step(v.started, "times_ten")),
        "dead_letter",
        "does not match the SHA-256 in its message",
        objects=lambda v: {_pointer_to(_step(v.started, "times_ten"))["s3_key"]: b'{"overwritten": true}'},
        pointer=True,
        record=lambda v: (_step(v.started, "times_ten").task_id, DEAD_LETTERED),
    ),
    Hostile(
        "row 3: an unsigned pointer naming a running attempt cannot fail it (dropped as a duplicate)",
        lambda v: _pointer_body(_step(v.started, "add_one")),
        "drop",
        lambda v: f"step add_one (attempt 1) of run {v.started} already started on worker elsewhere@h",
        pointer=True,
        record=lambda v: (_step(v.started, "add_one").task_id, RUNNING),
    ),
    Hostile(
        "row 3: an unsigned pointer naming an attempt nobody sent writes nothing",
        lambda v: _pointer_body(_step(v.started, "emit_one", 3)),
        "dead_letter",
        "cannot be read (NoSuchKey); and no orchestrator or run launcher of this instance sent",
        pointer=True,
        record=lambda v: (_step(v.started, "emit_one", 3).task_id, None),
    ),
    Hostile(
        "row 3: a pointer naming a step of a finished run is dropped",
        lambda v: _pointer_body(_step(v.finished, "combine")),
        "drop",
        lambda v: f"run {v.finished} is SUCCESS",
        pointer=True,
        record=lambda v: (_step(v.finished, "combine").task_id, None),
    ),
    Hostile(
        "row 3: a pointer whose names are not its key's",
        lambda v: json.dumps(
            {**_pointer_to(_step(v.started, "combine")), "s3_key": "steps/someone-else.json"}
        ).encode(),
        "dead_letter",
        "is not the payload of step combine (attempt 1)",
        pointer=True,
    ),
    Hostile(
        "row 11: 6 MiB of `{}` items (parsing took 25x its size) is refused before it is parsed",
        lambda v: json.dumps({"s3_bucket": BUCKET, "s3_key": "steps/braces.json"}).encode(),
        "dead_letter",
        "JSON values, over the 1048576 a worker parses",
        objects=lambda v: {
            "steps/braces.json": b'{"task_name": "dagster_taskiq_sync.execute_step", "kwargs": {"pad": ['
            + b"{}," * (2 << 20)
            + b"{}]}}"
        },
        pointer=True,
    ),
]


def _outcome_differs(attack: Hostile, victims: Victims, dead: dict, log: str, sent: dict, store) -> str | None:
    """How the attack's outcome differs from the expected one, or None."""
    says = attack.says(victims) if callable(attack.says) else attack.says
    body = attack.body(victims).decode()
    if attack.outcome == "dead_letter" and says not in dead.get(body, ""):
        return f"expected dead-lettered with {says!r}, got {dead.get(body, 'not dead-lettered')!r}"
    if attack.outcome == "drop":
        [message_id] = [m for m, name in sent.items() if name == attack.name]
        if body in dead or f"dropping message {message_id}" not in log or says not in log:
            return f"expected dropped with {says!r}, got {dead.get(body, 'no drop in the worker log')!r}"
    if attack.record is not None:
        task_id, state = attack.record(victims)
        record = store.read([task_id]).get(task_id)
        if (None if record is None or record.state == QUEUED else record.state) != state:
            return f"expected the attempt's record to be {state}, got {record}"
    return None


def test_the_hostile_corpus_gets_its_expected_outcome_each(endpoint, instance, hostile):
    # Given a finished run, and a STARTED run (a copy of it) with two attempts sent and one running elsewhere
    with execute_job(
        reconstructable(jobs.diamond), instance=instance, run_config={"execution": {"config": hostile.config}}
    ) as done:
        assert done.success
    finished = instance.get_run_by_id(done.run_id)
    victims = Victims(finished.run_id, str(uuid.uuid4()))
    instance.add_run(finished._replace(run_id=victims.started, status=DagsterRunStatus.STARTED))
    store = LivenessStore(instance)
    store.write_queued(
        {_step(victims.started, k).task_id: StepRecord(QUEUED, queue=QUEUE) for k in ("emit_one", "times_ten")}
    )
    add_one = _step(victims.started, "add_one").task_id
    store.write(add_one, StepRecord(RUNNING, worker="elsewhere@h", heartbeat_interval=60))
    s3 = boto3.client("s3", endpoint_url=endpoint.url, region_name="us-east-1")
    client = sqs_client(endpoint.url)

    # When each attack is sent
    sent: dict[str, str] = {}  # message id -> attack
    for attack in CORPUS:
        for key, data in attack.objects(victims).items():
            s3.put_object(Bucket=BUCKET, Key=key, Body=data)
        attrs = {"s3_extended_message": {"DataType": "String", "StringValue": "True"}} if attack.pointer else {}
        answer = client.send_message(
            QueueUrl=hostile.url,
            MessageBody=attack.body(victims).decode(),
            **({"MessageAttributes": attrs} if attrs else {}),
        )
        sent[answer["MessageId"]] = attack.name

    # Then each has its outcome, by name
    expected = sum(a.outcome == "dead_letter" for a in CORPUS)
    dead = drain_dlq(endpoint, hostile.dlq_url, expected, QUEUE, timeout=90, exact=False)  # checked by name below
    bodies = {body: reason for body, reason in dead}
    log = hostile.worker.log()
    wrong = [f"{a.name}: {why}" for a in CORPUS if (why := _outcome_differs(a, victims, bodies, log, sent, store))]
    assert not wrong, "\n".join(wrong)
    assert instance.get_run_by_id(victims.started).status == DagsterRunStatus.STARTED  # no orchestrator was started
    assert not [r for r in instance.all_logs(victims.started) if r.dagster_event and r.dagster_event.is_step_start]
    assert_unharmed(hostile)


def test_a_deleted_offloaded_payload_fails_its_step_promptly(endpoint, instance, hostile, tmp_path):
    # Given a queue that takes 1 KiB, so every step message is offloaded, and no worker on it (yet)
    options = {**hostile.config["config_source"]["broker_transport_options"]}
    options["sqs-creation-attributes"] = {"MaximumMessageSize": "1024"}
    held = {
        **hostile.config,
        "config_source": {"task_default_queue": HELD, "broker_transport_options": options},
    }
    _create(held, tmp_path / "held.yaml", "--no-dead-letter")
    client = sqs_client(endpoint.url)
    held_url = client.get_queue_url(QueueName=HELD)["QueueUrl"]
    # When a real run sends its first step there, and the payload is deleted before a worker reads it
    run = BackgroundRun(jobs.diamond, instance, {"execution": {"config": held}})
    taken: list = []

    def take() -> bool:
        got = client.receive_message(
            QueueUrl=held_url, MaxNumberOfMessages=1, VisibilityTimeout=300, MessageAttributeNames=["All"]
        )
        taken.extend(got.get("Messages", []))
        return bool(taken)

    wait_for(take, timeout=60, what="the run's first step on the held queue")
    [message] = taken
    pointer = json.loads(message["Body"])
    boto3.client("s3", endpoint_url=endpoint.url, region_name="us-east-1").delete_object(
        Bucket=BUCKET, Key=pointer["s3_key"]
    )
    # (the message then reaches a worker as it is, on the worker's queue)
    attrs = {
        k: {"DataType": "String", "StringValue": v["StringValue"]} for k, v in message["MessageAttributes"].items()
    }
    client.send_message(QueueUrl=hostile.url, MessageBody=message["Body"], MessageAttributes=attrs)
    client.delete_message(QueueUrl=held_url, ReceiptHandle=message["ReceiptHandle"])

    # Then the run fails within a health check or two, naming the step and why (it used to wait forever)
    result = run.wait(60)
    [(_, reason)] = drain_dlq(endpoint, hostile.dlq_url, 1, QUEUE)
    assert "cannot be read (NoSuchKey)" in reason
    assert not result.success
    failures = " ".join(
        str(r.dagster_event.event_specific_data)
        for r in instance.all_logs(result.run_id)
        if r.dagster_event and r.dagster_event.is_step_failure
    )
    assert "step emit_one can never run" in failures and "cannot be read (NoSuchKey)" in failures, failures
    assert pointer["names"]["step_key"] == "emit_one"  # because the orchestrator's own pointer names its step


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
    _create(config, base / "signed.yaml", "-q", SIGNED_FIFO)
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
    assert LivenessStore(instance).read([step_task_id(run_id, "emit_one", 2)]) == {}
    assert instance.get_run_by_id(run_id).status == DagsterRunStatus.SUCCESS


def run_with_id(job_fn, instance, run_config: dict, run_id: str):
    """Execute a job as ``execute_job`` does, under a run id chosen in advance (an attacker who
    knows it can compute the old deduplication ids of every step attempt)."""
    from dagster._core.execution.api import execute_run

    recon = reconstructable(job_fn)
    run = instance.create_run_for_job(
        job_def=recon.get_definition(), run_config=run_config, run_id=run_id, job_code_origin=recon.get_python_origin()
    )
    return execute_run(recon, run, instance)


def test_fifo_junk_sent_ahead_under_a_step_deduplication_id_does_not_drop_the_real_step(endpoint, instance, signed):
    # Given junk on a FIFO queue under the deduplication id the first step of a coming run used to get
    # (its task id: run id, step key, attempt), sent by someone who may send but holds no signing key
    run_id = str(uuid.uuid4())
    client = sqs_client(endpoint.url)
    url = client.get_queue_url(QueueName=SIGNED_FIFO)["QueueUrl"]
    junk = {"MessageGroupId": "junk", "MessageDeduplicationId": step_task_id(run_id, "emit_one", 1)}
    client.send_message(QueueUrl=url, MessageBody="junk", **junk)
    # When the run sends its first step there, signed, before any worker consumes the queue (moto
    # remembers a deduplication id only while its message is in the queue; SQS for 5 minutes after)
    config = {**signed.config, "config_source": {**signed.config["config_source"], "task_default_queue": SIGNED_FIFO}}
    outcome: list = []
    thread = threading.Thread(
        target=lambda: outcome.append(run_with_id(jobs.diamond, instance, {"execution": {"config": config}}, run_id)),
        daemon=True,
    )
    thread.start()
    # Then SQS takes the real step next to the junk (it used to drop it as a duplicate: the run hung)
    wait_for(lambda: queue_counts(endpoint.url, SIGNED_FIFO)[0] == 2, timeout=60, what="the real step next to the junk")
    # and once a worker consumes the queue, the junk is dead-lettered and the run succeeds
    worker = WorkerProcess(
        signed.markers / "signed.yaml", "fifo", signed.markers, ["-q", SIGNED_FIFO, "-c", "2"]
    ).wait_ready()
    try:
        thread.join(60)
        assert outcome and outcome[0].success, outcome
    finally:
        assert worker.stop() == 0, worker.log()[-3000:]
    dlq = client.get_queue_url(QueueName=f"{SIGNED}-dlq.fifo")["QueueUrl"]
    assert "not signed" in json.dumps(
        client.receive_message(QueueUrl=dlq, MessageAttributeNames=["All"], WaitTimeSeconds=1)
    ), "junk"


def test_worker_without_keys_warns_that_queue_writers_can_run_steps(hostile):
    assert (
        "no signing key is configured, so anyone who can send to its queues (hostile) can run steps"
        in hostile.worker.log()
    )


@pytest.fixture
def refused_start(monkeypatch):
    """`worker start` in this process (click's runner), for inputs it must refuse before a worker runs."""
    from dagster_taskiq_sync.worker.worker import Worker

    def must_not_start(self, *args, **kwargs):
        raise AssertionError("the worker started: this input should have been refused first")

    monkeypatch.setattr(Worker, "run_until_stopped", must_not_start)
    return run_cli


def test_task_serializer_auth_requires_a_signing_key(endpoint, tmp_path, refused_start):
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
    out = refused_start("worker", "start", "-y", path, "-q", QUEUE)
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
