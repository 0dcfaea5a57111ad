"""``python -m dagster_taskiq_sync.cli`` (how ``worker start -d`` re-runs itself in the background)."""

from dagster_taskiq_sync.cli import main

main()
