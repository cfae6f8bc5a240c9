"""Reading a neuron's stream: whole SSE events as they come, and what each one says.

The proxy relays them through the request's dialect; every stream ends with the neuron's [DONE],
or with an error (an error event, a cut, garbage), which the proxy turns into the dialect's.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from cortex.core.errors import CortexError, NeuronUnavailable, error_from_code
from cortex.core.protocol.openai import DONE
from cortex.gateway.proxy.dispatch import Upstream


async def sse_events(upstream: Upstream) -> AsyncIterator[list[bytes]]:
    """Whole SSE events (each ending in a blank line), as soon as each is complete: those that
    one chunk of the neuron's completed come together, to go on to the client together."""
    buffer = b""
    async for chunk in upstream.chunks():
        buffer += chunk.replace(b"\r\n", b"\n")
        events = []
        while (end := buffer.find(b"\n\n")) >= 0:
            event, buffer = buffer[: end + 2], buffer[end + 2 :]
            events.append(event)
        if events:
            yield events
    if buffer.strip():
        yield [buffer + b"\n\n"]


def event_data(event: bytes) -> str | None:
    """The `data:` payload of one SSE event (lines joined), None for comments and pings."""
    lines = [line[5:].lstrip() for line in event.decode().split("\n") if line.startswith("data:")]
    return "\n".join(lines) if lines else None


def upstream_error(payload: dict[str, Any]) -> CortexError:
    """The domain error a neuron reported in an error event mid-stream."""
    error = payload.get("error")
    if not isinstance(error, dict):
        return NeuronUnavailable(f"neuron sent an error event: {payload}")
    message = str(error.get("message") or "neuron failed mid-stream")
    return error_from_code(error.get("code"), message, 503)


async def upstream_events(
    upstream: Upstream,
) -> AsyncIterator[list[tuple[bytes, dict[str, Any] | None]]]:
    """The events before the neuron's [DONE], each with its JSON data (None for a comment), in
    the batches they arrived in. An error event raises its domain error (after the events that
    came before it); a stream that ends without [DONE] raises NeuronUnavailable, and one that
    is not JSON a ValueError."""
    async for events in sse_events(upstream):
        batch: list[tuple[bytes, dict[str, Any] | None]] = []
        for event in events:
            data = event_data(event)
            if data == DONE:
                if batch:
                    yield batch
                return
            payload = json.loads(data) if data else None
            if payload is not None and "error" in payload and "choices" not in payload:
                if batch:
                    yield batch
                raise upstream_error(payload)
            batch.append((event, payload))
        yield batch
    raise NeuronUnavailable(f"neuron {upstream.neuron} ended the stream without [DONE]")
