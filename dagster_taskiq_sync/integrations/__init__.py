"""Hosts that run a worker inside a process they already have (``celery``: a Celery worker
bootstep). Each module imports its host's library; importing this package imports none of them.
"""
