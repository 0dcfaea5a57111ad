"""Every private Dagster use of this package, one module per concern; nothing else imports ``dagster._``.

``names`` re-exports the private names other modules use (and ``PRELOAD_MODULES``), the others
wrap Dagster internals: key-value rows (``kv``), kept sqlite connections (``sqlite``), the
orchestrator's loop and cancellation (``execution``), what a step child installs (``child``), and
resuming half-written events (``event_writes``). A Dagster upgrade that moves a name is fixed here
and nowhere else; ``tests/unit/test_dagster_private.py`` imports each name on every Dagster minor of the
matrix. Nothing here changes Dagster at import time: each behaviour change is an explicit
installer (``install_*``) that the process which wants it calls once (the executor, or a step child).
"""
