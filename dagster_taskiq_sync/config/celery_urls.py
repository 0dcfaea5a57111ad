"""Celery's broker and backend URLs -> SQS and S3 settings.

``broker: sqs://...`` (kombu's SQS transport URL forms) becomes the SQS endpoint and credentials;
``backend:`` (``rpc://``, ``s3://bucket/prefix``, ...) says where results and large payloads go. A
URL this project cannot serve is refused with one sentence naming the setting and the fix, and a
secret in a URL never appears in that sentence.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

from dagster_taskiq_sync.errors import ConfigError
from dagster_taskiq_sync.wire.settings import redact_url

SUPPORTED_BROKERS = (
    "'sqs://' (AWS defaults), 'sqs://host:port' (an endpoint such as a local one) or 'sqs://key:secret@host:port'"
)


QUOTE_HINT = "(URL-quote '/', '?', '#' and '@' in a key or secret as %2F, %3F, %23, %40)"


def parse_broker_url(url: str | None, *, is_secure: bool = False) -> dict[str, Any]:
    """SQSSettings fields for a Celery broker URL.

    ``sqs://`` keeps boto's own resolution; ``sqs://host:port`` is an HTTP endpoint
    (``is_secure`` makes it HTTPS); ``sqs://key:secret@...`` carries URL-quoted credentials.
    """
    if url is None or url.strip() == "":
        return {}
    shown = redact_url(url)
    try:
        parts = urlsplit(url.strip())
        port = parts.port  # raises ValueError on a non-numeric port
    except ValueError:
        raise ConfigError(
            f"execution.config.broker {shown!r} is not a valid URL; use {SUPPORTED_BROKERS} {QUOTE_HINT}."
        ) from None
    scheme = parts.scheme.lower()
    if scheme != "sqs":
        what = f"scheme {scheme + '://'!r}" if scheme else "no scheme"
        raise ConfigError(
            f"execution.config.broker {shown!r} has {what}, which taskiq_executor does not "
            f"support (it runs on SQS only); use {SUPPORTED_BROKERS}."
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(
            f"execution.config.broker {shown!r} has a path or query SQS does not use; use {SUPPORTED_BROKERS} "
            f"{QUOTE_HINT}."
        )
    fields: dict[str, Any] = {}
    if parts.username or parts.password:
        if not (parts.username and parts.password):
            raise ConfigError(
                f"execution.config.broker {shown!r} has an access key without a secret (or a "
                "secret without a key); write both as sqs://KEY:SECRET@ (URL-quoted)."
            )
        fields["access_key_id"] = unquote(parts.username)
        fields["secret_access_key"] = unquote(parts.password)
    host = parts.hostname
    if host:
        if port is None:
            raise ConfigError(
                f"execution.config.broker {shown!r} names host {host!r} without a port; "
                "write sqs://HOST:PORT (for example sqs://127.0.0.1:9324)."
            )
        scheme = "https" if is_secure else "http"
        fields["endpoint_url"] = f"{scheme}://{host}:{port}"
    elif port is not None:
        raise ConfigError(f"execution.config.broker {shown!r} has a port but no host; write sqs://HOST:PORT.")
    return fields


def parse_backend_url(url: str | None) -> dict[str, Any]:
    """SQSSettings fields for a Celery result backend URL.

    ``rpc://`` (Celery's default) needs nothing but the queue: step results and events go
    through the Dagster instance's event log, so it maps to that. ``s3://bucket/prefix``
    names the bucket that payloads larger than the queue accepts are offloaded to.
    """
    if url is None or url.strip() in ("", "rpc://", "rpc"):
        return {}
    shown = redact_url(url)
    parts = urlsplit(url.strip())
    if parts.scheme == "s3" and parts.netloc:
        return {"s3_bucket": parts.netloc, "s3_prefix": parts.path.strip("/")}
    raise ConfigError(
        f"execution.config.backend {shown!r} is not supported: step results travel through "
        "the Dagster instance's event log; use 'rpc://' (the default, no extra service) or "
        "'s3://BUCKET/PREFIX' to offload large payloads to S3."
    )
