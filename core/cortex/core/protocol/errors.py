"""The one place each API surface's error envelope is built from a CortexError."""

from __future__ import annotations

from typing import Any

from cortex.core.completion_limit import anthropic_wording
from cortex.core.errors import ContextLengthExceeded, CortexError, InvalidRequest, Overloaded

# Anthropic's status for an overloaded service: its SDKs raise OverloadedError for it (and retry
# it). Its 429 means a rate limit: here a key's budget or in-flight cap, never the fleet's load.
ANTHROPIC_OVERLOADED = 529

# Anthropic's error types by HTTP status (https://docs.anthropic.com/en/api/errors); any other
# status (500, 503) is an `api_error`.
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    504: "timeout_error",
    ANTHROPIC_OVERLOADED: "overloaded_error",
}


def openai_error(err: CortexError) -> dict[str, Any]:
    """OpenAI's envelope: {"error": {"message", "type", "param", "code"}}; a refusal for room
    adds `memory: {"needed", "free"}` (bytes), which the OpenAI SDKs keep in the error's body."""
    error: dict[str, Any] = {
        "message": err.message,
        "type": err.kind,
        "param": err.param,
        "code": err.code,
    }
    if err.memory is not None:
        error["memory"] = err.memory.wire()
    return {"error": error}


def anthropic_status(err: CortexError) -> int:
    """The HTTP status of `err` on Anthropic's surface: overload (a neuron's full queue or queue
    timeout, the gateway's "busy") is Anthropic's 529; everything else keeps its own."""
    return ANTHROPIC_OVERLOADED if isinstance(err, Overloaded) else err.status


def anthropic_error(err: CortexError) -> dict[str, Any]:
    """Anthropic's envelope: {"type": "error", "error": {"type", "message"}}."""
    kind = _ANTHROPIC_TYPES.get(anthropic_status(err), "api_error")
    message = err.message
    if err.code == ContextLengthExceeded.code:
        message = anthropic_wording(message)
    return {"type": "error", "error": {"type": kind, "message": message}}


# Said when a 429 or 503 has no better estimate: every such answer tells the client when to retry.
DEFAULT_RETRY_AFTER = 1.0


def error_headers(err: CortexError) -> dict[str, str]:
    """Retry-After for overload, budget and unavailability answers (every 429 and 503)."""
    retry_after = err.retry_after
    if retry_after is None and err.status in (429, 503):
        retry_after = DEFAULT_RETRY_AFTER
    if retry_after is None:
        return {}
    return {"Retry-After": str(max(1, round(retry_after)))}


def invalid_request(errors: list[Any], data: Any) -> InvalidRequest:
    """A pydantic validation report on `data` as one 400 naming the problem that says most.

    A field that takes a string or a list (message content, Responses input) fails once per
    alternative; the deepest failure is the one the client made (`content.0.text: Field
    required`, not `content: Input should be a valid string`). Union member names pydantic puts
    in a location (`str`, `list[...]`, a tag) are left out of the field path."""
    if not errors:
        return InvalidRequest("invalid request")
    named = [(_field_path(error.get("loc", ()), data), error) for error in errors]
    depth = max(len(path) for path, _ in named)
    deepest = [(path, error) for path, error in named if len(path) == depth]
    path = deepest[0][0]
    said = dict.fromkeys(_said(error) for p, error in deepest if p == path)
    where = ".".join(str(part) for part in path) or None
    message = " or ".join(said)
    return InvalidRequest(f"{where}: {message}" if where else message, param=where)


def _said(error: Any) -> str:
    return "field required" if error.get("type") == "missing" else str(error.get("msg"))


def _field_path(loc: tuple[Any, ...], data: Any) -> list[str | int]:
    """`loc` walked over the data it points into: keys and indexes kept, the names of union
    members dropped (a missing field, last in `loc`, is kept too)."""
    path: list[str | int] = []
    node = data
    for n, part in enumerate(loc):
        if isinstance(node, list) and isinstance(part, int):
            path.append(part)
            node = node[part] if 0 <= part < len(node) else None
        elif (
            isinstance(node, dict) and isinstance(part, str) and (part in node or n == len(loc) - 1)
        ):
            path.append(part)
            node = node.get(part)
    return path
