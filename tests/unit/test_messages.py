"""The wire contract (messages.py): every field checked before use, signing, S3 pointers.

Pure functions over bytes: these run in milliseconds, next to the end-to-end hostile-message tests
(tests/e2e/test_hostile_messages.py) that throw the same garbage at real workers.
"""

from __future__ import annotations

import json

import pytest

from dagster_taskiq_sync._dagster.names import KnownExecutionState, serialize_value
from dagster_taskiq_sync.errors import ConfigError
from dagster_taskiq_sync.wire.messages import (
    MESSAGE_VERSION,
    SIGNATURE_ATTRIBUTE,
    Keyring,
    MalformedMessage,
    RunMessage,
    SignatureError,
    StepMessage,
    TaskKind,
    count_values,
    decode,
    encode,
    max_values,
    queue_for_tags,
)
from dagster_taskiq_sync.wire.payloads import check_payload, decode_pointer, pointer_for

pytestmark = pytest.mark.compat  # the tier bin/matrix runs on every env

RUN_ID = "0b6f9c7e-6a43-4c1e-9d55-3c2f9a1d2b10"
STATE = serialize_value(KnownExecutionState())
KEY = "k" * 40
OLD_KEY = "o" * 40


def step_body(**kwargs_override) -> bytes:
    body = json.loads(encode(StepMessage(RUN_ID, "emit_one", 1, STATE), "dagster"))
    body["kwargs"].update(kwargs_override)
    return json.dumps(body).encode()


def test_step_and_run_messages_round_trip():
    step = StepMessage(RUN_ID, "graph.op[key_1]", 3, serialize_value(KnownExecutionState({"graph.op[key_1]": 2})))
    assert decode(encode(step, "dagster")) == step
    for message in (RunMessage(TaskKind.RUN, RUN_ID, "launch"), RunMessage(TaskKind.RESUME, RUN_ID, "resume-2")):
        assert decode(encode(message, "runs")) == message


@pytest.mark.parametrize(
    "body, reason",
    [
        (b"", "not JSON"),
        (b"this is not json {", "not JSON"),
        (step_body()[:40], "not JSON"),  # truncated
        (step_body()[::-1], "not JSON"),  # reversed
        (b"[1, 2, 3]", "not a JSON object"),
        (b"[" * 100_000, "not JSON"),  # nesting bomb
        (json.dumps({"task_name": "someone.elses.task", "kwargs": {}}).encode(), "unknown task 'someone.elses.task'"),
        (json.dumps({"task_name": ["x"], "kwargs": {}}).encode(), "unknown task"),
    ],
    ids=["empty", "garbage", "truncated", "reversed", "array", "nesting", "other-task", "task-name-list"],
)
def test_undecodable_bodies_are_malformed(body, reason):
    with pytest.raises(MalformedMessage) as info:
        decode(body)
    assert reason in info.value.reason


