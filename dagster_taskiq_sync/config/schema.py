"""The executor's config schema: dagster-celery's ``celery_executor`` keys, unchanged, plus native ones.

Shared by ``taskiq_executor``, ``TaskiqRunLauncher`` (which takes the Celery keys) and ``worker
start -y`` (which validates the same YAML block against it).
"""

from __future__ import annotations

from typing import Any as _AnyType

from dagster import Any, Field, Noneable, Permissive, ScalarUnion, Selector, StringSource

from dagster_taskiq_sync._dagster.names import get_retries_config, get_tag_concurrency_limits_config

# A secret written as StringSource is (a string, or {env: NAME}), except that Dagster leaves {env: NAME}
# as it is: the executor and the run launcher read the variable when they are built
# (celery_compat.secret). Dagster checks a run's whole config in every step child too, and step
# children run without the signing-key variables (worker/key_guard.py): StringSource would fail
# there on the unset variable, and must never succeed by finding the key.
SecretSource = ScalarUnion(scalar_type=str, non_scalar_schema=Selector({"env": str}))

TASKIQ_CONFIG: dict[str, _AnyType] = {
    # --- the celery_executor schema, unchanged (dagster-celery 0.29) ---
    "broker": Field(
        Noneable(StringSource),
        is_required=False,
        description="SQS broker URL: 'sqs://' (AWS defaults), 'sqs://host:port', 'sqs://key:secret@host:port'.",
    ),
    "backend": Field(
        Noneable(StringSource),
        is_required=False,
        default_value="rpc://",
        description="'rpc://' (default: results via the Dagster event log) or 's3://bucket/prefix'.",
    ),
    "include": Field([str], is_required=False, description="Modules every worker should import."),
    "config_source": Field(
        Noneable(Permissive()),
        is_required=False,
        description="Celery settings; see the README's mapping table for what each does on SQS.",
    ),
    "retries": get_retries_config(),
    # --- native keys ---
    "max_concurrent": Field(
        Noneable(int),
        is_required=False,
        description="Most steps of this run in flight at once (default: no limit).",
    ),
    "tag_concurrency_limits": get_tag_concurrency_limits_config(),
    "step_poll_interval": Field(
        Noneable(float),
        is_required=False,
        description="Seconds between reads of the event log for step results (default 0.02).",
    ),
    "health_check_interval": Field(
        Noneable(int),
        is_required=False,
        description="Seconds between liveness checks of running steps (default 5).",
    ),
    "worker_lost_timeout": Field(
        Noneable(float),
        is_required=False,
        description="A running step whose worker has not heartbeated for this long is failed, "
        "or retried under its RetryPolicy (default 30).",
    ),
    "queued_step_warning": Field(
        Noneable(float),
        is_required=False,
        description="Log an engine event when no worker has taken a step after this long (default 60).",
    ),
    "queued_step_timeout": Field(
        Noneable(float),
        is_required=False,
        description="Fail a step no worker has taken after this long (default: wait).",
    ),
    "broker_outage_timeout": Field(
        Noneable(float),
        is_required=False,
        description="Keep retrying to send a step through an SQS outage this long (default 60).",
    ),
    "database_outage_timeout": Field(
        Noneable(float),
        is_required=False,
        description="Keep retrying the Dagster instance's database through an outage (a PostgreSQL "
        "restart, a locked sqlite) this long before failing a step or run (default 120).",
    ),
    # --- fair sharing between runs (see README "Fair sharing between runs") ---
    "steps_in_flight_per_slot": Field(
        Any,
        is_required=False,
        description="A run keeps at most this many of its steps in flight (queued or running) per live "
        "worker slot on each queue, so other runs' steps are not queued behind all of it (default 2; "
        "at least 1; 'none': no cap).",
    ),
    "min_steps_in_flight": Field(
        Noneable(int),
        is_required=False,
        description="The per-queue cap on a run's steps in flight never goes below this, also with no "
        "live worker (default 4).",
    ),
    # --- lanes (see README "Lanes") ---
    "lanes": Field(
        Noneable(bool),
        is_required=False,
        description="Give every standard queue Q a bulk lane, Q-bulk: steps of backfill runs (and of runs "
        "tagged dagster-taskiq/lane: bulk or of negative run priority) go there, and workers serve Q first, "
        "so interactive runs do not wait behind a backfill (default false).",
    ),
    "message_group_tag": Field(
        Noneable(str),
        is_required=False,
        description="Run tag whose value is the MessageGroupId of the run's messages on standard queues "
        "(SQS fair queues: one group's backlog does not delay the others'); default: the run id.",
    ),
    # --- sized pools (see README "Sized pools") ---
    "routes": Field(
        Any,
        is_required=False,
        description="Worker pools by step size, tried in order: a list of {queue, when, max}, e.g. "
        "[{queue: big, when: {ecs/memory: '>= 8192', k8s/memory: '>= 8Gi'}, max: {ecs/memory: 30720}}]. "
        "Reads the ecs/cpu, ecs/memory and dagster-k8s/config tags; a dagster-celery/queue tag wins.",
    ),
    # --- message signing and limits (see README "Security model") ---
    "signing_key": Field(
        Noneable(SecretSource),
        is_required=False,
        description="Secret that signs every message (HMAC-SHA256); give it as {env: NAME}. Workers "
        "holding a key reject unsigned or forged messages.",
    ),
    "previous_signing_keys": Field(
        [SecretSource],
        is_required=False,
        description="Keys workers still accept while a new signing_key rolls out (key rotation).",
    ),
    "max_payload_mib": Field(
        Noneable(int),
        is_required=False,
        description="Largest offloaded (S3) message payload a worker reads, in MiB (default 64).",
    ),
    # --- bounded state ---
    "record_expiry": Field(
        Noneable(float),
        is_required=False,
        description="Seconds after which workers delete liveness records nobody updated (default 86400).",
    ),
    "lost_worker_expiry": Field(
        Noneable(float),
        is_required=False,
        description="Seconds after its last heartbeat a lost worker leaves `worker list` (default 3600).",
    ),
}
