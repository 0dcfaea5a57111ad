"""Pytest plugin: the session's throwaway PostgreSQL cluster (see tests/postgres.py).

Loaded from tests/conftest.py. Tests that take ``postgres`` are skipped, naming the package to
install, only when PostgreSQL's server binaries are missing; .ci/run installs them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .postgres import APT_PACKAGE, PostgresCluster, find_bindir


@pytest.fixture(scope="session")
def postgres():
    """A running :class:`~tests.postgres.PostgresCluster` shared by the session. A test that
    stops it must leave it running (``pause()`` does); the fixture starts it again otherwise."""
    if find_bindir() is None:
        pytest.skip(
            f"PostgreSQL server binaries not found: install Debian's {APT_PACKAGE} package "
            f"(apt-get install {APT_PACKAGE})"
        )
    cluster = PostgresCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def pg(postgres):
    """The session's cluster, started again after a test that left it stopped."""
    yield postgres
    if not postgres.running:
        postgres.start()


@pytest.fixture
def pg_home(pg, tmp_path) -> Path:
    """A DAGSTER_HOME whose dagster.yaml puts all storage on a fresh PostgreSQL database."""
    pytest.importorskip("dagster_postgres", reason="dagster-postgres is not installed (bin/setup bench)")
    home = tmp_path / "dagster_home"
    pg.write_dagster_yaml(home)
    return home
