"""The neuron's event stream: a keep-alive comment whenever generation is silent for a while (a
tool call is held back until whole), never inside another message, never after the end."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from cortex.neuron.sse import KEEPALIVE, EventStreamResponse


async def test_a_silent_stream_sends_keep_alives_and_then_its_events() -> None:
    sent: list[dict[str, Any]] = []
    heard = asyncio.Event()
    never_leaves = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield b"data: 1\n\n"
        await heard.wait()  # silent until a keep-alive went out
        yield b"data: 2\n\n"

    async def receive() -> dict[str, Any]:
        await never_leaves.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message.get("body") == KEEPALIVE:
            heard.set()

    response = EventStreamResponse(body(), keepalive_after=0.02)
    await asyncio.wait_for(response({"type": "http"}, receive, send), timeout=10)
    bodies = [m.get("body") for m in sent if m["type"] == "http.response.body"]
    first, then = bodies.index(b"data: 1\n\n"), bodies.index(b"data: 2\n\n")
    assert KEEPALIVE in bodies[first:then]  # while silent
    assert bodies[-1] == b"" and KEEPALIVE not in bodies[then:]  # none after the end
    assert sent[0]["type"] == "http.response.start"


async def test_a_stream_that_keeps_talking_sends_no_keep_alive() -> None:
    sent: list[bytes] = []

    async def body() -> AsyncIterator[bytes]:
        for n in range(5):
            yield f"data: {n}\n\n".encode()

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message.get("body", b""))

    await EventStreamResponse(body(), keepalive_after=60)({"type": "http"}, receive, send)
    assert KEEPALIVE not in sent


async def test_a_client_gone_before_the_first_chunk_still_closes_what_streams() -> None:
    """Closing a body iterator that never started runs none of its cleanup: `on_close` runs
    anyway, so the generation behind it stops instead of running to its token limit."""
    closed = asyncio.Event()
    started = False

    async def body() -> AsyncIterator[bytes]:
        nonlocal started
        started = True
        yield b"data: 1\n\n"

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}  # gone at once

    async def send(message: dict[str, Any]) -> None:
        await asyncio.Event().wait()  # never gets to write: the disconnect wins

    async def close() -> None:
        closed.set()

    response = EventStreamResponse(body(), on_close=close)
    await asyncio.wait_for(response({"type": "http"}, receive, send), timeout=10)
    assert closed.is_set() and not started