@pytest.mark.parametrize(
    "field, value, reason",
    [
        ("version", 1, "version 1, and this worker reads version 2"),
        ("version", 3, "version 3"),
        ("version", True, "version True"),
        ("version", "2", "version '2'"),
        ("run_id", 5, "run_id is missing or malformed"),
        ("run_id", "../../etc", "run_id is missing or malformed"),
        ("run_id", "x" * 300, "run_id is missing or malformed"),
        ("step_key", None, "step_key is missing or malformed"),
        ("step_key", "op; rm -rf /", "step_key is missing or malformed"),
        ("step_key", "emit_one\n", "step_key is missing or malformed"),  # `$` alone would take it
        ("run_id", "5f4e7a1c-aaaa-bbbb-cccc-0123456789ab\n", "run_id is missing or malformed"),
        ("attempt", "1", "attempt is not a whole number"),
        ("attempt", True, "attempt is not a whole number"),
        ("attempt", 0, "attempt is not a whole number"),
        ("attempt", 2, "disagrees with its known_state"),
        ("known_state", {}, "known_state is missing"),
        ("known_state", '{"__class__": "ExecuteStepArgs"}', "not a Dagster execution state"),
        ("known_state", "not json", "not a Dagster execution state"),
        ("instance_ref", {"module": "os"}, "fields this version does not define"),
        ("execute_step_args", "...", "fields this version does not define"),
    ],
)
def test_every_step_field_is_checked(field, value, reason):
    with pytest.raises(MalformedMessage) as info:
        decode(step_body(**{field: value}))
    assert reason in info.value.reason


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"task_id": 123}, "task_id does not match"),
        ({"task_id": "someone-elses-id"}, "task_id does not match"),
        ({"kwargs": "run it"}, "no kwargs object"),
        ({"args": ["os.system"]}, "positional args"),
        ({"labels": "x"}, None),  # labels are only read for signed messages' queue check
    ],
)
def test_top_level_fields_of_wrong_type(change, reason):
    body = json.loads(step_body())
    body.update(change)
    if reason is None:
        assert decode(json.dumps(body).encode()).step_key == "emit_one"
        return
    with pytest.raises(MalformedMessage) as info:
        decode(json.dumps(body).encode())
    assert reason in info.value.reason


def test_run_messages_accept_only_launch_labels():
    body = json.loads(encode(RunMessage(TaskKind.RUN, RUN_ID, "launch"), "runs"))
    for launch in ("resume-1", "launch; x", 7):
        bad = json.loads(json.dumps(body))
        bad["kwargs"]["launch"] = launch
        with pytest.raises(MalformedMessage):
            decode(json.dumps(bad).encode())


def test_queue_tags_route_with_the_taskiq_alias_first():
    assert queue_for_tags({}, "dagster") == "dagster"
    assert queue_for_tags({"dagster-celery/queue": "a"}, "dagster") == "a"
    assert queue_for_tags({"dagster-celery/queue": "a", "dagster-taskiq/queue": "b"}, "dagster") == "b"


# --- signing -------------------------------------------------------------------------------------------


