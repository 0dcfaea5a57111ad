"""Celery settings map to SQS settings; nothing is silently ignored."""

from __future__ import annotations

from pathlib import Path

import pytest

from dagster_taskiq_sync.config.celery_compat import mapping_table_markdown, settings_from_executor_config
from dagster_taskiq_sync.config.celery_urls import parse_broker_url
from dagster_taskiq_sync.errors import ConfigError
from dagster_taskiq_sync.wire.settings import kombu_queue_name, redact_url

pytestmark = pytest.mark.compat  # the tier bin/matrix runs on every env

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "url, expected",
    [
        (None, {}),
        ("sqs://", {}),
        ("sqs://127.0.0.1:9324", {"endpoint_url": "http://127.0.0.1:9324"}),
        ("sqs://localhost:4566/", {"endpoint_url": "http://localhost:4566"}),
        (
            "sqs://AKIA%2FKEY:se%2Fcr%40et@",
            {"access_key_id": "AKIA/KEY", "secret_access_key": "se/cr@et"},
        ),
        (
            "sqs://k:s@127.0.0.1:9324",
            {"access_key_id": "k", "secret_access_key": "s", "endpoint_url": "http://127.0.0.1:9324"},
        ),
    ],
)
def test_celery_broker_url_forms(url, expected):
    assert parse_broker_url(url) == expected


def test_is_secure_makes_the_endpoint_https():
    assert parse_broker_url("sqs://sqs.local:443", is_secure=True) == {"endpoint_url": "https://sqs.local:443"}
    settings = settings_from_executor_config(
        {"broker": "sqs://sqs.local:443", "config_source": {"broker_transport_options": {"is_secure": True}}}
    )
    assert settings.sqs.endpoint_url == "https://sqs.local:443"


@pytest.mark.parametrize(
    "url, expected",
    [
        ("pyamqp://guest@localhost//", "scheme 'pyamqp://'"),
        ("localhost:9324", "scheme"),
        ("sqs://host:99999", "not a valid URL"),
        ("sqs://127.0.0.1:9324/queue", "path or query"),
        ("sqs://:9324", "port but no host"),
    ],
)
def test_bad_broker_urls_are_refused_with_the_setting_named(url, expected):
    with pytest.raises(ConfigError, match="execution.config.broker") as excinfo:
        parse_broker_url(url)
    assert expected in str(excinfo.value)


def test_secrets_never_appear_in_broker_errors():
    with pytest.raises(ConfigError) as excinfo:
        parse_broker_url("amqp://user:hunter2@rabbit:5672//")
    assert "hunter2" not in str(excinfo.value)
    assert redact_url("sqs://AKIA:hunter2@127.0.0.1:9324") == "sqs://AKIA:***@127.0.0.1:9324"


@pytest.mark.parametrize(
    "celery_name, prefix, sqs_name",
    [
        ("dagster", "", "dagster"),
        ("my.queue", "", "my-queue"),
        ("weird:name/with*punct", "", "weird_name_with_punct"),
        ("keep-dash_and_underscore", "", "keep-dash_and_underscore"),
        ("jobs.fifo", "", "jobs.fifo"),
        ("team.jobs.fifo", "", "team-jobs.fifo"),
        ("dagster", "prod.", "prod-dagster"),
    ],
)
def test_queue_names_follow_kombus_rules(celery_name, prefix, sqs_name):
    assert kombu_queue_name(celery_name, prefix) == sqs_name


def test_transport_options_map_to_sqs_settings():
    settings = settings_from_executor_config(
        {
            "broker": "sqs://",
            "backend": "rpc://",
            "include": ["my.ops"],
            "config_source": {
                "task_default_queue": "steps",
                "worker_prefetch_multiplier": 2,
                "worker_concurrency": 8,
                "task_time_limit": 3600,
                "broker_transport_options": {
                    "region": "eu-west-1",
                    "visibility_timeout": 120,
                    "wait_time_seconds": 20,
                    "polling_interval": 2,
                    "queue_name_prefix": "prod-",
                    "predefined_queues": {"steps": {"url": "https://sqs.eu-west-1.amazonaws.com/1/prod-steps"}},
                },
            },
        }
    )
    sqs = settings.sqs
    assert (sqs.region, sqs.visibility_timeout, sqs.wait_time_seconds, sqs.polling_interval) == (
        "eu-west-1",
        120,
        20,
        2.0,
    )
    assert sqs.default_queue == "steps" and sqs.queue_name("steps") == "prod-steps"
    assert sqs.queue_name("other.queue") == "prod-other-queue"
    assert (settings.prefetch_multiplier, settings.worker_concurrency, settings.task_time_limit) == (2, 8, 3600.0)
    assert settings.include == ("my.ops",)
    assert settings.notes == ()


def test_options_without_effect_warn_once_each_and_unknown_keys_warn():
    settings = settings_from_executor_config(
        {
            "config_source": {
                "task_queue_max_priority": 10,
                "task_acks_late": False,
                "not_a_celery_setting": 1,
                "broker_transport_options": {"max_retries": 3, "interval_start": 0},
            }
        }
    )
    notes = "\n".join(settings.notes)
    assert len(settings.notes) == 5
    assert "task_queue_max_priority has no effect on SQS: SQS has no message priority" in notes
    assert "task_acks_late: false has no effect" in notes
    assert "not_a_celery_setting is not a setting taskiq_executor knows" in notes
    assert "broker_transport_options.max_retries has no effect" in notes


