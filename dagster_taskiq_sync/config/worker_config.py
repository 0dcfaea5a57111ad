"""The worker's configuration, built once at the edge from the run-config YAML and the flags.

``dagster-taskiq-sync worker start`` and an embedding process (``Worker(WorkerConfig.from_yaml(...))``)
build the same frozen :class:`WorkerConfig`; nothing after this reads the environment but the
instance (``DAGSTER_HOME``).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import socket
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dagster_taskiq_sync.errors import ConfigError
from dagster_taskiq_sync.wire.lanes import BULK_YIELD, INTERACTIVE_RESERVE, is_bulk_lane, with_lanes
from dagster_taskiq_sync.wire.messages import Keyring
from dagster_taskiq_sync.wire.settings import Settings

STEP_NICENESS = 5  # worker start --step-niceness's default: step bodies below the worker's own threads


def load_executor_config(config_yaml: str | None) -> Mapping[str, Any]:
    """The executor block of a run-config YAML: ``execution: config:`` or legacy ``execution: celery:``."""
    import yaml

    if config_yaml is None:
        return {}
    try:
        with open(config_yaml, encoding="utf8") as fh:
            parsed = yaml.safe_load(fh) or {}
    except OSError as exc:
        raise ConfigError(
            f"--config-yaml {config_yaml!r} cannot be read ({exc.strerror}); pass an existing file."
        ) from None
    except yaml.YAMLError as exc:
        where = " ".join(str(exc).split())  # PyYAML's message spans lines; keep the error one line
        raise ConfigError(f"--config-yaml {config_yaml!r} is not valid YAML ({where}); fix the file.") from None
    if not isinstance(parsed, Mapping):
        raise ConfigError(f"--config-yaml {config_yaml!r} must hold a mapping with an 'execution' key.")
    execution = parsed.get("execution") or {}
    if not isinstance(execution, Mapping):
        raise ConfigError(f"--config-yaml {config_yaml!r}: 'execution' must be a mapping.")
    block = execution.get("config") or execution.get("celery") or execution.get("taskiq") or {}
    if not isinstance(block, Mapping):
        raise ConfigError(f"--config-yaml {config_yaml!r}: 'execution.config' must be a mapping.")
    return block


def settings_from_yaml(config_yaml: str | None) -> Settings:
    """Validate the block against taskiq_executor's schema (env sources resolved), then map it."""
    return _settings_from_block(load_executor_config(config_yaml), config_yaml)


def _settings_from_block(block: Mapping[str, Any], config_yaml: str | None) -> Settings:
    from dagster import Field

    from dagster_taskiq_sync._dagster.names import post_process_config, validate_config
    from dagster_taskiq_sync.config.celery_compat import settings_from_executor_config
    from dagster_taskiq_sync.config.schema import TASKIQ_CONFIG

    config_type = Field(TASKIQ_CONFIG).config_type  # taskiq_executor's own schema
    result = validate_config(config_type, block)
    if not result.success:
        problems = "; ".join(e.message for e in result.errors or ())
        raise ConfigError(f"--config-yaml {config_yaml!r}: the execution config is invalid: {problems}")
    processed = post_process_config(config_type, block)
    if not processed.success:
        problems = "; ".join(e.message for e in processed.errors or ())
        raise ConfigError(f"--config-yaml {config_yaml!r}: {problems}")
    return settings_from_executor_config(processed.value)


