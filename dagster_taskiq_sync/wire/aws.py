"""Who signs the calls: an IAM role assumed through STS, refreshed before it expires.

``broker_transport_options.sts_role_arn`` (kombu's option) makes every SQS/S3/KMS client of a
process (executor, run launcher, worker, the CLI) sign with temporary credentials of that role.
They come from STS ``AssumeRole``, called with the credentials the process would otherwise use
(the broker URL's key and secret, else boto's default chain: environment, profile, IRSA web
identity, ECS task role, instance profile), for ``sts_token_timeout`` seconds (kombu's default
and STS's minimum, 900).

Long-lived workers must outlive any one token. The credentials are aiobotocore's refreshable
credentials, so every signing first checks the expiry: inside the *advisory* window before it one
caller refreshes while others keep signing with the current token; inside the *mandatory* window
everyone waits for the new one. botocore's windows (15 and 10 minutes) assume tokens of an hour:
with a 900 s token they would call AssumeRole on every request, so they scale with the token's
life here (a third and a sixth of it, capped at botocore's).

Without ``sts_role_arn`` nothing here is used: IRSA and ECS task roles need no setting, boto's
default chain already refreshes them.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import re
import socket
import threading
from collections.abc import Callable
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.credentials import AioDeferredRefreshableCredentials
from aiobotocore.session import get_session
from botocore import exceptions as boto_exc

from dagster_taskiq_sync.errors import ConfigError
from dagster_taskiq_sync.wire.settings import SQSSettings

log = logging.getLogger("dagster_taskiq_sync.credentials")

DEFAULT_TOKEN_SECONDS = 900  # kombu's default, and STS's minimum
MAX_TOKEN_SECONDS = 43200  # STS's maximum (a role's MaxSessionDuration may be lower)
ADVISORY_CAP = 15 * 60  # botocore's defaults
MANDATORY_CAP = 10 * 60
_ROLE_ARN = re.compile(r"^arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]{1,512}$")


def check_role_arn(value: Any, path: str) -> str:
    if not isinstance(value, str) or not _ROLE_ARN.fullmatch(value):
        raise ConfigError(f"{path} {value!r} is not an IAM role ARN; write arn:aws:iam::ACCOUNT_ID:role/ROLE_NAME.")
    return value


def check_token_seconds(value: Any, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)) or not str(value).strip().isdigit():
        raise ConfigError(f"{path} must be a whole number of seconds, got {value!r}; STS accepts 900 to 43200.")
    seconds = int(str(value).strip())
    if not DEFAULT_TOKEN_SECONDS <= seconds <= MAX_TOKEN_SECONDS:
        raise ConfigError(f"{path} {seconds} is outside what STS accepts; use 900 to 43200 seconds.")
    return seconds


def for_service(kwargs: dict[str, Any]) -> dict[str, Any]:
    """create_client arguments of the SQS client, adapted for another service (STS, KMS).

    An ``sqs://host:port`` endpoint serves every service when it is a local one (moto); an AWS
    SQS host (sqs.REGION.amazonaws.com) does not, so boto's own endpoint for the other service is used.
    """
    endpoint = kwargs.get("endpoint_url") or ""
    host = endpoint.split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0]
    if host.endswith((".amazonaws.com", ".amazonaws.com.cn", ".api.aws")):
        return {**kwargs, "endpoint_url": None}
    return kwargs


def refresh_windows(duration: float) -> tuple[float, float]:
    """(advisory, mandatory) seconds before expiry at which the credentials are refreshed."""
    return min(ADVISORY_CAP, duration / 3), min(MANDATORY_CAP, duration / 6)


class RoleCredentials(AioDeferredRefreshableCredentials):
    """Deferred refreshable credentials whose refresh windows follow the token's life."""

    def __init__(self, refresh_using: Any, duration: float, time_fetcher: Any = None) -> None:
        kwargs = {"time_fetcher": time_fetcher} if time_fetcher is not None else {}
        super().__init__(refresh_using=refresh_using, method="assume-role", **kwargs)
        self._advisory_refresh_timeout, self._mandatory_refresh_timeout = refresh_windows(duration)
        self.refreshes = 0  # AssumeRole calls made, for logs and tests


def session_name() -> str:
    """RoleSessionName: who assumed the role, as CloudTrail shows it (64 characters at most)."""
    raw = f"dagster-taskiq-sync-{socket.gethostname()}-{os.getpid()}"
    return re.sub(r"[^\w+=,.@-]", "-", raw)[:64]


_loader: Any = None
_loader_lock = threading.Lock()


def share_service_models(session: Any) -> Any:
    """Let ``session`` use the process's one botocore data loader, which keeps the SQS and S3
    service models, endpoint rules and defaults it has read. Every broker has a session of its own
    (its credentials and role are its own), and a fresh session reads and parses those JSON files
    again: most of a run's ~0.3 s of start-up on this machine (py-spy), paid again by every run of
    a long-lived process. Only the loader is shared; nothing of it depends on credentials."""
    global _loader
    with _loader_lock:
        if _loader is None:
            _loader = session.get_component("data_loader")
        else:
            session.register_component("data_loader", _loader)
    return session


