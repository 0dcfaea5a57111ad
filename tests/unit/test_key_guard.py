"""Keeping the signing keys from step code (worker/key_guard.py): the rules, in milliseconds.

The attack itself, on real workers, is tests/e2e/test_step_key_access.py.
"""

from __future__ import annotations

import os
import pwd

import pytest
from dagster import job, op, validate_run_config

from dagster_taskiq_sync import taskiq_executor
from dagster_taskiq_sync.config.celery_compat import settings_from_executor_config
from dagster_taskiq_sync.config.worker_config import key_environment
from dagster_taskiq_sync.errors import ConfigError
from dagster_taskiq_sync.wire.messages import Keyring
from dagster_taskiq_sync.worker.key_guard import StepUser, encode_key_environment
from dagster_taskiq_sync.worker.step_child import TASKIQ_EXECUTOR

KEY = "k" * 40
OLD = "o" * 40
UNSET = "DTS_TEST_NEVER_SET_KEY"


@op
def noop() -> None:
    pass


@job(executor_def=taskiq_executor)
def signed_job():
    noop()


def test_a_run_config_naming_an_unset_key_variable_still_checks_in_a_step_child():
    # Given a run config whose key comes from a variable that a step child's environment lacks
    assert UNSET not in os.environ
    config = {"execution": {"config": {"signing_key": {"env": UNSET}, "previous_signing_keys": [{"env": UNSET}]}}}
    # When Dagster checks and resolves it (as a step child does, before running its step)
    resolved = validate_run_config(signed_job, config)
    # Then it passes, with the variable left unread: only the executor reads it, when it is built
    assert resolved["execution"]["taskiq"]["signing_key"] == {"env": UNSET}


def test_the_executor_reads_the_key_variable_when_it_is_built(monkeypatch):
    monkeypatch.setenv("DTS_TEST_KEY", KEY)
    settings = settings_from_executor_config({"signing_key": {"env": "DTS_TEST_KEY"}, "previous_signing_keys": [OLD]})
    assert settings.keyring.current == KEY.encode() and settings.keyring.previous == (OLD.encode(),)
    with pytest.raises(ConfigError) as err:
        settings_from_executor_config({"signing_key": {"env": UNSET}})
    assert str(err.value) == (
        f"execution.config.signing_key is {{env: {UNSET}}}, which is not set in this process's environment; set {UNSET}."
    )


def test_the_variables_to_scrub_are_those_named_and_any_holding_a_key():
    block = {"signing_key": {"env": "CURRENT"}, "previous_signing_keys": [{"env": "OLD"}, "literal-" + "x" * 40]}
    environ = {"CURRENT": KEY, "OLD": OLD, "SAME_KEY_OTHER_NAME": f" {KEY}\n", "FILE_KEY": "f" * 40, "PATH": "/bin"}
    keyring = Keyring.from_secrets(KEY, (OLD, "f" * 40))  # the last one from --signing-key-file
    assert key_environment(block, keyring, environ) == {
        "CURRENT": KEY,
        "OLD": OLD,
        "SAME_KEY_OTHER_NAME": f" {KEY}\n",
        "FILE_KEY": "f" * 40,
    }
    assert key_environment({}, Keyring(), environ) == {}  # no keys: nothing to hide


def test_step_user_is_checked_with_one_sentence_each():
    with pytest.raises(ConfigError, match=r"^--step-user 'no-such-user-x' is not a user on this machine; create it"):
        StepUser.lookup("no-such-user-x", euid=0)
    with pytest.raises(ConfigError, match=r"needs the worker to run as root \(it runs as uid 1000\); start the worker"):
        StepUser.lookup("nobody", euid=1000)
    with pytest.raises(ConfigError, match=r"is root, which can read everything the worker holds"):
        StepUser.lookup("0", euid=0)
    nobody = pwd.getpwnam("nobody")
    assert StepUser.lookup(str(nobody.pw_uid), euid=0) == StepUser(
        "nobody", nobody.pw_uid, nobody.pw_gid, nobody.pw_dir
    )


def test_run_children_take_the_keys_only_for_the_executor_that_signs():
    assert signed_job.executor_def.name == TASKIQ_EXECUTOR
    assert encode_key_environment({"CURRENT": KEY}) == b'{"CURRENT": "' + KEY.encode() + b'"}'
    with pytest.raises(ConfigError, match="hold more than 65536 bytes"):
        encode_key_environment({"HUGE": "x" * 70000})