@pytest.mark.parametrize(
    "config_source, expected",
    [
        (
            {"broker_transport_options": {"sts_role_arn": "arn:aws:iam::1:role/x"}},
            "sts_role_arn 'arn:aws:iam::1:role/x' is not an IAM role ARN",
        ),
        (
            {"broker_transport_options": {"sts_role_arn": "arn:aws:iam::123456789012:role/x", "sts_token_timeout": 60}},
            "sts_token_timeout 60 is outside what STS accepts; use 900 to 43200 seconds",
        ),
        (
            {"broker_transport_options": {"predefined_queues": {"q": {"url": "u", "access_key_id": "a"}}}},
            "per-queue credentials are not supported",
        ),
        ({"broker_transport_options": {"wait_time_seconds": 30}}, "between 0 and 20"),
        ({"broker_transport_options": {"visibility_timeout": "soon"}}, "whole number"),
        ({"worker_prefetch_multiplier": 0}, "between 1 and 100"),
        ({"task_time_limit": -1}, "positive number"),
        ({"broker_transport_options": "region=eu"}, "must be a mapping"),
        ({"task_always_eager": "sometimes"}, "task_always_eager must be true or false"),
    ],
)
def test_unusable_options_are_refused_naming_the_setting(config_source, expected):
    with pytest.raises(ConfigError, match="config_source") as excinfo:
        settings_from_executor_config({"config_source": config_source})
    assert expected in str(excinfo.value)


def test_backend_forms():
    assert settings_from_executor_config({"backend": "rpc://"}).sqs.s3_bucket is None
    s3 = settings_from_executor_config({"backend": "s3://payloads/dagster/steps"}).sqs
    assert (s3.s3_bucket, s3.s3_prefix) == ("payloads", "dagster/steps")
    with pytest.raises(ConfigError, match="execution.config.backend 'redis://r/0' is not supported"):
        settings_from_executor_config({"backend": "redis://r/0"})


def test_readme_carries_the_generated_mapping_table():
    # The table is generated from the mapping code, so the docs cannot drift from it.
    assert mapping_table_markdown() in (ROOT / "README.md").read_text()


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("max_payload_mib", 0, "execution.config.max_payload_mib must be a whole number between 1 and 2048"),
        ("max_payload_mib", "lots", "execution.config.max_payload_mib must be a whole number"),
        (
            "database_outage_timeout",
            -1,
            "execution.config.database_outage_timeout must be a positive number of seconds",
        ),
        ("record_expiry", "soon", "execution.config.record_expiry must be a number of seconds"),
        ("lost_worker_expiry", 0, "execution.config.lost_worker_expiry must be a positive number of seconds"),
        ("signing_key", "short", "execution.config.signing_key is 5 characters; use a random secret of at least 32"),
        ("previous_signing_keys", ["ok" * 20, "tiny"], "execution.config.previous_signing_keys is 4 characters"),
    ],
)
def test_new_native_keys_refuse_garbage_naming_the_key(key, value, expected):
    with pytest.raises(ConfigError) as info:
        settings_from_executor_config({key: value})
    assert expected in str(info.value)


def test_celery_message_signing_requires_a_signing_key_and_is_never_silently_weaker():
    settings = settings_from_executor_config({"config_source": {"task_serializer": "auth"}})
    assert settings.signing_required
    with pytest.raises(ConfigError, match="ask for signed messages"):
        settings.check_signing("sender")
    with pytest.raises(ConfigError, match="ask for signed messages"):
        settings.check_signing("worker")
    signed = settings_from_executor_config(
        {
            "signing_key": "k" * 40,
            "config_source": {"security_key": "/etc/worker.key", "security_certificate": "/etc/worker.pem"},
        }
    )
    signed.check_signing("sender")
    assert any("X.509 signing keys are not used" in note for note in signed.notes)


@pytest.mark.parametrize(
    "secret", ["wJalr/XUtnFEMI/K7MDENG", "wJalrXU?tnFEMIK7MDENG", "wJalrXU#tnFEMIK7MDENG", "a@b/c:d"]
)
def test_an_unquoted_secret_in_the_broker_url_never_shows_in_the_error(secret):
    url = f"sqs://AKIAEXAMPLE:{secret}@127.0.0.1:9324"
    assert redact_url(url) == "sqs://AKIAEXAMPLE:***@127.0.0.1:9324"
    with pytest.raises(ConfigError) as caught:
        parse_broker_url(url)
    message = str(caught.value)
    assert "AKIAEXAMPLE:***@127.0.0.1:9324" in message and "%2F" in message
    for piece in (secret, *secret.replace("?", "/").replace("#", "/").replace("@", "/").split("/")):
        assert len(piece) < 4 or piece not in message.replace("AKIAEXAMPLE", ""), piece


def test_a_literal_signing_key_in_the_run_config_is_named_so_the_run_can_warn():
    from dagster_taskiq_sync.orchestrator.executor import literal_secrets

    env = {"env": "DTS_SIGNING_KEY"}
    assert literal_secrets({"execution": {"config": {"signing_key": env, "previous_signing_keys": [env]}}}) == []
    assert literal_secrets({"execution": {"config": {"signing_key": "k" * 40}}}) == ["execution.config.signing_key"]
    assert literal_secrets({"execution": {"taskiq": {"config": {"previous_signing_keys": [env, "old" * 20]}}}}) == [
        "execution.taskiq.config.previous_signing_keys"
    ]
    assert literal_secrets({}) == literal_secrets({"execution": "garbage"}) == []
