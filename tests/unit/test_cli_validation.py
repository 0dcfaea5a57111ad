"""The command line's validation paths, through click's runner in this process: a bad flag or a
bad config file ends the command with one sentence (exit 2 for a flag click refuses, 1 for a
setting) before anything starts. No worker may start here: ``Worker.run_until_stopped`` fails the
test if a case gets that far. The real console script is smoke-tested in tests/e2e/test_bad_input.
"""

from __future__ import annotations

import logging

import pytest
from click.testing import CliRunner

from dagster_taskiq_sync import cli
from dagster_taskiq_sync.config.worker_config import WorkerConfig
from dagster_taskiq_sync.errors import ConfigError
from dagster_taskiq_sync.worker.worker import Worker


@pytest.fixture
def run_cli(monkeypatch):
    def must_not_start(self, *args, **kwargs):
        raise AssertionError("the worker started: this input should have been refused first")

    monkeypatch.setattr(Worker, "run_until_stopped", must_not_start)
    # `worker start` sets library loggers' levels; keep this process's as they were.
    saved = {name: logging.getLogger(name).level for name in (*cli.QUIET_LOGGERS, "")}
    try:
        runner = CliRunner(mix_stderr=False)  # click < 8.2 mixes stderr into stdout by default
    except TypeError:
        runner = CliRunner()  # click >= 8.2 always keeps them apart

    def run(*args, env=None):
        result = runner.invoke(cli.main, [str(a) for a in args], env=env, catch_exceptions=False)
        return result.exit_code, result.stderr

    yield run
    for name, level in saved.items():
        logging.getLogger(name).setLevel(level)


def one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, stderr
    return errors[0]


@pytest.mark.parametrize(
    "content, expected",
    [
        ("execution: [1, 2", "is not valid YAML"),
        ("execution:\n  config:\n    broker: 'amqp://x'\n", "scheme 'amqp://'"),
        ("execution:\n  config:\n    brokr: 'sqs://'\n", "the execution config is invalid"),
        (
            "execution:\n  config:\n    config_source:\n      worker_prefetch_multiplier: lots\n",
            "worker_prefetch_multiplier must be a whole number",
        ),
        (
            "execution:\n  config:\n    config_source:\n      worker_max_tasks_per_child: 0\n",
            "worker_max_tasks_per_child",
        ),
        (
            "execution:\n  config:\n    config_source:\n      worker_max_memory_per_child: lots\n",
            "worker_max_memory_per_child must be a whole number",
        ),
    ],
)
def test_worker_start_refuses_a_bad_config_yaml_in_one_sentence(run_cli, tmp_path, content, expected):
    config = tmp_path / "cfg.yaml"
    config.write_text(content)
    code, stderr = run_cli("worker", "start", "-y", config)
    assert code == 1
    assert expected in one_error_line(stderr)


@pytest.mark.parametrize(
    "args, code, expected",
    [
        (["-y", "{tmp}/nope.yaml"], 1, "cannot be read"),
        (["-c", "0"], 2, "--concurrency"),
        (["--max-tasks-per-child", "0"], 2, "--max-tasks-per-child"),
        (
            ["--", "--max-memory-per-child", "lots"],
            2,
            "--max-memory-per-child 'lots' after '--' must be a whole number",
        ),
        (["--", "--autoscale", "4,2"], 2, "--autoscale"),
        (["-i", "no_such_module_xyz"], 1, "'no_such_module_xyz' cannot be imported"),
        (["--metrics-port", "-1"], 2, "--metrics-port"),
        (["--step-niceness", "20"], 2, "--step-niceness"),
        (["--step-niceness", "low"], 2, "--step-niceness"),
        (["--bulk-yield", "-1"], 2, "--bulk-yield"),
        (["--bulk-yield", "nan"], 1, "bulk_yield nan must be a number of seconds from 0 to 60"),
    ],
    ids=[
        "missing-file",
        "concurrency-0",
        "max-tasks-0",
        "celery-memory-garbage",
        "celery-unknown",
        "include",
        "port",
        "niceness-20",
        "niceness-garbage",
        "bulk-yield-negative",
        "bulk-yield-nan",
    ],
)
def test_worker_start_refuses_bad_flags_in_one_sentence(run_cli, tmp_path, args, code, expected):
    got, stderr = run_cli("worker", "start", *(a.format(tmp=tmp_path) for a in args))
    assert got == code, stderr
    assert expected in one_error_line(stderr)


