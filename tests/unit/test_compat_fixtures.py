"""Every Celery YAML form in compat/celery_yaml validates and maps to the expected SQS settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dagster_taskiq_sync.cli import settings_from_yaml
from dagster_taskiq_sync.errors import ConfigError

pytestmark = pytest.mark.compat  # the tier bin/matrix runs on every env

FIXTURES = Path(__file__).resolve().parents[2] / "compat" / "celery_yaml"
CASES = sorted(p for p in FIXTURES.glob("*.yaml") if not p.name.endswith(".expected.yaml"))


def test_the_fixture_set_is_complete():
    assert {p.stem for p in CASES} >= {"empty", "partial", "full", "legacy", "env", "rabbitmq"}


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_celery_yaml_maps_to_the_expected_sqs_settings(path, monkeypatch):
    expected = yaml.safe_load(path.with_name(path.stem + ".expected.yaml").read_text())
    for key, value in (expected.get("env") or {}).items():
        monkeypatch.setenv(key, value)
    if "error" in expected:
        with pytest.raises(ConfigError, match=expected["error"]):
            settings_from_yaml(str(path))
        return
    settings = settings_from_yaml(str(path))  # validated against taskiq_executor's schema first
    for key, value in (expected.get("sqs") or {}).items():
        assert getattr(settings.sqs, key) == value, key
    if "sqs_default_queue_name" in expected:
        assert settings.sqs.queue_name(settings.sqs.default_queue) == expected["sqs_default_queue_name"]
    for key in ("include", "prefetch_multiplier", "worker_concurrency", "task_time_limit"):
        if key in expected:
            value = tuple(expected[key]) if key == "include" else expected[key]
            assert getattr(settings, key) == value, key
    assert len(settings.notes) == expected["notes"], settings.notes
