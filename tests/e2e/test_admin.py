"""Operator commands against the session's local endpoint: `queues create` encryption and payload
expiry, `queues stats`, `queues redrive`, and the encryption of offloaded payloads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import uuid
from pathlib import Path

import boto3
import pytest
import yaml
from dagster import DagsterInstance

from dagster_taskiq_sync.config.celery_compat import settings_from_executor_config
from dagster_taskiq_sync.ops.admin import LIFECYCLE_RULE_ID
from dagster_taskiq_sync.ops.local_endpoint import free_port
from dagster_taskiq_sync.ops.queue_depths import replicas_needed
from dagster_taskiq_sync.storage.registry import WorkerRecord, WorkerRegistry
from dagster_taskiq_sync.wire.bridge import Bridge
from dagster_taskiq_sync.wire.broker_client import BrokerClient
from dagster_taskiq_sync.wire.messages import RunMessage, TaskKind, encode

from ..helpers import CLI, Exporter, WorkerProcess, http_get, metric_samples, run_cli, sqs_client, wait_for


def boto(service: str, endpoint):
    return boto3.client(service, endpoint_url=endpoint.url, region_name="us-east-1")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def write_config(tmp_path, endpoint, **block) -> str:
    """A run-config YAML for the local endpoint with ``block`` merged into `execution: config:`."""
    config = {
        "broker": endpoint.broker_url,
        "config_source": {"broker_transport_options": {"region": "us-east-1", "wait_time_seconds": 1}},
    }
    for key, value in block.items():
        if key == "transport":
            config["config_source"]["broker_transport_options"].update(value)
        elif key == "config_source":
            config["config_source"].update(value)
        else:
            config[key] = value
    path = tmp_path / f"{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump({"execution": {"config": config}}))
    return str(path)


def cli(*args, env=None) -> subprocess.CompletedProcess:
    """The command in this process (click's runner, same endpoint); the console script's own
    handling of bad input is smoke-tested by test_unreadable_yaml_is_one_sentence_from_the_console_script."""
    return run_cli(*args, env=env)


def attributes(endpoint, name: str) -> dict:
    sqs = boto("sqs", endpoint)
    url = sqs.get_queue_url(QueueName=name)["QueueUrl"]
    return sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]


def one_sentence_error(out: subprocess.CompletedProcess) -> str:
    assert out.returncode != 0, out.stdout
    lines = [line for line in out.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    return lines[0]


# --- queues create: encryption and payload expiry -----------------------------------------


def test_create_encrypts_queues_with_sqs_managed_keys_and_expires_offloaded_payloads(endpoint, tmp_path):
    # Given a config with an S3 backend and no KMS key
    queue, bucket = unique("enc"), unique("payloads")
    config = write_config(
        tmp_path, endpoint, backend=f"s3://{bucket}/steps/large", config_source={"task_default_queue": queue}
    )
    # When the queues are created
    out = cli("queues", "create", "-y", config)
    assert out.returncode == 0, out.stderr
    # Then the queue and its dead-letter queue use SQS-managed encryption
    assert attributes(endpoint, queue)["SqsManagedSseEnabled"] == "true"
    assert attributes(endpoint, f"{queue}-dlq")["SqsManagedSseEnabled"] == "true"
    # and the bucket encrypts by default (SSE-S3) and expires the offload prefix after 7 days
    s3 = boto("s3", endpoint)
    default = s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]["Rules"][0]
    assert default["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
    rules = s3.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
    assert [(r["ID"], r["Filter"], r["Expiration"]) for r in rules] == [
        (LIFECYCLE_RULE_ID, {"Prefix": "steps/large/"}, {"Days": 7})
    ]
    assert f"offloaded payloads under s3://{bucket}/steps/large/ expire after 7 day(s)" in out.stdout


def test_create_with_a_kms_key_encrypts_queues_and_bucket_with_it_and_a_rerun_keeps_it(endpoint, tmp_path):
    key = boto("kms", endpoint).create_key()["KeyMetadata"]
    queue, bucket = unique("kms"), unique("payloads")
    config = write_config(tmp_path, endpoint, backend=f"s3://{bucket}/p", config_source={"task_default_queue": queue})
    # Given an existing queue and bucket with other lifecycle rules (created without a key)
    assert cli("queues", "create", "-y", config).returncode == 0
    s3 = boto("s3", endpoint)
    mine = {"ID": "keep-me", "Status": "Enabled", "Filter": {"Prefix": "other/"}, "Expiration": {"Days": 30}}
    s3.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration={"Rules": [mine]})
    # When it is created again with --kms-key and a shorter expiry
    out = cli("queues", "create", "-y", config, "--kms-key", key["Arn"], "--payload-expiry-days", "2")
    assert out.returncode == 0, out.stderr
    # Then both queues switch to the key, the bucket defaults to SSE-KMS with it
    for name in (queue, f"{queue}-dlq"):
        attrs = attributes(endpoint, name)
        assert attrs["KmsMasterKeyId"] == key["Arn"] and attrs.get("SqsManagedSseEnabled") != "true", attrs
    default = s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]["Rules"][0]
    assert default["ApplyServerSideEncryptionByDefault"] == {"SSEAlgorithm": "aws:kms", "KMSMasterKeyID": key["Arn"]}
    # and the user's own lifecycle rule is kept beside ours
    rules = {r["ID"]: r for r in s3.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]}
    assert rules["keep-me"]["Filter"] == {"Prefix": "other/"}
    assert rules[LIFECYCLE_RULE_ID]["Expiration"] == {"Days": 2}
    # and the operator is told the executor needs the key in its config to write payloads with it
    assert "add KmsMasterKeyId" in out.stdout
    # When run again without a key, encryption is not downgraded
    out = cli("queues", "create", "-y", config)
    assert out.returncode == 0, out.stderr
    assert attributes(endpoint, queue)["KmsMasterKeyId"] == key["Arn"]
    assert f"kept its KMS key {key['Arn']}" in out.stdout
    assert "updated" not in out.stdout  # nothing else changed either (the redrive policy compares as JSON)
    assert "except queues that kept their KMS key" in out.stdout
    default = s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]["Rules"][0]
    assert default["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "aws:kms"


def test_kms_key_from_sqs_creation_attributes_is_used_by_create(endpoint, tmp_path):
    kms = boto("kms", endpoint)
    key = kms.create_key()["KeyMetadata"]
    kms.create_alias(AliasName=f"alias/{unique('dagster')}", TargetKeyId=key["KeyId"])
    queue = unique("cfgkms")
    config = write_config(
        tmp_path,
        endpoint,
        config_source={"task_default_queue": queue},
        transport={"sqs-creation-attributes": {"KmsMasterKeyId": key["KeyId"]}},
    )
    out = cli("queues", "create", "-y", config)
    assert out.returncode == 0, out.stderr
    assert attributes(endpoint, queue)["KmsMasterKeyId"] == key["KeyId"]
    assert f"KMS key {key['KeyId']}: {key['Arn']} (Enabled)" in out.stdout


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--kms-key", "not a key!"], "--kms-key 'not a key!' is not a KMS key; pass a key id"),
        (
            ["--kms-key", "00000000-0000-0000-0000-000000000000"],
            "--kms-key '00000000-0000-0000-0000-000000000000' is not usable at http://127.0.0.1",
        ),
        (["--kms-key", "alias/no-such-alias"], "is not usable at"),
        (["--payload-expiry-days", "0"], "--payload-expiry-days 0 must be a whole number of days of at least 1"),
        (["--payload-expiry-days", "-3"], "--payload-expiry-days -3 must be a whole number of days of at least 1"),
    ],
)
def test_create_refuses_garbage_in_one_sentence(endpoint, tmp_path, args, expected):
    queue = unique("garbage")
    config = write_config(
        tmp_path, endpoint, backend=f"s3://{unique('b')}/p", config_source={"task_default_queue": queue}
    )
    line = one_sentence_error(cli("queues", "create", "-y", config, *args))
    assert expected in line, line
    # nothing was created on the way to the error
    with pytest.raises(Exception, match="NonExistentQueue|QueueDoesNotExist"):
        boto("sqs", endpoint).get_queue_url(QueueName=queue)


def test_a_disabled_kms_key_is_refused(endpoint, tmp_path):
    kms = boto("kms", endpoint)
    key = kms.create_key()["KeyMetadata"]["KeyId"]
    kms.disable_key(KeyId=key)
    config = write_config(tmp_path, endpoint, config_source={"task_default_queue": unique("disabled")})
    line = one_sentence_error(cli("queues", "create", "-y", config, "--kms-key", key))
    assert f"--kms-key {key!r} is Disabled" in line and "enable it or pass another key" in line


def test_kms_key_flag_and_config_must_agree(endpoint, tmp_path):
    config = write_config(tmp_path, endpoint, transport={"sqs-creation-attributes": {"KmsMasterKeyId": "alias/a"}})
    line = one_sentence_error(cli("queues", "create", "-y", config, "--kms-key", "alias/b"))
    assert "differs from sqs-creation-attributes.KmsMasterKeyId 'alias/a'" in line


def test_unreadable_yaml_is_one_sentence_from_the_console_script(tmp_path):
    # Every command's unreadable YAML runs through click's runner in tests/unit/test_cli_validation.py;
    # this is the real console script's exit code and stderr for one of them.
    bad = tmp_path / "bad.yaml"
    bad.write_text("execution: [unclosed")
    out = subprocess.run([CLI, "queues", "stats", "-y", str(bad)], capture_output=True, text=True, timeout=60)
    line = one_sentence_error(out)
    assert "is not valid YAML" in line and "fix the file" in line, line


# --- offloaded payloads are written encrypted -----------------------------------------------


@pytest.mark.parametrize("with_kms", [False, True], ids=["sse-s3", "sse-kms"])
def test_offloaded_payloads_are_written_with_server_side_encryption(endpoint, tmp_path, with_kms):
    queue, bucket = unique("offload"), unique("payloads")
    key = boto("kms", endpoint).create_key()["KeyMetadata"]["Arn"] if with_kms else None
    transport = {"sqs-creation-attributes": {"MaximumMessageSize": "1024", **({"KmsMasterKeyId": key} if key else {})}}
    config = write_config(
        tmp_path,
        endpoint,
        backend=f"s3://{bucket}/offload",
        config_source={"task_default_queue": queue},
        transport=transport,
    )
    assert cli("queues", "create", "-y", config).returncode == 0
    settings = settings_from_executor_config(yaml.safe_load(open(config))["execution"]["config"])
    with Bridge() as bridge, BrokerClient(settings.sqs, bridge, [queue]) as client:
        # a real message: with its attribute allowance it is more than the queue's 1024 bytes
        message = RunMessage(TaskKind.RUN, str(uuid.uuid4()), "launch")
        url = client.send(queue=queue, task_id=message.task_id, body=encode(message, queue))
    assert url == f"s3://{bucket}/offload/{message.task_id}.json"
    head = boto("s3", endpoint).head_object(Bucket=bucket, Key=f"offload/{message.task_id}.json")
    if with_kms:
        assert (head["ServerSideEncryption"], head["SSEKMSKeyId"]) == ("aws:kms", key)
    else:
        assert head["ServerSideEncryption"] == "AES256"


def test_create_brings_queues_to_1_mib_messages_and_stats_shows_each_queues_limit(endpoint, tmp_path):
    # Given a queue and its dead-letter queue created with SQS's old 256 KiB default
    queue = unique("size")
    sqs = boto("sqs", endpoint)
    for name in (queue, f"{queue}-dlq"):
        sqs.create_queue(QueueName=name, Attributes={"MaximumMessageSize": "262144"})
    small = unique("small")  # and a queue whose config asks for less
    config = write_config(tmp_path, endpoint, config_source={"task_default_queue": queue})
    config_small = write_config(
        tmp_path,
        endpoint,
        config_source={"task_default_queue": small},
        transport={"sqs-creation-attributes": {"MaximumMessageSize": "262144"}},
    )
    # When the queues are created
    out = cli("queues", "create", "-y", config)
    assert out.returncode == 0, out.stderr
    assert cli("queues", "create", "-y", config_small).returncode == 0
    # Then both accept 1 MiB inline (the report says what changed), and a config's own size wins
    assert "MaximumMessageSize 262144 -> 1048576" in out.stdout
    assert attributes(endpoint, queue)["MaximumMessageSize"] == "1048576"
    assert attributes(endpoint, f"{queue}-dlq")["MaximumMessageSize"] == "1048576"
    assert attributes(endpoint, small)["MaximumMessageSize"] == "262144"
    assert attributes(endpoint, f"{small}-dlq")["MaximumMessageSize"] == "1048576"
    # and `queues stats` shows each queue's limit
    out = cli("queues", "stats", "-y", config, "-q", queue, "-q", small, "--json")
    assert out.returncode == 0, out.stderr
    sizes = {q["queue"]: q["max_message_size"] for q in json.loads(out.stdout)["queues"]}
    assert sizes == {queue: 1_048_576, small: 262_144}
    out = cli("queues", "stats", "-y", config, "-q", small)
    assert next(line for line in out.stdout.splitlines() if line.startswith(small)).split()[4:6] == ["256", "KiB"]


# --- queues stats ----------------------------------------------------------------------------


def test_replicas_formula():
    assert replicas_needed(0, 0, 4) == 0
    assert replicas_needed(1, 0, 4) == 1
    assert replicas_needed(7, 2, 4) == 3  # ceil(9 / 4)
    assert replicas_needed(8, 0, 4) == 2


def fill_queue(endpoint, queue: str, *, visible: int, in_flight: int, delayed: int, dead: int) -> None:
    """Put messages in each state: in flight ones are received and held, dead ones sit in the DLQ."""
    sqs = sqs_client(endpoint.url)
    url = sqs.get_queue_url(QueueName=queue)["QueueUrl"]
    for i in range(visible + in_flight):
        sqs.send_message(QueueUrl=url, MessageBody=f"m{i}")
    held = 0
    while held < in_flight:
        held += len(
            sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=in_flight - held, VisibilityTimeout=600).get(
                "Messages", []
            )
        )
    for i in range(delayed):
        sqs.send_message(QueueUrl=url, MessageBody=f"d{i}", DelaySeconds=900)
    dlq = sqs.get_queue_url(QueueName=f"{queue}-dlq")["QueueUrl"]
    for i in range(dead):
        sqs.send_message(QueueUrl=dlq, MessageBody=f"x{i}")


@pytest.fixture
def registry_home(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    return home


def test_stats_json_counts_messages_dead_letters_workers_and_replicas(endpoint, tmp_path, registry_home):
    queue = unique("stats")
    config = write_config(
        tmp_path, endpoint, config_source={"task_default_queue": queue, "worker_prefetch_multiplier": 2}
    )
    assert cli("queues", "create", "-y", config).returncode == 0
    fill_queue(endpoint, queue, visible=5, in_flight=2, delayed=1, dead=3)
    # Given a real worker (-c 3) on another queue and a registry record of a busy worker on ours
    assert cli("queues", "create", "-y", config, "-q", "elsewhere-" + queue).returncode == 0
    worker = WorkerProcess(
        config,
        "stats-real",
        tmp_path,
        ["-c", "3", "-q", "elsewhere-" + queue],
        env=os.environ | {"DAGSTER_HOME": str(registry_home)},
    )
    try:
        worker.wait_ready()
        with DagsterInstance.from_config(str(registry_home)) as instance:
            registry = WorkerRegistry(instance)
            busy = WorkerRecord(
                name="busy@host", host="host", pid=1, queues=[queue], concurrency=4, running=["a", "b", "c"]
            )

            def both_listed() -> bool:
                # The registry's index is read-modify-write: a live worker re-adds itself on its next
                # heartbeat, but this one-shot record can lose a race with the real worker's first
                # one (seen in a loaded full run), so it is written until both are listed.
                names = {w.name for w in registry.workers()}
                if busy.name not in names:
                    registry.record(busy)
                return {busy.name, worker.full_name} <= names

            wait_for(both_listed, timeout=60, what="both workers in the registry")
        env = os.environ | {"DAGSTER_HOME": str(registry_home)}
        out = cli("queues", "stats", "-y", config, "--json", env=env)
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout)
    finally:
        assert worker.stop() == 0
    by_queue = {q["queue"]: q for q in doc["queues"]}
    # Then the default queue and the queue the live worker consumes are both shown
    assert set(by_queue) == {queue, "elsewhere-" + queue}
    ours = by_queue[queue]
    assert (ours["visible"], ours["in_flight"], ours["delayed"]) == (5, 2, 1)
    assert (ours["dead_letter_queue"], ours["dead_letter_depth"]) == (f"{queue}-dlq", 3)
    assert ours["live_workers"] == 1 and ours["free_slots"] == 1  # 4 - 3 running
    # target = the live worker's concurrency 4 x prefetch 2; ceil((5 + 2) / 8) = 1
    assert (ours["target_backlog_per_worker"], ours["replicas_needed"]) == (8, 1)
    other = by_queue["elsewhere-" + queue]
    assert other["live_workers"] == 1 and other["free_slots"] == 3  # the real worker: -c 3, idle
    assert other["workers"][0]["name"].startswith("stats-real@")
    assert doc["notes"] == []


def test_stats_table_without_dagster_home_says_workers_are_unknown(endpoint, tmp_path):
    queue = unique("table")
    config = write_config(tmp_path, endpoint, config_source={"task_default_queue": queue, "worker_concurrency": 2})
    assert cli("queues", "create", "-y", config).returncode == 0
    fill_queue(endpoint, queue, visible=5, in_flight=0, delayed=0, dead=1)
    env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"}
    out = cli("queues", "stats", "-y", config, "--target-backlog-per-worker", "2", env=env)
    assert out.returncode == 0, out.stderr
    row = next(line for line in out.stdout.splitlines() if line.startswith(queue))
    assert row.split() == [queue, "5", "0", "0", "1", "MiB", f"{queue}-dlq:", "1", "?", "?", "2", "3"]
    assert "replicas = ceil((visible + in flight) / target)" in out.stdout
    assert "DAGSTER_HOME is not set, so live workers and free slots are unknown" in out.stdout
    # Without --target-backlog-per-worker the target is worker_concurrency x prefetch
    out = cli("queues", "stats", "-y", config, "--json", env=env)
    stats = json.loads(out.stdout)["queues"][0]
    assert (stats["target_backlog_per_worker"], stats["replicas_needed"], stats["workers"]) == (2, 3, None)


def test_stats_of_a_missing_queue_names_it_and_exits_1(endpoint, tmp_path):
    config = write_config(tmp_path, endpoint)
    out = cli("queues", "stats", "-y", config, "-q", "no-such-queue-here", "--json")
    assert out.returncode == 1
    stats = json.loads(out.stdout)["queues"][0]
    assert "SQS queue 'no-such-queue-here' does not exist" in stats["error"] and "queues create" in stats["error"]


def test_stats_with_lanes_show_one_pool_per_queue_and_its_lane(endpoint, tmp_path, registry_home):
    # Given lanes, a live worker (-c 2) of -q Q (so Q and Q-bulk), 3 interactive and 3 bulk messages
    queue = unique("pool")
    config = write_config(tmp_path, endpoint, lanes=True, config_source={"task_default_queue": queue})
    assert cli("queues", "create", "-y", config).returncode == 0
    lane = f"{queue}-bulk"
    for name in (queue, lane):
        fill_queue(endpoint, name, visible=3, in_flight=0, delayed=0, dead=0)
    with DagsterInstance.from_config(str(registry_home)) as instance:
        # (a heartbeat interval long enough that the record stays live however slow this run is)
        worker = WorkerRecord(
            "pool@host", "host", 1, [queue, lane], concurrency=2, running=["a"], heartbeat_interval=60
        )
        WorkerRegistry(instance).record(worker)
    env = os.environ | {"DAGSTER_HOME": str(registry_home)}
    out = cli("queues", "stats", "-y", config, env=env)
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines() if line.startswith(queue)}
    # Then the queue's row counts both backlogs: ceil((3 + 3) / 2) replicas, its one worker and 1 free slot
    assert rows[queue][-4:] == ["1", "1", "2", "3"]
    # and the lane's row shows its own depth and says its workers, slots and replicas are the queue's
    assert rows[lane][1:4] == ["3", "0", "0"]
    assert f"bulk lane of {queue}: same workers and slots, replicas counted there" in " ".join(rows[lane])
    assert f"replicas = ceil((visible + in flight) / target), for {queue} with its bulk lane's messages" in out.stdout
    doc = {q["queue"]: q for q in json.loads(cli("queues", "stats", "-y", config, "--json", env=env).stdout)["queues"]}
    assert (doc[queue]["replicas_needed"], doc[queue]["lane"]) == (3, lane)
    assert (doc[lane]["replicas_needed"], doc[lane]["lane_of"]) == (None, queue)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_stats_watch_reprints_until_ctrl_c(endpoint, tmp_path, signum):
    queue = unique("watch")
    config = write_config(tmp_path, endpoint, config_source={"task_default_queue": queue})
    assert cli("queues", "create", "-y", config).returncode == 0
    proc = subprocess.Popen(
        [CLI, "queues", "stats", "-y", config, "--watch", "0.2", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first = json.loads(proc.stdout.readline())
        sqs_client(endpoint.url).send_message(QueueUrl=first["queues"][0]["url"], MessageBody="new")

        def saw_the_new_message():
            return json.loads(proc.stdout.readline())["queues"][0]["visible"] == 1

        wait_for(saw_the_new_message, timeout=30, what="a later print showing the new message")
    finally:
        proc.send_signal(signum)
        code = proc.wait(20)
    assert code == 0, proc.stderr.read()
    assert first["queues"][0]["visible"] == 0


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--watch", "0"], "--watch 0 must be a positive number of seconds"),
        (["--watch", "-1"], "--watch -1 must be a positive number of seconds"),
        (["--target-backlog-per-worker", "0"], "--target-backlog-per-worker 0 must be a whole number of at least 1"),
    ],
)
def test_stats_refuses_garbage(endpoint, tmp_path, args, expected):
    out = cli("queues", "stats", "-y", write_config(tmp_path, endpoint), *args)
    assert out.returncode == 2 and expected in out.stderr, out.stderr


def test_serve_exports_the_queues_numbers_and_scrapes_within_the_cache_period_share_a_reading(endpoint, tmp_path):
    queue = f"served-{uuid.uuid4().hex[:6]}"
    config = Path(write_config(tmp_path, endpoint, config_source={"task_default_queue": queue}))
    sqs = sqs_client(endpoint.url)  # the queues as `queues create` makes them, without a second CLI start
    dlq_url = sqs.create_queue(QueueName=f"{queue}-dlq")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    redrive = json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "5"})
    sqs.create_queue(QueueName=queue, Attributes={"RedrivePolicy": redrive})
    fill_queue(endpoint, queue, visible=3, in_flight=1, delayed=0, dead=1)
    port = free_port()
    exporter = Exporter(config, port, "--cache-seconds", "30")
    try:
        status, text = http_get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200
        found = metric_samples(text)
        q = (("queue", queue),)
        assert found[("dagster_taskiq_queue_messages_visible", q)] == 3
        assert found[("dagster_taskiq_queue_messages_in_flight", q)] == 1
        assert found[("dagster_taskiq_queue_dead_letter_messages", (("dead_letter_queue", f"{queue}-dlq"), *q))] == 1
        # the session's DAGSTER_HOME: a readable registry in which no worker consumes this queue
        assert found[("dagster_taskiq_queue_live_workers", q)] == found[("dagster_taskiq_queue_free_slots", q)] == 0
        assert found[("dagster_taskiq_queue_replicas_needed", q)] == 4  # ceil((3 + 1) / (1 x 1))
        assert found[("dagster_taskiq_queue_readable", q)] == 1
        # Within --cache-seconds a scrape gets the same reading: SQS is not read again
        sqs.send_message(QueueUrl=sqs.get_queue_url(QueueName=queue)["QueueUrl"], MessageBody="d")
        again = metric_samples(http_get(f"http://127.0.0.1:{port}/metrics")[1])
        assert again[("dagster_taskiq_queue_messages_visible", q)] == 3
        read = "dagster_taskiq_queue_stats_read_seconds", ()
        assert again[read] == found[read]
        assert http_get(f"http://127.0.0.1:{port}/readyz") == (200, "ok\n")
    finally:
        assert exporter.stop() == 0, exporter.log()


# --- queues redrive ---------------------------------------------------------------------------


def test_redrive_moves_dead_lettered_messages_back_with_body_and_attributes(endpoint, tmp_path):
    # Given messages SQS itself dead-lettered (maxReceiveCount 1, received twice)
    queue = unique("redrive")
    config = write_config(tmp_path, endpoint, config_source={"task_default_queue": queue})
    assert cli("queues", "create", "-y", config, "--max-receive-count", "1").returncode == 0
    sqs = sqs_client(endpoint.url)
    url = sqs.get_queue_url(QueueName=queue)["QueueUrl"]
    dlq = sqs.get_queue_url(QueueName=f"{queue}-dlq")["QueueUrl"]
    pointer = {"s3_extended_message": {"DataType": "String", "StringValue": "True"}}
    for i in range(3):
        sqs.send_message(QueueUrl=url, MessageBody=json.dumps({"n": i}), MessageAttributes=pointer)

    def all_dead_lettered():
        sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, VisibilityTimeout=0)
        return (
            int(
                sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["ApproximateNumberOfMessages"])["Attributes"][
                    "ApproximateNumberOfMessages"
                ]
            )
            == 3
        )

    wait_for(all_dead_lettered, timeout=30, what="SQS's redrive policy to dead-letter the messages")
    # When one is redriven, then the rest
    out = cli("queues", "redrive", queue, "-y", config, "--max", "1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"moved 1 message(s) from {queue}-dlq back to {queue} (2 left in {queue}-dlq)"
    out = cli("queues", "redrive", queue, "-y", config)
    assert out.returncode == 0, out.stderr
    assert f"moved 2 message(s) from {queue}-dlq back to {queue} (0 left" in out.stdout
    # Then the source queue holds the three messages, bodies and attributes intact, with a fresh receive count
    received = []
    while len(received) < 3:
        received += sqs.receive_message(
            QueueUrl=url,
            MaxNumberOfMessages=10,
            MessageAttributeNames=["All"],
            AttributeNames=["ApproximateReceiveCount"],
        ).get("Messages", [])
    assert sorted(json.loads(m["Body"])["n"] for m in received) == [0, 1, 2]
    for message in received:
        assert message["MessageAttributes"]["s3_extended_message"]["StringValue"] == "True"
        assert message["Attributes"]["ApproximateReceiveCount"] == "1"


def test_redrive_a_fifo_queue_keeps_message_groups(endpoint, tmp_path):
    queue = unique("redrive") + ".fifo"
    config = write_config(tmp_path, endpoint, config_source={"task_default_queue": queue})
    assert cli("queues", "create", "-y", config).returncode == 0
    sqs = sqs_client(endpoint.url)
    base = queue[: -len(".fifo")]
    dlq = sqs.get_queue_url(QueueName=f"{base}-dlq.fifo")["QueueUrl"]
    for i, group in enumerate(["run-a", "run-b"]):
        # the same deduplication id the original send used: a redrive must not be swallowed by it
        sqs.send_message(
            QueueUrl=dlq, MessageBody=f"step-{i}", MessageGroupId=group, MessageDeduplicationId=f"step-{i}"
        )
    out = cli("queues", "redrive", queue, "-y", config)
    assert out.returncode == 0, out.stderr
    assert "moved 2 message(s)" in out.stdout
    url = sqs.get_queue_url(QueueName=queue)["QueueUrl"]
    received = sqs.receive_message(
        QueueUrl=url, MaxNumberOfMessages=10, MessageSystemAttributeNames=["MessageGroupId"]
    )["Messages"]
    assert sorted((m["Body"], m["Attributes"]["MessageGroupId"]) for m in received) == [
        ("step-0", "run-a"),
        ("step-1", "run-b"),
    ]


def test_redrive_refuses_unknown_queues_and_queues_without_dead_letter_queue(endpoint, tmp_path):
    queue = unique("nodlq")
    config = write_config(tmp_path, endpoint, config_source={"task_default_queue": queue})
    assert cli("queues", "create", "-y", config, "--no-dead-letter").returncode == 0
    line = one_sentence_error(cli("queues", "redrive", queue, "-y", config))
    assert f"SQS queue {queue!r} has no dead-letter queue" in line and "without --no-dead-letter" in line
    line = one_sentence_error(cli("queues", "redrive", "never-created", "-y", config))
    assert "SQS queue 'never-created' does not exist" in line and "check the queue name" in line
    out = cli("queues", "redrive", queue, "-y", config, "--max", "0")
    assert out.returncode == 2 and "--max 0 must be a whole number of at least 1" in out.stderr
