"""From the user's YAML and flags to settings: the executor's schema, the Celery mapping, a
worker's frozen config.
"""
