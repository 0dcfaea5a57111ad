"""What lives in the Dagster instance: the worker's own instance, database-outage retries, liveness
records, the worker registry, and run reports read back from the event log.
"""
