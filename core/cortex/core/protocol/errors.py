"""The one place each API surface's error envelope is built from a CortexError."""

from __future__ import annotations

from typing import Any

from cortex.core.errors import CortexError

# Anthropic's error types by HTTP status (https://docs.anthropic.com/en/api/errors).
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
    503: "overloaded_error",
    529: "overloaded_error",
}


def openai_error(err: CortexError) -> dict[str, Any]:
    """OpenAI's envelope: {"error": {"message", "type", "param", "code"}}."""
    return {
        "error": {"message": err.message, "type": err.kind, "param": err.param, "code": err.code}
    }


def anthropic_error(err: CortexError) -> dict[str, Any]:
    """Anthropic's envelope: {"type": "error", "error": {"type", "message"}}."""
    kind = _ANTHROPIC_TYPES.get(err.status, "api_error")
    return {"type": "error", "error": {"type": kind, "message": err.message}}


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
