"""Keep secrets out of step messages.

A step message carries Dagster's instance reference (how to reach run and event storage). If
the orchestrator's dagster.yaml holds a database password or token in clear text, sending the
reference as is would put it on the queue. :func:`redact_instance_ref` replaces such values
(keys that name a password, secret, token or key, and passwords inside URLs) with a marker;
``{env: VAR}`` references are kept, since they name a variable, not a value. A worker that
receives a redacted reference resolves its own instance from ``DAGSTER_HOME``, which must point
at the same storage (as dagster-celery deployments already do).
"""

from __future__ import annotations

import os
import weakref
import re
from typing import Any

import yaml

from .errors import ConfigError
from .settings import redact_url

REDACTED = "<redacted by dagster-taskiq-sync>"
_SECRET_KEY = re.compile(r"pass(word|wd)?|secret|token|credential|private_key|api_key|access_key", re.IGNORECASE)
_URL_WITH_PASSWORD = re.compile(r"^[a-z][a-z0-9+.-]*://[^/@:\s]*:[^/@\s]+@", re.IGNORECASE)


def _redact(value: Any) -> tuple[Any, bool]:
    if isinstance(value, dict):
        if set(value) == {"env"}:  # {env: VAR}: a name, not a secret
            return value, False
        changed = False
        out = {}
        for key, item in value.items():
            if _SECRET_KEY.search(str(key)) and not (isinstance(item, dict) and set(item) == {"env"}) and item not in (None, ""):
                out[key], changed = REDACTED, True
            else:
                out[key], item_changed = _redact(item)
                changed |= item_changed
        return out, changed
    if isinstance(value, list):
        items = [_redact(item) for item in value]
        return [item for item, _ in items], any(changed for _, changed in items)
    if isinstance(value, str) and _URL_WITH_PASSWORD.match(value):
        return redact_url(value), True
    return value, False


_last: tuple[Any, tuple[Any, bool]] | None = None  # (ref, result): a run sends one ref per step


def redact_instance_ref(ref: Any) -> tuple[Any, bool]:
    """``ref`` with secret values replaced by a marker, and whether anything was replaced.

    DagsterInstance.get_ref() returns the same object every time, and every step of a run carries
    it, so the last answer is kept (re-parsing each storage's YAML costs ~1 ms per step).
    """
    global _last
    last = _last
    if last is not None and last[0] is ref:
        return last[1]
    result = _redact_instance_ref(ref)
    _last = (ref, result)
    return result


def _redact_instance_ref(ref: Any) -> tuple[Any, bool]:
    from ._dagster_private import ConfigurableClassData

    changes: dict[str, Any] = {}
    for name, value in ref._asdict().items():
        if isinstance(value, ConfigurableClassData):
            config = yaml.safe_load(value.config_yaml) if value.config_yaml else None
            redacted, changed = _redact(config)
            if changed:
                changes[name] = value._replace(config_yaml=yaml.safe_dump(redacted))
        elif name == "settings" and isinstance(value, dict):
            redacted, changed = _redact(value)
            if changed:
                changes[name] = redacted
    return (ref._replace(**changes), True) if changes else (ref, False)


def is_redacted(ref: Any) -> bool:
    from ._dagster_private import serialize_value

    return REDACTED in serialize_value(ref)


def instance_from_ref(ref: Any):
    """The instance a step message points at: its reference, or the worker's own if redacted."""
    from dagster import DagsterInstance

    if not is_redacted(ref):
        return DagsterInstance.from_ref(ref)
    if not os.environ.get("DAGSTER_HOME"):
        raise ConfigError(
            "the step message's Dagster instance reference had its secrets removed, so the worker "
            "needs its own: set DAGSTER_HOME on the worker to a dagster.yaml with the same storage "
            "as the orchestrator's."
        )
    return DagsterInstance.get()


DB_POOL_ENV = "DAGSTER_TASKIQ_SYNC_DB_POOL"
_POOLED: "weakref.WeakSet[Any]" = weakref.WeakSet()


def pooled(instance: Any) -> Any:
    """Keep database connections open in a long-lived process (worker, step child, orchestrator).

    Dagster's PostgreSQL storages open a new connection for every query unless told otherwise
    (``optimize_for_webserver``, what dagster-webserver does): a worker polling for cancels and
    writing liveness records, a step child writing ~12 events per step and an orchestrator
    reading the event log every 20 ms would each pay a connection set-up, and the server a
    backend start, per query. With pooling each process holds one connection per storage (plus
    short-lived overflow under concurrency); ``DAGSTER_TASKIQ_SYNC_DB_POOL=0`` turns it off where
    connections are scarce (no PgBouncer). No effect on sqlite instances.
    """
    if os.environ.get(DB_POOL_ENV, "1").strip().lower() in ("0", "false", "no", "off") or instance in _POOLED:
        return instance
    _POOLED.add(instance)
    try:
        # statement_timeout 0: no timeout, as without pooling
        instance.optimize_for_webserver(statement_timeout=0, pool_recycle=1800, max_overflow=10)
    except Exception as exc:  # noqa: BLE001 - an optimisation; never fail a step for it
        import logging

        logging.getLogger("dagster_taskiq_sync").warning("could not pool database connections: %s", exc)
    return instance
