"""Typed settings, built once at the edge and passed whole.

``celery_compat.settings_from_executor_config`` builds a :class:`Settings` from the executor's
(dagster-celery shaped) config; the worker CLI builds one from the same YAML plus its flags.
Nothing here reads the environment: AWS endpoint, region and credentials that are not set
explicitly are left to boto's own resolution (``AWS_ENDPOINT_URL*``, ``AWS_DEFAULT_REGION``,
the credential chain) when a client is created.
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from dagster_taskiq_sync.errors import ConfigError
from dagster_taskiq_sync.wire.lanes import lane_name_refusal, with_lanes
from dagster_taskiq_sync.wire.messages import Keyring
from dagster_taskiq_sync.wire.routing import RouteTable

DEFAULT_QUEUE = "dagster"  # dagster-celery's task_default_queue

# kombu's SQS transport: dots become dashes, every other punctuation but '-' and '_' becomes
# '_'. Using the same table means queues that already exist for a Celery deployment match.
_KOMBU_CHARS_REPLACE_TABLE = {ord(c): 0x5F for c in string.punctuation if c not in "-_."}
_KOMBU_CHARS_REPLACE_TABLE[0x2E] = 0x2D


def kombu_queue_name(celery_queue: str, prefix: str = "") -> str:
    """The SQS queue name kombu's SQS transport uses for a Celery queue name."""
    name = prefix + celery_queue
    if name.endswith(".fifo"):
        return name[: -len(".fifo")].translate(_KOMBU_CHARS_REPLACE_TABLE) + ".fifo"
    return name.translate(_KOMBU_CHARS_REPLACE_TABLE)


def redact_url(url: str | None) -> str | None:
    """``url`` with its secret replaced by ``***`` (for logs, events and errors).

    By structure, not by a URL parser: everything between ``://`` and the last ``@`` is the user
    part, whatever it holds (AWS secrets often contain an unquoted ``/``, which a parser takes for
    the start of the path and would print whole). The access key id before the first ``:`` stays.
    """
    if not url:
        return url
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    at = rest.rfind("@")
    if at < 0:
        return url
    userinfo = rest[:at]
    user = userinfo.split(":", 1)[0] + ":" if ":" in userinfo else ""
    return f"{scheme}{sep}{user}***@{rest[at + 1 :]}"


@dataclass(frozen=True)
class SQSSettings:
    """Where the queues are and how to talk to them."""

    endpoint_url: str | None = None  # None: boto's resolution (AWS_ENDPOINT_URL_SQS, ...)
    region: str | None = None  # None: boto's resolution (AWS_DEFAULT_REGION, ...)
    access_key_id: str | None = None
    secret_access_key: str | None = field(default=None, repr=False)
    queue_name_prefix: str = ""
    default_queue: str = DEFAULT_QUEUE
    # Celery queue name -> full queue URL (broker_transport_options.predefined_queues).
    predefined_queues: Mapping[str, str] = field(default_factory=dict)
    # While a worker holds a message it extends the visibility by this much, every third of
    # it. If the worker dies, the message becomes visible again at most this long afterwards.
    visibility_timeout: int = 60
    wait_time_seconds: int = 10  # long-poll length (SQS maximum 20)
    polling_interval: float = 1.0  # pause between empty polls when wait_time_seconds is 0
    connect_timeout: float = 5.0
    max_attempts: int = 3  # botocore retries (standard mode) per API call
    client_config: Mapping[str, Any] = field(default_factory=dict)
    queue_attributes: Mapping[str, str] = field(default_factory=dict)  # for `queues create`
    queue_tags: Mapping[str, str] = field(default_factory=dict)
    s3_bucket: str | None = None  # payloads larger than the queue accepts go here
    s3_prefix: str = ""
    max_payload_bytes: int = 64 * 1024 * 1024  # largest offloaded payload a worker reads
    # broker_transport_options.sts_role_arn: every client signs as this role (credentials.py),
    # assumed for sts_token_timeout seconds at a time and refreshed before it expires.
    sts_role_arn: str | None = None
    sts_token_timeout: int = 900

    def queue_name(self, celery_queue: str) -> str:
        """SQS queue name for a Celery queue name (kombu's rules, prefix included)."""
        url = self.predefined_queues.get(celery_queue)
        if url:
            return url.rstrip("/").rsplit("/", 1)[-1]
        return kombu_queue_name(celery_queue, self.queue_name_prefix)

    def describe_endpoint(self) -> str:
        return self.endpoint_url or "AWS default endpoint"