def test_worker_list_without_dagster_home_says_what_to_set(run_cli):
    code, stderr = run_cli("worker", "list", env={"DAGSTER_HOME": None})
    assert code == 1 and "set DAGSTER_HOME" in one_error_line(stderr)


def test_a_bad_routing_table_stops_worker_start_and_queues_create_in_one_sentence(run_cli, tmp_path):
    config = tmp_path / "cfg.yaml"
    config.write_text("execution:\n  config:\n    routes:\n      - queue: big\n        when: {ecs/memory: '>= 8Gi'}\n")
    expected = (
        "execution.config.routes[0].when.ecs/memory is '>= 8Gi': '8Gi' is not MiB, e.g. 8192 or '8 GB'; fix the value."
    )
    for command in (("worker", "start"), ("queues", "create")):
        code, stderr = run_cli(*command, "-y", config)
        assert code == 1 and expected in one_error_line(stderr), stderr


def test_unreadable_yaml_is_one_sentence_for_the_new_commands(run_cli, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("execution: [unclosed")
    for args in (["queues", "stats"], ["queues", "redrive", "dagster"], ["iam-policy"], ["queues", "create"]):
        code, stderr = run_cli(*args, "-y", bad)
        line = one_error_line(stderr)
        assert code == 1 and len(stderr.strip().splitlines()) == 1, stderr
        assert "is not valid YAML" in line and "fix the file" in line, line
        code, stderr = run_cli(*args, "-y", tmp_path / "missing.yaml")
        line = one_error_line(stderr)
        assert code == 1 and len(stderr.strip().splitlines()) == 1, stderr
        assert "cannot be read" in line, line


def test_with_lanes_a_queue_named_like_a_bulk_lane_stops_each_command_in_one_sentence(run_cli, tmp_path):
    lanes = tmp_path / "lanes.yaml"
    lanes.write_text("execution:\n  config:\n    lanes: true\n")
    for command in (("worker", "start"), ("queues", "create"), ("iam-policy", "--account-id", "123456789012")):
        code, stderr = run_cli(*command, "-y", lanes, "-q", "dagster-bulk")
        assert code == 1 and "-q 'dagster-bulk' ends in '-bulk'" in one_error_line(stderr), stderr
    named = tmp_path / "named.yaml"
    named.write_text("execution:\n  config:\n    lanes: true\n    config_source: {task_default_queue: reports-bulk}\n")
    for command in (("worker", "start"), ("queues", "create"), ("queues", "stats")):
        code, stderr = run_cli(*command, "-y", named)
        line = one_error_line(stderr)
        assert code == 1 and "execution.config.config_source.task_default_queue 'reports-bulk'" in line, stderr


@pytest.mark.parametrize("value", [-1, 20, 2.5, True, "5"])
def test_an_embedded_workers_step_niceness_must_be_0_to_19(value):
    with pytest.raises(ConfigError, match=r"step_niceness .* must be a whole number from 0 to 19"):
        WorkerConfig.from_yaml(None, queues=["dagster"], step_niceness=value)


@pytest.mark.parametrize("value", [-0.1, 61, float("nan"), True, "0.5"])
def test_an_embedded_workers_bulk_yield_must_be_0_to_60_seconds(value):
    with pytest.raises(ConfigError, match=r"bulk_yield .* must be a number of seconds from 0 to 60"):
        WorkerConfig.from_yaml(None, queues=["dagster"], bulk_yield=value)