class LazyClient:
    """An aiobotocore client opened on its first call. A run's broker needs S3 only for a payload
    larger than its queue accepts, and opening the S3 client reads S3's service model (~0.4 s in
    a fresh run process here): most runs never pay it. ``opened`` is what closing must exit."""

    def __init__(self, create: Callable[[], Any]) -> None:
        # () -> session.create_client(...), called on first use: a creator made and never entered
        # leaves a coroutine that was never awaited.
        self._create = create
        self._client: Any = None
        self._lock: asyncio.Lock | None = None
        self.opened: Any = None

    async def client(self) -> Any:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._client is None:
                creator = self._create()
                self._client = await creator.__aenter__()
                self.opened = creator
        return self._client

    def __getattr__(self, operation: str) -> Any:
        async def call(*args: Any, **kwargs: Any) -> Any:
            return await getattr(await self.client(), operation)(*args, **kwargs)

        return call


def role_credentials(settings: Any, duration: float | None = None) -> RoleCredentials:
    """Refreshing credentials of ``settings.sts_role_arn``.

    ``duration`` overrides ``settings.sts_token_timeout`` (tests use a few seconds; STS itself
    refuses less than 900).
    """
    role_arn = settings.sts_role_arn
    seconds = int(duration or settings.sts_token_timeout)
    name = session_name()
    base = share_service_models(get_session())
    credentials: RoleCredentials

    async def assume() -> dict[str, Any]:
        # the base credentials: broker URL key/secret, else boto's chain
        kwargs = for_service(client_kwargs(settings, base, with_role=False))
        try:
            async with base.create_client("sts", **kwargs) as sts:
                answer = await sts.assume_role(RoleArn=role_arn, RoleSessionName=name, DurationSeconds=seconds)
        except boto_exc.ClientError as exc:
            error = exc.response.get("Error", {})
            raise ConfigError(
                f"assuming broker_transport_options.sts_role_arn {role_arn!r} failed ({error.get('Code')}: "
                f"{error.get('Message')}); allow sts:AssumeRole on it for these credentials (and in the role's "
                "trust policy), and keep sts_token_timeout within the role's maximum session duration."
            ) from None
        except boto_exc.NoCredentialsError:
            raise ConfigError(
                f"broker_transport_options.sts_role_arn {role_arn!r} is assumed with the process's own AWS "
                "credentials, and none were found; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile, "
                "or a role (IRSA, ECS task role, instance profile)."
            ) from None
        token = answer["Credentials"]
        credentials.refreshes += 1
        log.info("assumed role %s until %s (refresh %d)", role_arn, token["Expiration"], credentials.refreshes)
        expiration = token["Expiration"]
        if isinstance(expiration, datetime.datetime):
            expiration = expiration.isoformat()
        return {
            "access_key": token["AccessKeyId"],
            "secret_key": token["SecretAccessKey"],
            "token": token["SessionToken"],
            "expiry_time": expiration,
        }

    credentials = RoleCredentials(assume, seconds)
    return credentials


class _RoleResolver:
    """Stands in for a session's credential resolver: every client of the session signs as the role."""

    def __init__(self, credentials: RoleCredentials) -> None:
        self.credentials = credentials

    async def load_credentials(self) -> RoleCredentials:
        return self.credentials


def use_role(session: Any, settings: Any) -> RoleCredentials:
    """Make ``session``'s clients sign with the role's refreshing credentials (once per session)."""
    current = getattr(session, "_dagster_taskiq_sync_role", None)
    if current is None or current[0] != (settings.sts_role_arn, settings.sts_token_timeout):
        credentials = role_credentials(settings)
        session.register_component("credential_provider", _RoleResolver(credentials))
        session._dagster_taskiq_sync_role = ((settings.sts_role_arn, settings.sts_token_timeout), credentials)
        return credentials
    return current[1]


def client_kwargs(settings: SQSSettings, session: Any, with_role: bool = True) -> dict[str, Any]:
    """create_client arguments for the SQS and S3 clients (explicit settings, else boto's).

    With ``sts_role_arn`` the session's clients sign as that role (refreshing credentials.py
    credentials, assumed with the explicit key/secret or boto's chain); ``with_role=False`` gives
    the arguments for the STS client that assumes it.
    """
    options: dict[str, Any] = {
        "connect_timeout": settings.connect_timeout,
        # Long polls hold the connection up to wait_time_seconds; leave room beyond it.
        "read_timeout": settings.wait_time_seconds + 20,
        "retries": {"max_attempts": settings.max_attempts, "mode": "standard"},
    }
    options.update(settings.client_config)
    kwargs = {
        "region_name": settings.region or session.get_config_variable("region") or "us-east-1",
        "endpoint_url": settings.endpoint_url,
        "aws_access_key_id": settings.access_key_id,
        "aws_secret_access_key": settings.secret_access_key,
        "config": AioConfig(**options),
    }
    if with_role and settings.sts_role_arn:
        use_role(session, settings)
        kwargs.update(aws_access_key_id=None, aws_secret_access_key=None)
    return kwargs
