"""Sized pools on real workers: steps routed by their ecs/* and dagster-k8s/config tags run only on
their pool's workers (execution.config.routes)."""

from __future__ import annotations

import json

import yaml
from click.testing import CliRunner
from dagster import DagsterEventType, execute_job, reconstructable

from dagster_taskiq_sync import cli
from dagster_taskiq_sync.storage.run_report import step_reports

from .. import jobs
from ..helpers import WorkerProcess

ROUTES = [
    {
        "queue": "big",
        "when": {"ecs/memory": ">= 8192", "k8s/memory": ">= 8Gi"},
        "max": {"memory": "64Gi"},
    }
]


def test_routed_steps_run_only_on_their_pools_workers(endpoint, instance, executor_config, workers, tmp_path):
    # Given a routing table sending steps of 8 GiB and more to `big` (at most 64 GiB each)
    transport = {**executor_config["config_source"]["broker_transport_options"], "wait_time_seconds": 1}
    config = {**executor_config, "config_source": {"broker_transport_options": transport}, "routes": ROUTES}
    path = tmp_path / "routes.yaml"
    path.write_text(yaml.safe_dump({"execution": {"config": config}}))
    # and the queues `queues create` makes from it: the routed one too (the commands run in this
    # process, through click's runner: the console script's start-up is not what is tested here)
    out = CliRunner().invoke(cli.main, ["queues", "create", "-y", str(path)], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    assert "queue big -> SQS big" in out.output and "dead-letter queue big-dlq" in out.output
    # (which `queues stats` shows and `iam-policy` covers without being told)
    out = CliRunner().invoke(cli.main, ["queues", "stats", "-y", str(path), "--json"], catch_exceptions=False)
    assert [q["queue"] for q in json.loads(out.stdout)["queues"]][:2] == ["dagster", "big"], out.output
    policy = ["iam-policy", "-y", str(path), "--role", "worker", "--account-id", "123456789012"]
    out = CliRunner().invoke(cli.main, policy, catch_exceptions=False)
    assert "arn:aws:sqs:us-east-1:123456789012:big" in out.output, out.output
    # and a pool of its own on `big`, beside the shared pool on the default queue
    big = WorkerProcess(path, "bigpool", tmp_path, ["-q", "big", "-c", "2"]).wait_ready()
    try:
        # When a job with big, small, pinned and too-big steps runs
        result = execute_job(
            reconstructable(jobs.sized),
            instance=instance,
            run_config={"execution": {"config": config}},
            raise_on_error=False,
        )
    finally:
        assert big.stop() == 0
    reports = step_reports(instance, result.run_id)
    shared = {w.full_name for w in workers}
    # Then the big steps ran on the big pool's worker, and every other step on the shared pool
    assert {reports[s].worker for s in ("big_by_ecs_tag", "big_by_k8s_tag")} == {big.full_name}
    for step in ("big_but_pinned", "small_by_ecs_tag", "emit_one", "add_one"):
        assert reports[step].worker in shared, (step, reports[step].worker)
    succeeded = {r.step_key for r in instance.all_logs(result.run_id, of_type=DagsterEventType.STEP_SUCCESS)}
    assert succeeded == {
        "big_by_ecs_tag",
        "big_by_k8s_tag",
        "big_but_pinned",
        "small_by_ecs_tag",
        "emit_one",
        "add_one",
    }
    # and the run's events say where each routed step went, one line each
    lines = sorted(
        r.dagster_event.message
        for r in instance.all_logs(result.run_id, of_type=DagsterEventType.ENGINE_EVENT)
        if (r.dagster_event.message or "").startswith("step ")
    )
    assert lines == [
        "step big_by_ecs_tag -> queue big: ecs/memory 16384 >= 8192",
        "step big_by_k8s_tag -> queue big: k8s/memory 16Gi >= 8Gi",
    ]
    # and the step no pool can hold failed at once with a sentence, never queued (so the run failed)
    assert not result.success
    [failure] = instance.all_logs(result.run_id, of_type=DagsterEventType.STEP_FAILURE)
    assert failure.step_key == "larger_than_every_pool"
    assert failure.dagster_event.step_failure_data.error.message == (
        "step larger_than_every_pool is larger than any worker pool takes: it matches queue big (ecs/memory "
        "262144 >= 8192) but memory 256Gi, over its max 64Gi (execution.config.routes[0].max); raise that max "
        "(or add a route with a larger pool), or lower the op's size tag."
    )
    assert "larger_than_every_pool" not in reports or reports["larger_than_every_pool"].worker is None
