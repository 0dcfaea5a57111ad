"""Logging for the commands that run a server or a worker in the foreground."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]

# Libraries whose records below WARNING are protocol chatter and, at DEBUG, secrets: botocore logs
# request headers, AssumeRole's secret key and every session token. They stay at WARNING whatever
# --loglevel says unless named with --debug-logger.
QUIET_LOGGERS = ("botocore", "aiobotocore", "boto3", "s3transfer", "urllib3", "aiohttp", "alembic", "asyncio")


def configure_logging(level: int, debug_loggers: Sequence[str] = ()) -> None:
    """The worker's log on stderr at ``level``; library loggers at WARNING or above unless named."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    named = set(debug_loggers)
    for name in QUIET_LOGGERS:
        if name not in named:
            logging.getLogger(name).setLevel(max(logging.WARNING, level))
    for name in named:
        logging.getLogger(name).setLevel(level)
