"""Server logs a user can read: uvicorn's access lines without secrets (the query string, where a
client may have put an API key or a token: docs/security.md) and without cortex's own internal
polls; `Started server process` once; every record with its request id; JSON on request."""

from __future__ import annotations

import http
import json
import logging
import time
from typing import ClassVar

from cortex.core.request_context import internal_poll, request_id

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


class SkipInternalPolls(logging.Filter):
    """The gateway polls each neuron every poll_interval; those lines would bury the real ones."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not internal_poll.get()


class StartedOnce(logging.Filter):
    """Two or three uvicorn servers (API, metrics, `cortex up`'s neuron) in one process each say
    `Started server process` and `Finished server process`: say each once."""

    ONCE = ("Started server process [%d]", "Finished server process [%d]")
    said: ClassVar[set[str]] = set()  # per process: the servers share the logger

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg not in self.ONCE:
            return True
        first = record.msg not in StartedOnce.said
        StartedOnce.said.add(str(record.msg))
        return first


class RequestIdField(logging.Filter):
    """Puts the current request's id on every record (`-` outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get() or "-"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id (and the exception)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None) or request_id.get(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if isinstance(usage := getattr(record, "usage", None), dict):
            entry["usage"] = usage  # the gateway's per-request line ([gateway] usage_log)
        if isinstance(fields := getattr(record, "fields", None), dict):
            entry.update(fields)  # a record's own fields, beside the message (the banner's URLs)
        return json.dumps(entry)


# uvicorn's access format, and the fixed part of its INFO prefix when colours are off.
UVICORN_ACCESS_FORMAT = '%(levelprefix)s %(client_addr)s - "%(request_line)s" %(status_code)s'
_INFO_PREFIX = "INFO:" + " " * 5
_STATUS = {status.value: f"{status.value} {status.phrase}" for status in http.HTTPStatus}


class AccessLine(logging.Formatter):
    """uvicorn's access line, the same text at a third of its formatter's cost (that copies the
    record and looks the status phrase up on every line): it is written once per request
    (docs/benchmarks.md, P1)."""

    def __init__(self, uvicorns: logging.Formatter) -> None:
        super().__init__()
        self.uvicorns = uvicorns  # for any record not of the usual shape

    def format(self, record: logging.LogRecord) -> str:
        args = record.args
        if record.levelno != logging.INFO or not isinstance(args, tuple) or len(args) != 5:
            return self.uvicorns.format(record)
        client, method, path, version, status = args
        phrase = _STATUS.get(status) or f"{status} "  # type: ignore[call-overload]
        return f'{_INFO_PREFIX}{client} - "{method} {path} HTTP/{version}" {phrase}'


def _plain_uvicorn_access(formatter: logging.Formatter) -> bool:
    """uvicorn's own access formatter, with its format and without colours."""
    return (
        type(formatter).__name__ == "AccessFormatter"
        and getattr(formatter, "_fmt", None) == UVICORN_ACCESS_FORMAT
        and not getattr(formatter, "use_colors", True)
    )


_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_LOG_FORMAT = {"value": "text"}


def configure_logging(level: int, log_format: str = "text") -> None:
    """The root handler for cortex's own records; uvicorn's are set up by tidy_server_logs."""
    _LOG_FORMAT["value"] = log_format
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdField())
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(_TEXT_FORMAT)
    )
    logging.basicConfig(level=level, handlers=[handler])  # a no-op where one is set (tests)


def json_logs() -> bool:
    """Whether --log-format json was chosen: then every line cortex writes is a JSON object."""
    return _LOG_FORMAT["value"] == "json"


def tidy_server_logs() -> None:
    """Install the filters on uvicorn's loggers and the lean access formatter (idempotent), and
    with --log-format json send uvicorn's records through the JSON root handler. Call it after building every
    uvicorn.Config, which (re)configures uvicorn's loggers."""
    access, error = logging.getLogger(ACCESS_LOGGER), logging.getLogger("uvicorn.error")
    for logger, kind in ((access, RedactQuery), (access, SkipInternalPolls), (error, StartedOnce)):
        if not any(isinstance(f, kind) for f in logger.filters):
            logger.addFilter(kind())
    for handler in access.handlers:
        if handler.formatter is not None and _plain_uvicorn_access(handler.formatter):
            handler.setFormatter(AccessLine(handler.formatter))
    if json_logs():
        for name in ("uvicorn", "uvicorn.error", ACCESS_LOGGER):
            logger = logging.getLogger(name)
            logger.handlers.clear()
            logger.propagate = True


redact_access_log = tidy_server_logs  # the name call sites used before the other filters
