"""The processes bin/bench measures: each contender's broker server and worker, its orchestrating
process (benchmarks/orchestrator.py), and the Dagster instances (DAGSTER_HOMEs) they share."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from .bench_plan import CLI_WORKER, CONCURRENCY, EMBEDDED, log
from .bench_probes import RequestCounter, RunProbes
from .jobs import workload_spec
from .services import BIN, ROOT, ServiceError, Services, _die_with_parent, postgres_server, redis_server, wait_until

QUEUES = {CLI_WORKER: "bench", EMBEDDED: "bench_embedded"}  # each worker is named after its queue


class Orchestrator:
    """A contender's own orchestrating process (benchmarks/orchestrator.py), driven over pipes."""

    def __init__(self, services: Services, contender: str, home: Path, env: dict[str, str]) -> None:
        self.contender = contender
        self.log_path = services.workdir / f"orchestrator-{contender}-{home.name}.log"
        log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.orchestrator", contender, str(home)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log_file,
            env=env,
            cwd=ROOT,
            preexec_fn=_die_with_parent,
            text=True,
        )
        log_file.close()
        services._procs.append((f"orchestrator-{contender}", self.proc))
        self._read(120)

    def _read(self, timeout: float) -> dict[str, Any]:
        import select

        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise ServiceError(
                f"the {self.contender} orchestrator did not answer within {timeout:g} s "
                f"(exit code {self.proc.poll()}); see {self.log_path}"
            )
        return json.loads(line)

    def run(self, workload: str, run_config: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        if timeout is None:  # generous: a stuck run still ends the bench, a slow contender does not
            timeout = 900 + 3 * workload_spec(workload).steps
        self.proc.stdin.write(json.dumps({"workload": workload, "run_config": run_config}) + "\n")
        self.proc.stdin.flush()
        answer = self._read(timeout)
        if "error" in answer:
            raise RuntimeError(f"the {self.contender} orchestrator failed running {workload}:\n{answer['error']}")
        return answer


class Fleet:
    """Every contender's servers and workers on this machine, and the run config that reaches them.

    The brokers (a local SQS endpoint, behind a counting proxy unless ``--no-request-count``;
    Redis) are started once per invocation; the workers once per storage, on that storage's
    DAGSTER_HOME."""

    def __init__(self, opts: argparse.Namespace, workdir: Path) -> None:
        self.opts = opts
        self.workdir = workdir
        self.services = Services(workdir)
        self.env = dict(os.environ)
        self.env.update(
            {
                "AWS_ACCESS_KEY_ID": "local",
                "AWS_SECRET_ACCESS_KEY": "local",
                "AWS_DEFAULT_REGION": "us-east-1",
                "PYTHONPATH": str(ROOT),
                "DAGSTER_DISABLE_TELEMETRY": "1",
                "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            }
        )
        os.environ.update(
            {k: self.env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
        )
        self.run_config: dict[str, dict[str, Any]] = {
            "multiprocess": {"execution": {"config": {"max_concurrent": CONCURRENCY}}},
            "in_process": {},
        }
        self.worker_pids: dict[str, int] = {}
        self.endpoint = None
        self.counter: RequestCounter | None = None
        self.broker_pids: dict[str, int] = {}
        self.redis_port: int | None = None

    # -- brokers --

    def start_brokers(self) -> None:
        if CLI_WORKER in self.opts.contenders or EMBEDDED in self.opts.contenders:
            self._start_sqs()
        if "celery" in self.opts.contenders:
            self._start_redis()

    def _start_sqs(self) -> None:
        from dagster_taskiq_sync.ops.local_endpoint import LocalEndpoint

        self.endpoint = LocalEndpoint(log_path=str(self.workdir / "sqs-endpoint.log")).start()
        log(f"local SQS endpoint {self.endpoint.url}")
        embedded = (f"{EMBEDDED}_orchestrator", f"{EMBEDDED}_worker") if EMBEDDED in self.opts.contenders else ()
        sides = dict.fromkeys((*RequestCounter.SIDES, *embedded), self.endpoint.port)
        if self.opts.count_requests:
            # The embedded worker goes through the proxy too (same path as the CLI worker's), on
            # ports of its own whose counts are not reported.
            self.counter = RequestCounter(self.services, self.endpoint.port, embedded)
            sides = self.counter.ports
            log("SQS request counter: " + ", ".join(f"{side} -> 127.0.0.1:{port}" for side, port in sides.items()))
        for contender in (c for c in (CLI_WORKER, EMBEDDED) if c in self.opts.contenders):
            # Each worker its own queue (both are up while either contender runs), same settings.
            prefix = "" if contender == CLI_WORKER else f"{EMBEDDED}_"
            queue = QUEUES[contender]
            self.broker_pids[contender] = self.endpoint._proc.pid
            self.run_config[contender] = self._taskiq_config(self.endpoint.port, queue)
            self._write_config(contender)  # direct: queue creation is not counted
            self._cli(BIN / "dagster-taskiq-sync", "queues", "create", "-y", self.workdir / f"{contender}.yaml")
            self.run_config[contender] = self._taskiq_config(sides[f"{prefix}orchestrator"], queue)
            worker_config = self._taskiq_config(sides[f"{prefix}worker"], queue)
            (self.workdir / f"{contender}-worker.yaml").write_text(yaml.safe_dump(worker_config))

    def _start_redis(self) -> None:
        redis = redis_server(self.services)
        self.run_config["celery"] = {
            "execution": {
                "config": {
                    "broker": f"{redis}/0",
                    "backend": f"{redis}/1",
                }
            }
        }
        self._write_config("celery")
        self.broker_pids["celery"] = next(proc.pid for name, proc in self.services._procs if name == "redis")
        self.redis_port = int(redis.rsplit(":", 1)[1])
        log(f"redis {redis}")

    @staticmethod
    def _taskiq_config(port: int, queue: str) -> dict[str, Any]:
        return {
            "execution": {
                "config": {
                    "broker": f"sqs://127.0.0.1:{port}",
                    # Backfill runs' steps on the bulk lane (bench-bulk): interactive runs first.
                    "lanes": True,
                    "config_source": {
                        "broker_transport_options": {"region": "us-east-1"},
                        "task_default_queue": queue,
                    },
                }
            }
        }

    def _write_config(self, contender: str) -> None:
        (self.workdir / f"{contender}.yaml").write_text(yaml.safe_dump(self.run_config[contender]))

    def _cli(self, *command) -> None:
        out = subprocess.run([str(c) for c in command], env=self.env, capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise ServiceError(f"{' '.join(map(str, command))} failed:\n{out.stderr}")

    # -- one storage's instance, workers and orchestrators --

    def make_home(self, storage: str) -> Path:
        home = self.workdir / f"home-{storage}"
        home.mkdir()
        config: dict[str, Any] = {"telemetry": {"enabled": False}}
        if storage == "postgres":
            db = postgres_server(self.services)
            db["password"] = "postgres"  # trust auth on loopback; dagster-postgres wants a value
            # SQLAlchemy 2.1 defaults postgresql:// to psycopg 3, which dagster-postgres' NOTIFY
            # statement does not work with; name the psycopg2 driver dagster-postgres installs.
            db["scheme"] = "postgresql+psycopg2"
            config["storage"] = {"postgres": {"postgres_db": db}}
            log(f"postgres on 127.0.0.1:{db['port']}")
        (home / "dagster.yaml").write_text(yaml.safe_dump(config))
        return home

    def start_workers(self, home: Path) -> list:
        env = self.env | {"DAGSTER_HOME": str(home)}
        started = []
        if CLI_WORKER in self.opts.contenders:
            started.append(self._start_taskiq_worker(home, env))
        if EMBEDDED in self.opts.contenders:
            started.append(self._start_embedded_host(home, env))
        if "celery" in self.opts.contenders:
            started.append(self._start_celery_worker(home, env))
        return started

    def _start_taskiq_worker(self, home: Path, env: dict[str, str]) -> subprocess.Popen:
        proc, log_path = self.services.spawn(
            f"taskiq-worker-{home.name}",
            [
                BIN / "dagster-taskiq-sync",
                "worker",
                "start",
                "-y",
                self.workdir / "taskiq-worker.yaml",
                "-c",
                str(CONCURRENCY),
                "-n",
                QUEUES[CLI_WORKER],
                "-i",
                "benchmarks.jobs",
            ],
            env=env,
        )
        wait_until(lambda: " ready: " in log_path.read_text(errors="replace"), proc, "taskiq worker", log_path)
        self.worker_pids["taskiq"] = proc.pid
        return proc

    def _start_embedded_host(self, home: Path, env: dict[str, str]) -> subprocess.Popen:
        """benchmarks/embedded_host.py: a plain Python process (the pid the probes read: the
        worker's threads, its fork server and step children are that process and its tree)."""
        config = self.workdir / f"{EMBEDDED}-worker.yaml"
        proc, log_path = self.services.spawn(
            f"{EMBEDDED}-host-{home.name}",
            [sys.executable, "-m", "benchmarks.embedded_host", config, QUEUES[EMBEDDED], CONCURRENCY, QUEUES[EMBEDDED]],
            env=env,
        )
        wait_until(lambda: "host ready: " in log_path.read_text(errors="replace"), proc, "embedded worker", log_path)
        self.worker_pids[EMBEDDED] = proc.pid
        return proc

    def _start_celery_worker(self, home: Path, env: dict[str, str]) -> subprocess.Popen:
        proc, log_path = self.services.spawn(
            f"celery-worker-{home.name}",
            [
                BIN / "dagster-celery",
                "worker",
                "start",
                "-A",
                "dagster_celery.app",
                "-y",
                self.workdir / "celery.yaml",
                "-n",
                "bench@%h",
                "-i",
                "benchmarks.jobs",
                "--",
                "-c",
                str(CONCURRENCY),
                "--without-gossip",
                "--without-mingle",
            ],
            env=env,
        )
        wait_until(lambda: "ready." in log_path.read_text(errors="replace"), proc, "dagster-celery worker", log_path)
        self.worker_pids["celery"] = proc.pid
        return proc

    def orchestrators(self, home: Path) -> dict[str, Orchestrator]:
        env = self.env | {"DAGSTER_HOME": str(home)}
        return {c: Orchestrator(self.services, c, home, env) for c in self.opts.contenders}

    def stop(self, orchestrators: dict[str, Orchestrator], workers: list) -> None:
        """Stop one storage's orchestrators and workers (the brokers stay up for the next)."""
        for orchestrator in orchestrators.values():
            orchestrator.proc.stdin.close()
            self.services.stop(orchestrator.proc)
        for proc in workers:
            self.services.stop(proc)

    def probes(self, contender: str) -> RunProbes:
        """The readings around one timed run of ``contender`` (its worker, broker, proxy, Redis)."""
        return RunProbes(
            self.worker_pids.get(contender),
            self.broker_pids.get(contender),
            self.counter if contender == CLI_WORKER else None,  # the embedded worker's are not reported
            self.redis_port if contender == "celery" else None,
        )

    def close(self) -> None:
        """Stop every process the bench started, last started first, and the SQS endpoint."""
        self.services.close()
        if self.endpoint is not None:
            self.endpoint.stop()
