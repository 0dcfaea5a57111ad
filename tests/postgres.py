"""A throwaway PostgreSQL cluster for tests: the benchmark harness's (``benchmarks/postgres.py``).

The soak and the tests start PostgreSQL the same way; the code lives with the harness, which must
not import ``tests``.
"""

from benchmarks.postgres import APT_PACKAGE, Pause, PostgresCluster, PostgresUnavailable, _die_with_parent, find_bindir

__all__ = ["APT_PACKAGE", "Pause", "PostgresCluster", "PostgresUnavailable", "_die_with_parent", "find_bindir"]