@dataclass(frozen=True)
class Settings:
    """Everything the executor, the worker and the CLI need, validated."""

    sqs: SQSSettings = field(default_factory=SQSSettings)
    include: tuple[str, ...] = ()
    prefetch_multiplier: int = 1  # worker_prefetch_multiplier (dagster-celery's default)
    worker_concurrency: int | None = None  # worker_concurrency; -c wins
    task_time_limit: float | None = None  # hard kill of a step after this many seconds
    task_soft_time_limit: float | None = None  # interrupt a step (the op may clean up) after this many seconds
    max_tasks_per_child: int | None = None  # worker_max_tasks_per_child: recycle a step child after N steps
    max_memory_per_child: int | None = None  # worker_max_memory_per_child (KiB): recycle above this RSS
    default_priority: int = 5  # task_default_priority: a step's priority without a priority tag
    always_eager: bool = False  # task_always_eager: run steps in the run's process, no broker
    step_poll_interval: float = 0.02  # how often the orchestrator tails the event log
    # --- reliability (orchestrator side) ---
    health_check_interval: int = 5  # seconds between liveness checks of running steps
    worker_lost_timeout: float = 30.0  # no heartbeat for this long: the step's worker is lost
    queued_step_warning: float = 60.0  # engine event when no worker has taken a step by then
    queued_step_timeout: float | None = None  # fail a step nobody took by then (None: wait)
    broker_outage_timeout: float = 60.0  # keep retrying a send this long through an outage
    database_outage_timeout: float = 120.0  # instance reads/writes ride out a database outage this long
    # --- fair sharing between runs (fair_share.py) ---
    steps_in_flight_per_slot: float | None = 2.0  # a run's cap per queue: this x live slots (None: no cap)
    min_steps_in_flight: int = 4  # the cap never goes below this (a run with no live worker still sends)
    # --- lanes (lanes.py): bulk runs' steps on each queue's -bulk lane; fair-queue groups ---
    lanes: bool = False  # queues create makes Q-bulk, workers consume it, bulk runs' steps go there
    message_group_tag: str | None = None  # run tag whose value is a message's MessageGroupId (None: run id)
    # --- sized pools (routing.py): steps to queues by their ecs/* and dagster-k8s/config size tags ---
    routes: RouteTable = field(default_factory=RouteTable)
    # --- reliability (worker side) ---
    heartbeat_interval: float = 5.0  # liveness record refresh while a step runs
    cancel_poll_interval: float = 1.0  # how often a worker looks for cancel requests
    # --- trust and bounded state ---
    keyring: Keyring = field(default_factory=Keyring)  # signing keys (messages.py)
    signing_required: bool = False  # Celery's task_serializer: auth asked for signed messages
    record_expiry: float = 86400.0  # workers delete liveness records nobody updated for this long
    lost_worker_expiry: float = 3600.0  # a lost worker leaves `worker list` this long after its last heartbeat
    # Warnings produced while mapping Celery settings (each a full sentence, emitted once).
    notes: tuple[str, ...] = ()

    def check_signing(self, role: str) -> None:
        """Refuse to run unsigned where the Celery config asked for signed messages; ``role`` is
        "sender" (needs a current key) or "worker" (needs a key to verify with)."""
        has_key = self.keyring.current is not None if role == "sender" else self.keyring.verifies
        if self.signing_required and not has_key:
            raise ConfigError(
                "config_source.task_serializer 'auth' / security_* ask for signed messages (Celery's message "
                "signing); set execution.config.signing_key to {env: NAME} holding a random secret of at least "
                "32 characters, the same for orchestrators, launchers and workers (workers may also take "
                "--signing-key-file), or remove those keys to send unsigned messages."
            )

    def config_queues(self, extra: Iterable[str] = ()) -> list[str]:
        """The queues this config names: the default queue, each route's pool, ``extra`` (``-q``), and
        with ``lanes`` each one's bulk lane (what ``queues create``, ``queues stats`` and ``iam-policy``
        cover). With ``lanes``, an ``extra`` named like a bulk lane is refused (``lanes.lane_name_refusal``)."""
        for queue in extra:
            self.check_queue_name(queue, "-q")
        named = list(dict.fromkeys([self.sqs.default_queue, *self.routes.queues, *extra]))
        return with_lanes(named, self.sqs.queue_name) if self.lanes else named

    def lane_name_refusal(self, queue: str, where: str, lane_fix: str | None = None) -> str | None:
        """With ``lanes``, the sentence refusing ``queue`` (named by the user in ``where``) when its name
        is a bulk lane's; None when it may be used."""
        return lane_name_refusal(queue, kombu_queue_name(queue), where, lane_fix) if self.lanes else None

    def check_queue_name(self, queue: str, where: str) -> None:
        """Raise :func:`lane_name_refusal`'s sentence as a ConfigError."""
        refusal = self.lane_name_refusal(queue, where)
        if refusal is not None:
            raise ConfigError(refusal)

    def with_sqs(self, **changes: Any) -> Settings:
        return replace(self, sqs=replace(self.sqs, **changes))
