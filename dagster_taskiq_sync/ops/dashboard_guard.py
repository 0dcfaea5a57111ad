"""Who decides whether a dashboard request may change anything: the redrive token and the request's origin.

The operator page is read-only unless ``dagster-taskiq-sync dashboard --allow-redrive`` is given with
a token. A redrive is then a POST that must carry that token (compared in constant time; the page
never contains it, so a reader of the page cannot submit one) and come from the page's own origin:
its Origin header, or without one its Referer, must be the origin the request was sent to, so a
form on another site cannot submit it in a logged-in operator's browser (CSRF). ``dashboard.py``
also checks the Host, against DNS rebinding.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

from dagster_taskiq_sync.errors import ConfigError

TOKEN_ENV = "DAGSTER_TASKIQ_SYNC_DASHBOARD_TOKEN"
MIN_TOKEN_CHARS = 16


def load_token(allow_redrive: bool, token_file: str | None, env: dict[str, str] | Any) -> str | None:
    """The redrive token from ``--redrive-token-file`` or the environment; None when redrive is off."""
    if not allow_redrive:
        if token_file:
            raise ConfigError(
                "--redrive-token-file is given without --allow-redrive; add --allow-redrive to enable the "
                "redrive action, or drop the token file to keep the dashboard read-only."
            )
        return None
    if token_file:
        try:
            with open(token_file, encoding="utf-8") as fh:
                token = fh.read().strip()
        except OSError as exc:
            raise ConfigError(f"--redrive-token-file {token_file!r} cannot be read ({exc.strerror}).") from None
        where = f"--redrive-token-file {token_file!r}"
    else:
        token, where = str(env.get(TOKEN_ENV, "")).strip(), TOKEN_ENV
    if not token:
        raise ConfigError(
            f"--allow-redrive needs a token and {where} gives none; put one in a file for --redrive-token-file "
            f"or in {TOKEN_ENV} (e.g. python -c 'import secrets; print(secrets.token_urlsafe(24))')."
        )
    if len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(
            f"the redrive token from {where} has {len(token)} characters; use at least {MIN_TOKEN_CHARS} random ones "
            "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(24))')."
        )
    return token


def token_matches(given: str, expected: str) -> bool:
    """Constant time in the tokens' contents and lengths (both are hashed first)."""
    return hmac.compare_digest(
        hmac.new(b"dashboard", given.encode("utf-8", "replace"), "sha256").digest(),
        hmac.new(b"dashboard", expected.encode("utf-8", "replace"), "sha256").digest(),
    )


@dataclass(frozen=True)
class Request:
    """One parsed request: method, path, query, headers (lower-case names) and body."""

    head: bytes
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes

    @classmethod
    def parse(cls, head: bytes, body: bytes) -> Request | None:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return None
        target = urlsplit(parts[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers.setdefault(name.strip().lower(), value.strip())
        query = {k: v[0] for k, v in parse_qs(target.query).items()}
        return cls(head, parts[0], target.path, query, headers, body)

    @property
    def host(self) -> str | None:
        return self.headers.get("host")

    def same_origin(self) -> bool:
        """The request comes from a page of this origin (http(s)://Host, https behind a TLS proxy):
        its Origin says so, or, without an Origin, its Referer. Neither present: refused."""
        origin = self.headers.get("origin")
        if origin is None or origin == "null":
            referer = urlsplit(self.headers.get("referer", ""))
            origin = f"{referer.scheme}://{referer.netloc}" if referer.scheme and referer.netloc else None
        if not (origin and self.host):
            return False
        return origin.lower() in (f"http://{self.host}".lower(), f"https://{self.host}".lower())

    def form(self) -> dict[str, str]:
        if not self.headers.get("content-type", "").lower().startswith("application/x-www-form-urlencoded"):
            return {}
        fields = parse_qs(self.body.decode("utf-8", "replace"), keep_blank_values=True)
        return {k: v[0] for k, v in fields.items()}
