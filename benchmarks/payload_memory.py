"""What a hostile offloaded payload costs a worker in memory (issue 19 row 11): peak resident memory
(VmHWM) of a real worker before and after it handles a 64 MiB payload of `{}` items.

    .venv/bin/python -m benchmarks.payload_memory

A local endpoint on loopback, one `dagster-taskiq-sync worker start -c 1` on a temporary instance,
the payload put in the offload bucket and an unsigned pointer to it sent; the worker's VmHWM is read
from /proc once it has said why the message can never run. Everything stops with the script.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3
import yaml

from dagster_taskiq_sync.ops.local_endpoint import LocalEndpoint, aws_env

PAYLOAD_MIB = 64
BUCKET = "memory-payloads"


def _hwm_mib(pid: int) -> int:
    found = re.search(r"VmHWM:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())
    assert found, "VmHWM not in /proc (Linux only)"
    return int(found.group(1)) // 1024


def _client(service: str, url: str):
    return boto3.client(
        service, endpoint_url=url, region_name="us-east-1", aws_access_key_id="local", aws_secret_access_key="local"
    )


def measure() -> dict[str, float | int | str]:
    base = Path(tempfile.mkdtemp(prefix="payload-memory-"))
    cli = str(Path(sys.executable).with_name("dagster-taskiq-sync"))
    try:
        (base / "home").mkdir()
        (base / "home" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
        with LocalEndpoint(log_path=str(base / "moto.log")) as endpoint:
            env = aws_env(endpoint) | {"DAGSTER_HOME": str(base / "home")}
            config = base / "config.yaml"
            executor = {
                "broker": endpoint.broker_url,
                "backend": f"s3://{BUCKET}/steps",
                "max_payload_mib": PAYLOAD_MIB,
                "config_source": {"task_default_queue": "memory", "broker_transport_options": {"wait_time_seconds": 1}},
            }
            config.write_text(yaml.safe_dump({"execution": {"config": executor}}))
            subprocess.run([cli, "queues", "create", "-y", str(config)], env=env, check=True, capture_output=True)
            log = base / "worker.log"
            with open(log, "wb") as out:
                worker = subprocess.Popen(
                    [cli, "worker", "start", "-y", str(config), "-n", "memory", "-c", "1"],
                    env=env,
                    stdout=out,
                    stderr=out,
                )
            try:
                return _run(endpoint.url, worker, log)
            finally:
                worker.terminate()
                worker.wait(60)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _run(url: str, worker: subprocess.Popen, log: Path) -> dict[str, float | int | str]:
    deadline = time.monotonic() + 120
    while " ready: " not in log.read_text():
        assert worker.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.2)
    before = _hwm_mib(worker.pid)
    items = PAYLOAD_MIB * 2**20 // 3 - 30
    body = b'{"task_name": "dagster_taskiq_sync.execute_step", "kwargs": {"pad": [' + b"{}," * items + b"{}]}}"
    _client("s3", url).put_object(Bucket=BUCKET, Key="steps/braces.json", Body=body)
    sqs = _client("sqs", url)
    sqs.send_message(
        QueueUrl=sqs.get_queue_url(QueueName="memory")["QueueUrl"],
        MessageBody=f'{{"s3_bucket": "{BUCKET}", "s3_key": "steps/braces.json"}}',
        MessageAttributes={"s3_extended_message": {"DataType": "String", "StringValue": "True"}},
    )
    start = time.monotonic()
    while "can never run" not in log.read_text():
        assert worker.poll() is None and time.monotonic() - start < 300, log.read_text()[-2000:]
        time.sleep(0.2)
    after = _hwm_mib(worker.pid)
    reason = next(line for line in log.read_text().splitlines() if "can never run" in line)
    return {
        "payload_mib": round(len(body) / 2**20, 1),
        "vmhwm_before_mib": before,
        "vmhwm_after_mib": after,
        "seconds": round(time.monotonic() - start, 1),
        "reason": reason.split("can never run: ", 1)[1][:120],
    }


if __name__ == "__main__":
    result = measure()
    print(
        f"payload {result['payload_mib']} MiB of {{}} items: worker VmHWM {result['vmhwm_before_mib']} MiB before, "
        f"{result['vmhwm_after_mib']} MiB after (+{int(result['vmhwm_after_mib']) - int(result['vmhwm_before_mib'])} "
        f"MiB) in {result['seconds']} s; dead-lettered: {result['reason']}"
    )
