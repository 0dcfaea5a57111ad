"""What crosses the queue: step messages and their signing, SQS settings, AWS clients and
credentials, the event-loop bridge and the TaskIQ broker. Imports only ``_dagster`` and ``errors``.
"""