def key_environment(
    block: Mapping[str, Any], keyring: Keyring, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment variables the worker's signing keys are in: those its config names
    (``signing_key: {env: NAME}``, ``previous_signing_keys``) and any other holding one of its keys
    (the same key under another name for runs' configs, or a key also given in a file)."""
    environ = os.environ if environ is None else environ
    named = [block.get("signing_key"), *(block.get("previous_signing_keys") or ())]
    names = {v["env"] for v in named if isinstance(v, Mapping) and isinstance(v.get("env"), str)}
    keys = {k for k in (keyring.current, *keyring.previous) if k}
    return {
        name: value
        for name, value in environ.items()
        if name in names or (keys and value.strip().encode(errors="replace") in keys)
    }


def read_key_files(paths: Iterable[str]) -> list[str]:
    """Signing keys from files (one per line, '#' comments): a Kubernetes secret mount, say."""
    keys: list[str] = []
    for path in paths:
        try:
            with open(path, encoding="utf8") as fh:
                lines = [line.strip() for line in fh]
        except OSError as exc:
            raise ConfigError(
                f"--signing-key-file {path!r} cannot be read ({exc.strerror}); pass a readable file."
            ) from None
        found = [line for line in lines if line and not line.startswith("#")]
        if not found:
            raise ConfigError(f"--signing-key-file {path!r} holds no key; put one secret per line.")
        keys.extend(found)
    return keys


def worker_queues(settings: Settings, queues: Sequence[str]) -> tuple[str, ...]:
    """The queues a worker consumes: ``-q`` (or the default queue), and with ``lanes`` each one's
    bulk lane after it (``wire/lanes.py``); a ``-q`` named like a bulk lane is refused there."""
    for queue in queues:
        settings.check_queue_name(queue, "-q")
    named = tuple(dict.fromkeys(queues)) or (settings.sqs.default_queue,)
    return tuple(with_lanes(named, settings.sqs.queue_name)) if settings.lanes else named


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker needs, validated."""

    settings: Settings
    name: str  # NAME@HOST
    queues: tuple[str, ...]
    concurrency: int
    shutdown_timeout: float = 60.0  # running steps get this long to finish on SIGTERM / stop()
    includes: tuple[str, ...] = ()  # modules the fork server imports before steps fork
    metrics_port: int | None = None  # /metrics, /livez, /readyz (None: not served)
    metrics_host: str = "127.0.0.1"  # containers need 0.0.0.0 for probes and scrapes
    scale_in_protection: str | None = None  # "ecs" or "k8s": protect a busy worker from scale-in
    step_user: str | None = None  # user (name or uid) the children run as; the worker must be root
    # The variables the signing keys came from: never in a step child's environment; handed to run
    # children, which sign their steps' messages (worker/key_guard.py).
    key_env: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)
    interactive_slots: int = 0  # with lanes: slots beyond concurrency for interactive steps (lanes.py)
    # Step children's niceness above the worker's: its own threads (receives, heartbeats, visibility
    # extensions) and, on a shared machine, orchestrating processes get the cores before step bodies.
    step_niceness: int = STEP_NICENESS
    # With lanes: seconds the bulk lane takes no new step after an interactive one starts or ends.
    bulk_yield: float = BULK_YIELD

    @classmethod
    def from_yaml(
        cls,
        config_yaml: str | None = None,
        *,
        queues: Sequence[str] = (),
        name: str | None = None,
        concurrency: int | None = None,
        includes: Sequence[str] = (),
        shutdown_timeout: float = 60.0,
        heartbeat_interval: float | None = None,
        prefetch_multiplier: int | None = None,
        max_tasks_per_child: int | None = None,
        max_memory_per_child: int | None = None,
        signing_key_files: Sequence[str] = (),
        metrics_port: int | None = None,
        metrics_host: str = "127.0.0.1",
        scale_in_protection: str | None = None,
        step_user: str | None = None,
        interactive_slots: int | None = None,
        step_niceness: int = STEP_NICENESS,
        bulk_yield: float = BULK_YIELD,
    ) -> WorkerConfig:
        """The same configuration ``worker start`` builds from ``-y`` and its flags."""
        block = load_executor_config(config_yaml)
        settings = _settings_from_block(block, config_yaml)
        changes: dict[str, Any] = {
            "heartbeat_interval": heartbeat_interval,
            "prefetch_multiplier": prefetch_multiplier,
            "max_tasks_per_child": max_tasks_per_child,
            "max_memory_per_child": max_memory_per_child,
        }
        settings = dataclasses.replace(settings, **{k: v for k, v in changes.items() if v is not None})
        file_keys = read_key_files(signing_key_files)
        if file_keys:
            current = settings.keyring.current.decode() if settings.keyring.current else None
            previous = [k.decode() for k in settings.keyring.previous]
            keys = [k for k in (current, *previous) if k] + file_keys
            settings = dataclasses.replace(
                settings, keyring=Keyring.from_secrets(keys[0], tuple(keys[1:]), setting="--signing-key-file")
            )
        settings.check_signing("worker")
        modules = tuple(dict.fromkeys([*settings.include, *(m for i in includes for m in i.split(",") if m)]))
        for module in modules:  # fail fast here; the fork server would swallow an ImportError
            try:
                importlib.import_module(module)
            except ImportError as exc:
                raise ConfigError(
                    f"-i/--includes {module!r} cannot be imported ({exc}); fix the module name or PYTHONPATH."
                ) from None
        consumed = worker_queues(settings, queues)
        if isinstance(step_niceness, bool) or not isinstance(step_niceness, int) or not 0 <= step_niceness <= 19:
            raise ConfigError(
                f"step_niceness {step_niceness!r} must be a whole number from 0 to 19 (niceness added to step "
                "processes; 0 runs them at the worker's own priority)."
            )
        if isinstance(bulk_yield, bool) or not isinstance(bulk_yield, (int, float)) or not 0 <= bulk_yield <= 60:
            raise ConfigError(
                f"bulk_yield {bulk_yield!r} must be a number of seconds from 0 to 60 (how long a worker's bulk "
                "lane takes no new step after an interactive one starts or ends; 0 turns it off)."
            )
        return cls(
            settings=settings,
            name=f"{name or 'dagster-' + uuid.uuid4().hex[:6]}@{socket.gethostname()}",
            queues=consumed,
            concurrency=concurrency or settings.worker_concurrency or os.cpu_count() or 1,
            shutdown_timeout=shutdown_timeout,
            includes=modules,
            metrics_port=metrics_port,
            metrics_host=metrics_host,
            scale_in_protection=scale_in_protection,
            step_user=step_user,
            step_niceness=step_niceness,
            bulk_yield=float(bulk_yield),
            key_env=key_environment(block, settings.keyring),
            # Only a worker that consumes a bulk lane has an interactive lane to keep room for.
            interactive_slots=(
                (INTERACTIVE_RESERVE if interactive_slots is None else interactive_slots)
                if any(is_bulk_lane(q) for q in consumed) and settings.lanes
                else 0
            ),
        )
