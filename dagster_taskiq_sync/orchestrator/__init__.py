"""What runs in the run process: ``taskiq_executor``'s step handler, the sender thread, fair
sharing between runs, and ``TaskiqRunLauncher``.
"""
