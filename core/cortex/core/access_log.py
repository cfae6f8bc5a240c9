"""Access logs without secrets: uvicorn's access lines keep the path and drop the query string,
where a client may have put an API key (`?api_key=`) or a token (docs/security.md)."""

from __future__ import annotations

import logging

ACCESS_LOGGER = "uvicorn.access"
REDACTED = "[redacted]"


class RedactQuery(logging.Filter):
    """Rewrites an access record's path argument (`GET /v1/models?api_key=...`) before it is
    formatted; every handler of the logger, and every formatter, then sees the redacted path."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple):
            record.args = tuple(_without_query(arg) for arg in args)
        return True


def _without_query(arg: object) -> object:
    if isinstance(arg, str) and arg.startswith("/") and "?" in arg:
        return f"{arg.partition('?')[0]}?{REDACTED}"
    return arg


def redact_access_log() -> None:
    """Install the filter on uvicorn's access logger (idempotent). Call it after building a
    uvicorn.Config, which (re)configures uvicorn's loggers."""
    logger = logging.getLogger(ACCESS_LOGGER)
    if not any(isinstance(f, RedactQuery) for f in logger.filters):
        logger.addFilter(RedactQuery())
