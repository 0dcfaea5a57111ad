"""install(): what a Celery app gets from the integration before any worker starts."""

from __future__ import annotations

import pytest

from dagster_taskiq_sync.errors import ConfigError

celery = pytest.importorskip("celery", reason="Celery is not installed (pip install 'dagster-taskiq-sync[celery]')")
from dagster_taskiq_sync.integrations.celery import DagsterWorkerStep, install  # noqa: E402 - after the skip


def test_install_adds_a_worker_bootstep_and_reads_nothing_until_a_worker_starts(tmp_path):
    # a client that imports proj.py (to send tasks, or `celery inspect`) never needs the config file
    app = celery.Celery("proj")
    step = install(app, str(tmp_path / "not-there.yaml"), queues=["dagster"], concurrency=2)
    assert step in app.steps["worker"] and issubclass(step, DagsterWorkerStep)
    assert step.options == {"queues": ["dagster"], "concurrency": 2}
    assert step.requires == ("celery.worker.components:Pool",)  # after the pool has forked its children


def test_install_refuses_a_keyword_worker_config_does_not_take_in_one_sentence():
    with pytest.raises(ConfigError, match=r"install\(\) does not take concurency; use WorkerConfig.from_yaml's"):
        install(celery.Celery("proj"), "run_config.yaml", concurency=2)
