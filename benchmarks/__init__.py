"""``bin/bench``: taskiq_executor against dagster-celery and Dagster's own executors."""