def test_signed_messages_verify_and_every_change_is_caught():
    ring = Keyring.from_secrets(KEY)
    body = step_body()
    attributes = ring.sign(body)
    ring.verify(body, attributes)  # no exception
    for i in range(0, len(body), max(1, len(body) // 40)):  # flip a byte anywhere: rejected
        tampered = body[:i] + bytes([body[i] ^ 0x01]) + body[i + 1 :]
        with pytest.raises(SignatureError):
            ring.verify(tampered, attributes)
    version, key_id, digest = attributes[SIGNATURE_ATTRIBUTE].split(":")
    for bad in (f"{version}:{key_id}:{'0' * 64}", f"v9:{key_id}:{digest}", "garbage", ""):
        with pytest.raises(SignatureError):
            ring.verify(body, {SIGNATURE_ATTRIBUTE: bad})
    with pytest.raises(SignatureError, match="not signed"):
        ring.verify(body, {})


def test_key_rotation_accepts_the_previous_key_and_refuses_unknown_ones():
    old, new = Keyring.from_secrets(OLD_KEY), Keyring.from_secrets(KEY, (OLD_KEY,))
    body = step_body()
    new.verify(body, old.sign(body))  # signed by a sender not yet rotated: accepted
    new.verify(body, new.sign(body))
    with pytest.raises(SignatureError, match="does not hold"):
        Keyring.from_secrets(KEY).verify(body, Keyring.from_secrets("u" * 40).sign(body))
    assert not Keyring().verifies and Keyring().sign(body) == {}


def test_short_keys_are_refused_naming_the_setting():
    with pytest.raises(ConfigError, match="execution.config.signing_key is 6 characters"):
        Keyring.from_secrets("secret", setting="execution.config.signing_key")


# --- S3 pointers -----------------------------------------------------------------------------------------


def test_pointers_are_confined_to_the_configured_bucket_and_prefix():
    good = pointer_for("payloads", "steps", "abc-123", b"x" * 10)
    assert decode_pointer(good.encode(), "payloads", "steps", 1024) == good
    cases = [
        (json.dumps({"s3_bucket": "other", "s3_key": "steps/a.json"}), "names bucket 'other'"),
        (json.dumps({"s3_bucket": "payloads", "s3_key": "elsewhere/a.json"}), "not under the offload prefix"),
        (json.dumps({"s3_bucket": "payloads", "s3_key": "steps/../../a"}), "not under the offload prefix"),
        (json.dumps({"s3_bucket": "payloads", "s3_key": 7}), "not under the offload prefix"),
        (json.dumps({"s3_bucket": "payloads", "s3_key": "steps/a.json", "size": 10**9}), "over the 1024-byte limit"),
        (json.dumps({"s3_bucket": "payloads", "s3_key": "steps/a.json", "sha256": "zz"}), "sha256 is malformed"),
        ("not json", "not a JSON object"),
    ]
    for body, reason in cases:
        with pytest.raises(MalformedMessage) as info:
            decode_pointer(body.encode(), "payloads", "steps", 1024)
        assert reason in info.value.reason
    with pytest.raises(MalformedMessage, match="no offload bucket"):
        decode_pointer(good.encode(), None, "", 1024)


def test_fetched_payloads_must_match_their_pointer():
    pointer = pointer_for("payloads", "", "abc", b"payload")
    check_payload(pointer, b"payload", signed=True)
    with pytest.raises(MalformedMessage, match="does not match the SHA-256"):
        check_payload(pointer, b"swapped", signed=False)
    unhashed = decode_pointer(json.dumps({"s3_bucket": "payloads", "s3_key": "a.json"}).encode(), "payloads", "", 99)
    check_payload(unhashed, b"anything", signed=False)  # taskiq-aio-sqs's own pointers, unsigned
    with pytest.raises(MalformedMessage, match="without the payload's SHA-256"):
        check_payload(unhashed, b"anything", signed=True)


@pytest.mark.parametrize(
    "message",
    [StepMessage(RUN_ID, "fan_in", 3, STATE), RunMessage(TaskKind.RESUME, RUN_ID, "resume-2")],
    ids=["step", "resume"],
)
def test_a_pointer_names_the_message_of_its_payload(message):
    # Given the payload a sender offloads (issue 19 row 3: a payload that is gone must still fail its step)
    payload = encode(message, "dagster")
    pointer = pointer_for("payloads", "steps", message.task_id, payload)
    # Then its pointer names the run, step and attempt (or launch), without the known_state
    assert pointer.names is not None and pointer.names.task_id == message.task_id
    assert "known_state" not in pointer.encode().decode()
    assert decode_pointer(pointer.encode(), "payloads", "steps", 1 << 20) == pointer
    # and a pointer whose names are not its key's, or are malformed, is refused
    data = json.loads(pointer.encode())
    other = {**data, "names": {**data["names"], "run_id": "another-run"}}
    bad = {**data, "names": {**data["names"], "run_id": "../x"}}
    for body, reason in [(other, "is not the payload of"), (bad, "run_id is missing or malformed")]:
        with pytest.raises(MalformedMessage, match=reason):
            decode_pointer(json.dumps(body).encode(), "payloads", "steps", 1 << 20)
    # a body that is not one of ours names nothing (taskiq-aio-sqs's own pointers name nothing either)
    assert pointer_for("payloads", "steps", "abc", b"[1, 2]").names is None


def test_json_values_are_counted_before_a_body_is_parsed():
    # Given the payload of issue 19 row 11 (`{}` items: ~25x their size once parsed), 8 MiB of it
    import tracemalloc

    hostile = b'{"task_name": "dagster_taskiq_sync.execute_step", "kwargs": {"pad": [' + b"{}," * (8 << 18) + b"{}]}}"
    limit = max_values(64 << 20)
    assert limit == 1 << 20 and max_values(128 << 20) == 2 << 20  # 16,384 per MiB of max_payload_mib
    tracemalloc.start()
    try:
        with pytest.raises(
            MalformedMessage, match=f"holds up to {count_values(hostile)} JSON values, over the {limit}"
        ):
            decode(hostile, limit)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20  # refused without parsing: not even a copy of the body (was ~200 MiB for 8 MiB)
    # and a genuine fan-in after a 10,000-way fan-out is well within the default limit
    keys = [f"key_{i}" for i in range(10_000)]
    state = KnownExecutionState(dynamic_mappings={"fan_out": {"result": keys}})
    genuine = encode(StepMessage(RUN_ID, "fan_in", 1, serialize_value(state)), "dagster")
    assert decode(genuine, limit).step_key == "fan_in" and count_values(genuine) < limit // 50


def test_fifo_deduplication_ids_are_keyed_or_random_never_the_task_id():
    # Issue 19 row 7: junk sent first under a deterministic id would make SQS drop the real message
    task_id = StepMessage(RUN_ID, "emit_one", 1, STATE).task_id
    signed, other = Keyring.from_secrets(KEY), Keyring.from_secrets(OLD_KEY)
    assert signed.dedup_id(task_id) == signed.dedup_id(task_id)  # a sender's own retry is still deduplicated
    assert signed.dedup_id(task_id) not in (task_id, other.dedup_id(task_id))
    assert len(signed.dedup_id(task_id)) <= 128  # SQS's limit
    unsigned = Keyring()
    assert len({unsigned.dedup_id(task_id) for _ in range(3)} | {task_id}) == 4  # random without a key


def test_message_version_is_the_one_documented():
    assert MESSAGE_VERSION == 2


def test_transient_is_decided_by_the_aws_error_code_never_by_text_an_attacker_chose():
    from botocore.exceptions import ClientError

    from dagster_taskiq_sync.errors import BrokerError
    from dagster_taskiq_sync.wire.broker_client import translate_error
    from dagster_taskiq_sync.wire.settings import SQSSettings
    from dagster_taskiq_sync.worker.transient import is_transient

    settings = SQSSettings()

    def answered(code: str, message: str, status: int) -> BaseException:
        error = {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}}
        return translate_error(ClientError(error, "GetObject"), settings, "reading the offloaded payload", "q")

    # an attacker's S3 key or message text naming a transient code is still the message's fault
    named = answered("NoSuchKey", "steps/ServiceUnavailable-SlowDown-Throttling.json does not exist", 404)
    assert isinstance(named, BrokerError) and named.code == "NoSuchKey" and not is_transient(named)
    assert not is_transient(BrokerError("reading s3://b/steps/InternalError.json failed: ServiceUnavailable"))
    # what S3 and SQS answer when busy is retried
    assert is_transient(answered("SlowDown", "Please reduce your request rate.", 503))
    assert is_transient(answered("RequestThrottled", "", 400))
    assert is_transient(answered("WhateverNewCode", "", 500))  # any 5xx is the service's
    assert not is_transient(answered("InvalidParameterValue", "ThrottlingException", 400))


def test_keys_never_show_in_reprs_and_a_non_ascii_signature_is_a_bad_signature():
    from dagster_taskiq_sync.wire.messages import SIGNATURE_ATTRIBUTE, Keyring, SignatureError, key_id
    from dagster_taskiq_sync.wire.settings import Settings

    secret, old = "k" * 40 + "-current", "o" * 40 + "-previous"
    keyring = Keyring.from_secrets(secret, (old,))
    for shown in (repr(keyring), repr(Settings(keyring=keyring)), str(Settings(keyring=keyring))):
        assert secret not in shown and old not in shown and key_id(secret.encode()) in shown
    # a signature that is not ASCII is refused as a bad signature (compare_digest would raise TypeError)
    body = b'{"x": 1}'
    prefix = keyring.sign(body)[SIGNATURE_ATTRIBUTE].rsplit(":", 1)[0]
    with pytest.raises(SignatureError, match="does not match its body"):
        keyring.verify(body, {SIGNATURE_ATTRIBUTE: prefix + ":" + "é" * 64})


def test_debug_logging_keeps_the_aws_libraries_at_warning_unless_named(monkeypatch):
    import logging

    from dagster_taskiq_sync.cli import QUIET_LOGGERS, configure_logging

    names = ("dagster_taskiq_sync", "dagster", *QUIET_LOGGERS)
    saved = {name: logging.getLogger(name).level for name in names}
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # basicConfig configures afresh
    monkeypatch.setattr(logging.getLogger(), "level", logging.WARNING)
    try:
        configure_logging(logging.DEBUG)
        assert logging.getLogger("dagster_taskiq_sync.worker").isEnabledFor(logging.DEBUG)
        for name in ("botocore.endpoint", "botocore.credentials", "aiobotocore.credentials", "urllib3"):
            assert not logging.getLogger(name).isEnabledFor(logging.INFO), name
        configure_logging(logging.DEBUG, ["botocore"])  # asked for by name
        assert logging.getLogger("botocore.endpoint").isEnabledFor(logging.DEBUG)
        assert not logging.getLogger("aiobotocore").isEnabledFor(logging.INFO)
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def test_a_dead_letter_copy_stays_within_what_sqs_accepts():
    from dagster_taskiq_sync.wire.deliveries import DEAD_LETTER_REASON_ATTRIBUTE, dead_letter_attributes
    from dagster_taskiq_sync.wire.messages import S3_POINTER_ATTRIBUTE, SIGNATURE_ATTRIBUTE

    # a hostile sender's message: 10 attributes (the most SQS takes), some Binary (read as ""),
    # one reserved name, and our own two
    original = {f"junk{i}": "x" for i in range(6)} | {"bin1": "", "bin2": "", "AWS.TraceHeader": "t"}
    original |= {SIGNATURE_ATTRIBUTE: "v1:abc:def", S3_POINTER_ATTRIBUTE: "True"}
    copy = dead_letter_attributes(original, "the message is not JSON", body_bytes=1000)
    assert len(copy) <= 10 and all(a["StringValue"] for a in copy.values())
    assert copy[DEAD_LETTER_REASON_ATTRIBUTE]["StringValue"] == "the message is not JSON"
    assert copy[SIGNATURE_ATTRIBUTE]["StringValue"] == "v1:abc:def" and S3_POINTER_ATTRIBUTE in copy
    assert "AWS.TraceHeader" not in copy and "bin1" not in copy
    # a body at the size limit keeps the reason and drops what does not fit
    full = dead_letter_attributes({"big": "y" * 500}, "r" * 5000, body_bytes=262_144 - 1100)
    assert (
        set(full) == {DEAD_LETTER_REASON_ATTRIBUTE} and len(full[DEAD_LETTER_REASON_ATTRIBUTE]["StringValue"]) == 1000
    )


def test_a_dead_letter_copy_of_a_large_inline_message_keeps_its_signature_on_a_1_mib_queue():
    from dagster_taskiq_sync.wire.deliveries import dead_letter_attributes
    from dagster_taskiq_sync.wire.messages import SIGNATURE_ATTRIBUTE

    # a 900 KB message, inline on a queue that accepts 1 MiB: its copy must stay redrivable
    original = {SIGNATURE_ATTRIBUTE: "v1:abc:def"}
    copy = dead_letter_attributes(original, "no such run", body_bytes=900_000, limit=1_048_576)
    assert copy[SIGNATURE_ATTRIBUTE]["StringValue"] == "v1:abc:def"
    # measured against 256 KiB (a queue that says no more) there is no room for it
    assert SIGNATURE_ATTRIBUTE not in dead_letter_attributes(original, "no such run", body_bytes=262_100)
