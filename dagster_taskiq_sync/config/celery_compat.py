"""Celery settings -> SQS settings.

The one place that knows what a dagster-celery YAML block means here (its broker and backend
URLs are parsed in ``celery_urls``). Every option is either
*mapped*, *accepted with a warning* saying why it has no effect on SQS, or *refused* with an
error naming the setting and the fix. Nothing is silently ignored. The README's mapping table
is generated from :data:`CONFIG_SOURCE_TABLE` and :data:`TRANSPORT_OPTIONS_TABLE`
(``dagster-taskiq-sync celery-mapping``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from dagster_taskiq_sync.config.celery_urls import parse_backend_url, parse_broker_url
from dagster_taskiq_sync.errors import ConfigError
from dagster_taskiq_sync.wire.aws import check_role_arn, check_token_seconds
from dagster_taskiq_sync.wire.messages import Keyring
from dagster_taskiq_sync.wire.routing import parse_routes
from dagster_taskiq_sync.wire.settings import DEFAULT_QUEUE, Settings, SQSSettings
from dagster_taskiq_sync.wire.time_limits import HARD_TAG, SOFT_TAG, check_run_limits

# --- config_source tables -------------------------------------------------------------------
# Each entry: key -> (action, explanation, handler). action is "mapped", "no effect" or
# "refused". A handler takes (settings, value, path) and returns new settings.

Handler = Callable[[Settings, Any, str], Settings]


def _int(value: Any, path: str, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{path} must be a whole number, got {value!r}; fix the value.")
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"{path} must be a whole number, got {value!r}; fix the value.") from None
    if number != int(number) or number < lo or (hi is not None and number > hi):
        bound = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise ConfigError(f"{path} must be a whole number {bound}, got {value!r}; fix the value.")
    return int(number)


def _positive(value: Any, path: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{path} must be a number of seconds, got {value!r}; fix the value.") from None
    if isinstance(value, bool) or number <= 0:
        raise ConfigError(f"{path} must be a positive number of seconds, got {value!r}.")
    return number


def _mapping(value: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{path} must be a mapping, got {value!r}; fix the value.")
    return value


def _set_sqs(field_name: str, convert: Callable[[Any, str], Any]) -> Handler:
    def handler(settings: Settings, value: Any, path: str) -> Settings:
        return settings.with_sqs(**{field_name: convert(value, path)})

    return handler


def _set(field_name: str, convert: Callable[[Any, str], Any]) -> Handler:
    def handler(settings: Settings, value: Any, path: str) -> Settings:
        return replace(settings, **{field_name: convert(value, path)})

    return handler


def _str(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{path} must be a non-empty string, got {value!r}; fix the value.")
    return value


def _bool(value: Any, path: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    raise ConfigError(f"{path} must be true or false, got {value!r}; fix the value.")


def _predefined_queues(settings: Settings, value: Any, path: str) -> Settings:
    queues: dict[str, str] = {}
    for name, spec in _mapping(value, path).items():
        spec = _mapping(spec, f"{path}.{name}")
        for key in spec:
            if key in ("access_key_id", "secret_access_key"):
                raise ConfigError(
                    f"{path}.{name}.{key}: per-queue credentials are not supported; use one set "
                    "of credentials in the broker URL or the AWS credential chain and remove it."
                )
            if key not in ("url", "backoff_policy", "backoff_tasks"):
                raise ConfigError(f"{path}.{name}.{key} is not a predefined_queues option; remove it.")
        if "url" not in spec:
            raise ConfigError(f"{path}.{name} has no 'url'; add the queue's full SQS URL.")
        queues[str(name)] = _str(spec["url"], f"{path}.{name}.url")
    return settings.with_sqs(predefined_queues=queues)


def _string_map(value: Any, path: str) -> dict[str, str]:
    return {str(k): str(v) for k, v in _mapping(value, path).items()}


def _acks_late(settings: Settings, value: Any, path: str) -> Settings:
    if not _bool(value, path):
        return _note(
            settings,
            f"{path}: false has no effect: a step's message is always deleted only after "
            "the step finishes, so a lost worker's step can be detected and retried.",
        )
    return settings


def _eager(settings: Settings, value: Any, path: str) -> Settings:
    return replace(settings, always_eager=_bool(value, path))


MAPPED = "mapped"
NO_EFFECT = "no effect"
REFUSED = "refused"

_SECURITY_WHY = (
    "Celery's X.509 signing keys are not used; messages are signed with HMAC-SHA256 "
    "(execution.config.signing_key), which becomes required."
)


def _serializer(settings: Settings, value: Any, path: str) -> Settings:
    if str(value).lower() == "auth":
        return replace(settings, signing_required=True)
    return _note(settings, f"{path}: {value!r} has no effect on SQS: messages are always JSON.")


def _security(settings: Settings, value: Any, path: str) -> Settings:
    # Never silently weaker than the Celery deployment: signing stays required.
    return _note(replace(settings, signing_required=True), f"{path}: {_SECURITY_WHY}")


TRANSPORT_OPTIONS_TABLE: dict[str, tuple[str, str, Handler | None]] = {
    "region": (MAPPED, "AWS region of the queues.", _set_sqs("region", _str)),
    "visibility_timeout": (
        MAPPED,
        "Seconds a received message stays invisible; the worker extends it while the step runs.",
        _set_sqs("visibility_timeout", lambda v, p: _int(v, p, 1, 43200)),
    ),
    "wait_time_seconds": (
        MAPPED,
        "Long-poll length of the worker's receive calls (0-20).",
        _set_sqs("wait_time_seconds", lambda v, p: _int(v, p, 0, 20)),
    ),
    "polling_interval": (
        MAPPED,
        "Pause between empty receives when wait_time_seconds is 0.",
        _set_sqs("polling_interval", _positive),
    ),
    "queue_name_prefix": (
        MAPPED,
        "Prefix of every SQS queue name (kombu's rule).",
        _set_sqs("queue_name_prefix", lambda v, p: str(v)),
    ),
    "predefined_queues": (
        MAPPED,
        "Queue name -> URL; per-queue credentials are refused.",
        _predefined_queues,
    ),
    "is_secure": (MAPPED, "HTTPS for an sqs://host:port endpoint.", None),  # read with the URL
    "client-config": (
        MAPPED,
        "botocore Config options for the SQS/S3 clients.",
        _set_sqs("client_config", lambda v, p: dict(_mapping(v, p))),
    ),
    "sqs-creation-attributes": (
        MAPPED,
        "Queue attributes used by `dagster-taskiq-sync queues create`.",
        _set_sqs("queue_attributes", _string_map),
    ),
    "queue_tags": (
        MAPPED,
        "Tags used by `dagster-taskiq-sync queues create`.",
        _set_sqs("queue_tags", _string_map),
    ),
    "max_retries": (NO_EFFECT, "Connection retries are botocore's (standard retry mode).", None),
    "interval_start": (NO_EFFECT, "Connection retries are botocore's (standard retry mode).", None),
    "interval_step": (NO_EFFECT, "Connection retries are botocore's (standard retry mode).", None),
    "interval_max": (NO_EFFECT, "Connection retries are botocore's (standard retry mode).", None),
    "backoff_policy": (NO_EFFECT, "Step retries follow the op's Dagster RetryPolicy.", None),
    "backoff_tasks": (NO_EFFECT, "Step retries follow the op's Dagster RetryPolicy.", None),
    "fetch_message_attributes": (NO_EFFECT, "The worker always fetches what it needs.", None),
    "sts_role_arn": (
        MAPPED,
        "IAM role every SQS/S3 client assumes through STS; the credentials refresh before they expire.",
        _set_sqs("sts_role_arn", check_role_arn),
    ),
    "sts_token_timeout": (
        MAPPED,
        "Seconds each assumed-role token lasts (900-43200, default 900).",
        _set_sqs("sts_token_timeout", check_token_seconds),
    ),
}


def _transport_options(settings: Settings, value: Any, path: str) -> Settings:
    settings = _apply_table(settings, _mapping(value, path), path, TRANSPORT_OPTIONS_TABLE)
    if "sts_token_timeout" in value and not settings.sqs.sts_role_arn:
        settings = _note(
            settings, f"{path}.sts_token_timeout has no effect without sts_role_arn; set both or remove it."
        )
    return settings


CONFIG_SOURCE_TABLE: dict[str, tuple[str, str, Handler | None]] = {
    "task_default_queue": (
        MAPPED,
        "Queue for steps without a dagster-celery/queue tag (default 'dagster').",
        _set_sqs("default_queue", _str),
    ),
    "broker_transport_options": (MAPPED, "See the table below.", _transport_options),
    "worker_prefetch_multiplier": (
        MAPPED,
        "Messages a worker holds = concurrency x this (default 1).",
        _set("prefetch_multiplier", lambda v, p: _int(v, p, 1, 100)),
    ),
    "worker_concurrency": (
        MAPPED,
        "Default worker threads when `worker start -c` is not given.",
        _set("worker_concurrency", lambda v, p: _int(v, p, 1, 1000)),
    ),
    "task_time_limit": (
        MAPPED,
        f"Hard limit: seconds after which a running step's process is killed; op tag `{HARD_TAG}` overrides it. "
        "In TaskiqRunLauncher's config_source: a launched run's process, and the run fails; run tag of the same "
        "name overrides it.",
        _set("task_time_limit", _positive),
    ),
    "task_acks_late": (
        MAPPED,
        "Always late: a message is deleted only after its step finished; false warns.",
        _acks_late,
    ),
    "task_always_eager": (
        MAPPED,
        "true: steps run one by one in the run's own process, no broker or worker (as Celery's eager mode).",
        _eager,
    ),
    "task_default_priority": (
        MAPPED,
        "Priority of steps without a dagster-celery/priority tag, for the order ready steps are sent in (SQS itself has no priority).",
        _set("default_priority", lambda v, p: _int(v, p, 0, 255)),
    ),
    "task_queue_max_priority": (NO_EFFECT, "SQS has no message priority.", None),
    "broker_connection_retry": (NO_EFFECT, "Connection retries are botocore's.", None),
    "broker_connection_retry_on_startup": (NO_EFFECT, "Connection retries are botocore's.", None),
    "broker_connection_max_retries": (NO_EFFECT, "Connection retries are botocore's.", None),
    "task_serializer": (
        MAPPED,
        "'auth' (Celery's message signing) requires signed messages: set execution.config.signing_key; other values have no effect (messages are always JSON).",
        _serializer,
    ),
    "security_key": (MAPPED, _SECURITY_WHY, _security),
    "security_certificate": (MAPPED, _SECURITY_WHY, _security),
    "security_cert_store": (MAPPED, _SECURITY_WHY, _security),
    "security_digest": (MAPPED, _SECURITY_WHY, _security),
    "security_key_password": (MAPPED, _SECURITY_WHY, _security),
    "result_serializer": (NO_EFFECT, "Results go through the Dagster event log.", None),
    "accept_content": (NO_EFFECT, "Messages are always JSON.", None),
    "result_expires": (NO_EFFECT, "Results go through the Dagster event log.", None),
    "task_soft_time_limit": (
        MAPPED,
        "Soft limit: seconds after which a running step is interrupted (the op gets Dagster's "
        f"DagsterExecutionInterruptedError and may clean up); must be below task_time_limit; op tag `{SOFT_TAG}` "
        "overrides it. In TaskiqRunLauncher's config_source: a launched run fails and is interrupted; run tag of "
        "the same name overrides it.",
        _set("task_soft_time_limit", _positive),
    ),
    "worker_max_tasks_per_child": (
        MAPPED,
        "Steps a step child runs before it is replaced by a fresh one (default: no limit, as Celery).",
        _set("max_tasks_per_child", lambda v, p: _int(v, p, 1, 10**9)),
    ),
    "worker_max_memory_per_child": (
        MAPPED,
        "KiB of resident memory above which a step child is replaced after its step (as Celery).",
        _set("max_memory_per_child", lambda v, p: _int(v, p, 1, 10**12)),
    ),
    "task_routes": (NO_EFFECT, "Route steps with the dagster-celery/queue op tag.", None),
    "timezone": (NO_EFFECT, "Not used by the worker.", None),
    "enable_utc": (NO_EFFECT, "Not used by the worker.", None),
    "worker_hijack_root_logger": (NO_EFFECT, "Use `worker start -l` for the log level.", None),
}


def _note(settings: Settings, message: str) -> Settings:
    if message in settings.notes:
        return settings
    return replace(settings, notes=(*settings.notes, message))


def _apply_table(
    settings: Settings,
    values: Mapping[str, Any],
    path: str,
    table: Mapping[str, tuple[str, str, Handler | None]],
) -> Settings:
    for key, value in values.items():
        key_path = f"{path}.{key}"
        entry = table.get(key)
        if entry is None:
            settings = _note(
                settings,
                f"{key_path} is not a setting taskiq_executor knows, so it has no effect; remove it.",
            )
            continue
        action, why, handler = entry
        if action == REFUSED and handler is None:
            raise ConfigError(f"{key_path} is not supported on SQS: {why}")
        if action == NO_EFFECT:
            settings = _note(settings, f"{key_path} has no effect on SQS: {why}")
        elif handler is not None:
            settings = handler(settings, value, key_path)
    return settings


def _per_slot(value: Any, path: str) -> float | None:
    if isinstance(value, str) and value.strip().lower() == "none":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = 0.0
    if isinstance(value, bool) or not number >= 1 or number == float("inf"):
        raise ConfigError(
            f"{path} must be a number of at least 1 (steps in flight per live worker slot) or 'none' "
            f"(no cap), got {value!r}; fix the value."
        )
    return number


# taskiq_executor's own keys (not Celery's), validated the same way.
NATIVE_KEYS: dict[str, Callable[[Any, str], Any]] = {
    "step_poll_interval": _positive,
    "health_check_interval": lambda v, p: _int(v, p, 1, 3600),
    "worker_lost_timeout": _positive,
    "queued_step_warning": _positive,
    "queued_step_timeout": _positive,
    "broker_outage_timeout": _positive,
    "database_outage_timeout": _positive,
    "record_expiry": _positive,
    "lost_worker_expiry": _positive,
    "steps_in_flight_per_slot": _per_slot,
    "min_steps_in_flight": lambda v, p: _int(v, p, 1, 100_000),
    "routes": parse_routes,
    "lanes": _bool,
    "message_group_tag": _str,
}


def secret(value: Any, path: str) -> str | None:
    """A secret setting's value: a string as written, or ``{env: NAME}`` read from this process's
    environment now (see ``schema.SecretSource``)."""
    if value is None or isinstance(value, str):
        return value
    name = value.get("env") if isinstance(value, Mapping) and len(value) == 1 else None
    if not isinstance(name, str):
        raise ConfigError(f"{path} must be a secret: a string, or {{env: NAME}}.")
    found = os.environ.get(name)
    if found is None:
        raise ConfigError(f"{path} is {{env: {name}}}, which is not set in this process's environment; set {name}.")
    return found


def settings_from_executor_config(config: Mapping[str, Any] | None, where: str = "execution.config") -> Settings:
    """Validate a dagster-celery style executor config block and build Settings from it.

    ``config`` is what sits under ``execution: config:`` (broker, backend, include,
    config_source, retries, plus this executor's native keys); ``where`` is its path in the
    user's YAML, as errors name it (``run_launcher.config`` for TaskiqRunLauncher's).
    """
    config = dict(config or {})
    config_source = config.get("config_source") or {}
    if not isinstance(config_source, Mapping):
        raise ConfigError(f"{where}.config_source must be a mapping of Celery settings, got {config_source!r}.")
    transport = config_source.get("broker_transport_options") or {}
    if not isinstance(transport, Mapping):
        raise ConfigError(f"{where}.config_source.broker_transport_options must be a mapping, got {transport!r}.")
    is_secure = _bool(transport.get("is_secure", False), "broker_transport_options.is_secure")
    sqs = SQSSettings(
        **parse_broker_url(config.get("broker"), is_secure=is_secure),
        **parse_backend_url(config.get("backend")),
    )
    settings = Settings(sqs=sqs, include=tuple(config.get("include") or ()))
    settings = _apply_table(settings, config_source, f"{where}.config_source", CONFIG_SOURCE_TABLE)
    check_run_limits(settings.task_time_limit, settings.task_soft_time_limit, f"{where}.config_source")
    for key, convert in NATIVE_KEYS.items():
        if config.get(key) is not None:
            settings = replace(settings, **{key: convert(config[key], f"{where}.{key}")})
    if config.get("max_payload_mib") is not None:
        mib = _int(config["max_payload_mib"], f"{where}.max_payload_mib", 1, 2048)
        settings = settings.with_sqs(max_payload_bytes=mib * 1024 * 1024)
    previous = config.get("previous_signing_keys") or ()
    if not isinstance(previous, (list, tuple)):
        raise ConfigError(f"{where}.previous_signing_keys must be a list of secrets ({{env: NAME}} each).")
    current = secret(config.get("signing_key"), f"{where}.signing_key")
    older = tuple(secret(k, f"{where}.previous_signing_keys[{i}]") or "" for i, k in enumerate(previous))
    settings = replace(settings, keyring=Keyring.from_secrets(current, older, setting=f"{where}.signing_key"))
    if not settings.sqs.default_queue:
        settings = settings.with_sqs(default_queue=DEFAULT_QUEUE)
    # With lanes, a queue named like a bulk lane is another queue's lane: refused, by its setting.
    settings.check_queue_name(settings.sqs.default_queue, "execution.config.config_source.task_default_queue")
    for route in settings.routes.routes:
        settings.check_queue_name(route.queue, f"{route.path}.queue")
    return settings


def mapping_table_markdown() -> str:
    """The README's mapping table, generated so it cannot drift from the code."""
    lines = ["| `config_source` key | what happens | why / how |", "|---|---|---|"]
    for key, (action, why, _) in CONFIG_SOURCE_TABLE.items():
        lines.append(f"| `{key}` | {action} | {why} |")
    lines += ["", "| `broker_transport_options` key | what happens | why / how |", "|---|---|---|"]
    for key, (action, why, _) in TRANSPORT_OPTIONS_TABLE.items():
        lines.append(f"| `{key}` | {action} | {why} |")
    return "\n".join(lines)
