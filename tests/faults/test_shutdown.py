"""Stopping a worker: signals only recorded by their handler, one deadline that holds even when SQS
is gone."""

from __future__ import annotations

import os
import signal
import time

import yaml

from ..helpers import PausableProxy, WorkerProcess, run_cli


def test_a_burst_of_signals_while_the_worker_is_busy_logging_always_stops_it(run_config_file, queues_created, tmp_path):
    # Given a worker logging everything (DEBUG: botocore, every poll), told to stop by a burst of
    # SIGTERMs and SIGINTs, some landing mid-write of a log line
    worker = WorkerProcess(
        run_config_file,
        "burst",
        tmp_path,
        [
            "-c",
            "1",
            "-l",
            "DEBUG",
            "--debug-logger",
            "botocore",
            "--debug-logger",
            "aiobotocore",
            "--shutdown-timeout",
            "5",
        ],
    )
    worker.wait_ready()
    started = time.monotonic()
    for i in range(40):
        os.kill(worker.pid, signal.SIGTERM if i % 2 else signal.SIGINT)
    # Then it stops within its deadline plus its last long poll (5 s here), cleanly
    assert worker.proc.wait(30) == 0
    assert time.monotonic() - started < 5 + 5 + 10
    log = worker.log()
    assert "received; finishing running steps" in log and "stopped after running 0 step(s)" in log
    assert "reentrant call" not in log and "Traceback" not in log


def test_a_signal_during_start_up_is_not_lost(run_config_file, queues_created, tmp_path):
    # SIGTERM as soon as the signal inbox is installed, while the worker still starts its step children
    worker = WorkerProcess(run_config_file, "early", tmp_path, ["-c", "1"])
    deadline = time.monotonic() + 60
    while "no signing key is configured" not in worker.log() and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(worker.pid, signal.SIGTERM)
    assert worker.proc.wait(60) == 0
    assert "stopped after running 0 step(s)" in worker.log()


def test_the_shutdown_deadline_holds_when_sqs_is_unreachable(endpoint, tmp_path):
    proxy = PausableProxy(endpoint.port)
    config = {"broker": proxy.broker_url, "config_source": {"broker_transport_options": {"wait_time_seconds": 2}}}
    path = tmp_path / "gone.yaml"
    path.write_text(yaml.safe_dump({"execution": {"config": config}}))
    out = run_cli("queues", "create", "-y", str(path))
    assert out.returncode == 0, out.stderr
    worker = WorkerProcess(path, "cut-off", tmp_path, ["-c", "1", "--shutdown-timeout", "3"]).wait_ready()
    try:
        # When SQS goes away and the worker is told to stop
        proxy.pause()
        time.sleep(1)
        started = time.monotonic()
        worker.proc.send_signal(signal.SIGTERM)
        # Then it still exits within its deadline (plus bounded client timeouts), cleanly
        assert worker.proc.wait(60) == 0
        assert time.monotonic() - started < 3 + 2 + 20
        assert "stopped after running 0 step(s)" in worker.log()
    finally:
        if worker.proc.poll() is None:
            worker.proc.kill()
        proxy.close()
