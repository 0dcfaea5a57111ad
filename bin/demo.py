"""The demo behind `bin/demo`: a local SQS endpoint, two workers, one fan-out/fan-in run.

Everything it starts (endpoint, workers) is stopped before it exits, and the endpoint and
workers die with it if it is killed. Exit code: 0 if the run succeeded, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dagster_taskiq_sync.ops.local_endpoint import LocalEndpoint, aws_env, free_port  # noqa: E402

JOB_FILE = ROOT / "examples" / "demo_repo.py"
JOB_NAME = "fan_out_fan_in"
BIN = Path(sys.executable).parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0, help="endpoint port (default: a free one)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=2, help="steps at once per worker")
    parser.add_argument("--workdir", default=str(ROOT / ".demo"))
    opts = parser.parse_args()

    workdir = Path(opts.workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    (workdir / "home").mkdir(parents=True)
    (workdir / "home" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")  # sqlite instance

    endpoint = LocalEndpoint(opts.port or free_port(), log_path=str(workdir / "endpoint.log"))
    config = workdir / "run_config.yaml"
    config.write_text(
        "execution:\n"
        "  config:\n"
        f'    broker: "{endpoint.broker_url}"\n'
        "    config_source:\n"
        "      broker_transport_options: {region: us-east-1}\n"
    )
    env = aws_env(endpoint) | {"DAGSTER_HOME": str(workdir / "home")}
    workers: list[subprocess.Popen[bytes]] = []
    try:
        endpoint.start()
        print(f"local SQS/S3 endpoint: {endpoint.url}")
        _run([BIN / "dagster-taskiq-sync", "queues", "create", "-y", config], env)
        for n in range(1, opts.workers + 1):
            log = open(workdir / f"worker-{n}.log", "wb")
            workers.append(
                subprocess.Popen(
                    [
                        BIN / "dagster-taskiq-sync",
                        "worker",
                        "start",
                        "-y",
                        config,
                        "-n",
                        f"demo-{n}",
                        "-c",
                        str(opts.concurrency),
                    ],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        for n in range(1, opts.workers + 1):
            _wait_ready(workdir / f"worker-{n}.log", workers[n - 1])
        print(f"{opts.workers} workers ready (logs in {workdir}/worker-N.log)")

        command = [BIN / "dagster", "job", "execute", "-f", JOB_FILE, "-j", JOB_NAME, "-c", config]
        print("$ dagster job execute -f examples/demo_repo.py -j fan_out_fan_in -c run_config.yaml")
        started = time.monotonic()
        with open(workdir / "run.log", "wb") as run_log:
            subprocess.run(command, env=env, stdout=run_log, stderr=subprocess.STDOUT, timeout=300)
        wall = time.monotonic() - started
        return _report(workdir, env, wall)
    finally:
        for proc in workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in workers:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        endpoint.stop()


def _run(command, env) -> None:
    out = subprocess.run([str(c) for c in command], env=env, capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, command))} failed:\n{out.stderr}")
    sys.stdout.write(out.stdout)


def _wait_ready(log_path: Path, proc, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if " ready: " in log_path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise SystemExit(f"worker exited at start:\n{log_path.read_text(errors='replace')}")
        time.sleep(0.1)
    raise SystemExit(f"worker not ready after {timeout:g} s; see {log_path}")


def _report(workdir: Path, env: dict[str, str], wall: float) -> int:
    os.environ["DAGSTER_HOME"] = env["DAGSTER_HOME"]
    from dagster import DagsterInstance, DagsterRunStatus

    from dagster_taskiq_sync.storage.run_report import step_reports

    with DagsterInstance.get() as instance:
        runs = instance.get_runs(limit=1)
        if not runs:
            print(f"no run was recorded; see {workdir}/run.log")
            return 1
        run = runs[0]
        reports = step_reports(instance, run.run_id)
        print(f"\nrun {run.run_id} ({run.job_name}):")
        print(f"  {'step':<16} {'worker':<18} {'pid':>7} {'seconds':>8}  status")
        for rep in sorted(reports.values(), key=lambda r: (r.started or 0, r.step_key)):
            secs = f"{rep.seconds:.2f}" if rep.seconds is not None else "-"
            print(f"  {rep.step_key:<16} {rep.worker or '-':<18} {rep.pid or '-':>7} {secs:>8}  {rep.status}")
            for message in rep.messages:
                print(f"      {message}")
        print(f"\nrun status: {run.status.value} in {wall:.1f} s (dagster job execute, start to end)")
        return 0 if run.status == DagsterRunStatus.SUCCESS else 1


if __name__ == "__main__":
    sys.exit(main())
