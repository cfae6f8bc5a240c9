"""Request bodies: size-limited reading and JSON parsing (dialects validate them into wire models).

What the JSON parser accepts but nothing downstream can carry is refused here with a 400: text that
is not UTF-8, nesting past MAX_DEPTH (the parser, the validators and the re-encoding for the neuron
all recurse), and lone surrogates (`"\\ud800"` parses, but cannot be encoded to send on).
"""

from __future__ import annotations

import json
import re
from typing import Any

from fastapi import Request

from cortex.core.errors import InvalidRequest, PayloadTooLarge

# Far above real requests (tool schemas nest a dozen levels), far below Python's recursion limit.
MAX_DEPTH = 64
# A surrogate can only enter through a \uD800-\uDFFF escape once the body decoded as strict UTF-8.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object; 413 past `limit` bytes (checked while reading), 400 otherwise."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
    return parse_json(bytes(body))


def parse_json(body: bytes) -> dict[str, Any]:
    """A JSON object from a request body, refusing what could not be carried to a neuron."""
    if not body.strip():
        raise InvalidRequest("request body is empty: expected a JSON object")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"request body is not valid UTF-8: {exc}") from None
    try:
        data = json.loads(text)
    except RecursionError:
        raise InvalidRequest(f"JSON nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:
        raise InvalidRequest(f"malformed JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequest("request body must be a JSON object")
    # Both checks walk the whole tree; the cheap scans of the text skip them for nearly every body.
    if text.count("[") + text.count("{") > MAX_DEPTH:
        _check_depth(data)
    if _SURROGATE_ESCAPE.search(text):
        _check_text(data)
    return data


def _check_depth(data: Any) -> None:
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise InvalidRequest(f"JSON nested deeper than {MAX_DEPTH} levels")
        children = value.values() if isinstance(value, dict) else value
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))


def _check_text(data: Any) -> None:
    stack: list[Any] = [data]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, str) and not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidRequest(
                    "request text contains a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff "
                    "escape); it is not valid Unicode"
                ) from None
