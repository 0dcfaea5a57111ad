"""What runs in a worker process: the worker, its threads, one message's life (``request``), the
drop rules, capacity, signals, and the step runner with the step child on the far side of the fork.
"""
