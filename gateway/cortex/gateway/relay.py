"""Streaming to clients: OpenAI streams relayed as they come, translated streams for the other
dialects, keep-alives while a cold model loads, and an error event when a neuron dies mid-way.

Every stream ends: with the upstream's end, with an error event, or with the client leaving (the
upstream response is then closed, which tells the neuron to stop generating).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, Protocol

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from cortex.core.errors import CortexError, NeuronUnavailable, error_from_code
from cortex.core.protocol.errors import openai_error
from cortex.core.protocol.openai import ChatCompletionChunk, Usage
from cortex.gateway.call import Accounting, Call
from cortex.gateway.dispatch import Upstream

OPENAI_KEEPALIVE = b": keep-alive\n\n"
DONE = "[DONE]"


async def sse_events(upstream: Upstream) -> AsyncIterator[bytes]:
    """Whole SSE events (each ending in a blank line), yielded as soon as each is complete."""
    buffer = b""
    async for chunk in upstream.chunks():
        buffer += chunk.replace(b"\r\n", b"\n")
        while (end := buffer.find(b"\n\n")) >= 0:
            event, buffer = buffer[: end + 2], buffer[end + 2 :]
            yield event
    if buffer.strip():
        yield buffer + b"\n\n"


def event_data(event: bytes) -> str | None:
    """The `data:` payload of one SSE event (lines joined), None for comments and pings."""
    lines = [line[5:].lstrip() for line in event.decode().split("\n") if line.startswith("data:")]
    return "\n".join(lines) if lines else None


def openai_error_event(err: CortexError) -> bytes:
    """What an OpenAI client reads when a stream fails mid-way (the SDKs raise on it)."""
    return f"data: {json.dumps(openai_error(err))}\n\ndata: {DONE}\n\n".encode()


def upstream_error(payload: dict[str, Any]) -> CortexError:
    """The domain error a neuron reported in an error event mid-stream."""
    error = payload.get("error")
    if not isinstance(error, dict):
        return NeuronUnavailable(f"neuron sent an error event: {payload}")
    message = str(error.get("message") or "neuron failed mid-stream")
    return error_from_code(error.get("code"), message, 503)


def _usage(payload: dict[str, Any]) -> Usage | None:
    usage = payload.get("usage")
    return Usage.model_validate(usage) if isinstance(usage, dict) else None


def _has_token(payload: dict[str, Any]) -> bool:
    for choice in payload.get("choices") or []:
        delta = choice.get("delta") or {}
        if delta.get("content") or delta.get("tool_calls") or choice.get("text"):
            return True
    return False


async def relay_openai(
    upstream: Upstream, call: Call, accounting: Accounting, *, include_usage: bool
) -> AsyncIterator[bytes]:
    """The neuron's OpenAI stream, event by event, unchanged, except the usage-only chunk that
    cortex asked for on its own account when the client did not."""
    usage: Usage | None = None
    tokens = 0
    error: CortexError | None = None
    try:
        done = False
        async for event in sse_events(upstream):
            data = event_data(event)
            if data == DONE:
                done = True
            elif data:
                payload = json.loads(data)
                if "error" in payload and "choices" not in payload:
                    error = upstream_error(payload)
                usage = _usage(payload) or usage
                if _has_token(payload):
                    tokens += 1
                    accounting.first_token(call)
                if not include_usage and not payload.get("choices") and "usage" in payload:
                    continue
            yield event
            if error is not None:
                yield f"data: {DONE}\n\n".encode()
            if done or error is not None:
                return
        raise NeuronUnavailable(f"neuron {upstream.neuron} ended the stream without [DONE]")
    except (CortexError, ValueError) as exc:
        error = exc if isinstance(exc, CortexError) else NeuronUnavailable(f"bad stream: {exc}")
        yield openai_error_event(error)
    finally:
        await _close(upstream)
        usage = usage or Usage(prompt_tokens=0, completion_tokens=tokens, total_tokens=tokens)
        accounting.finish(call, usage=usage, error=error)


async def chat_chunks(upstream: Upstream) -> AsyncIterator[ChatCompletionChunk]:
    """The neuron's chat stream as chunks; a stream cut short raises NeuronUnavailable."""
    async for event in sse_events(upstream):
        data = event_data(event)
        if data == DONE:
            return
        if not data:
            continue
        payload = json.loads(data)
        if "error" in payload and "choices" not in payload:
            raise upstream_error(payload)
        yield ChatCompletionChunk.model_validate(payload)
    raise NeuronUnavailable(f"neuron {upstream.neuron} ended the stream without [DONE]")


class EventTranslator(Protocol):
    """What the Anthropic and Responses stream translators share."""

    def start(self) -> list[Any]: ...
    def feed(self, chunk: ChatCompletionChunk) -> list[Any]: ...
    def finish(self) -> list[Any]: ...


async def relay_translated(
    upstream: Upstream,
    call: Call,
    accounting: Accounting,
    translator: EventTranslator,
    encode: Callable[[Any], bytes],
    on_error: Callable[[CortexError], Iterable[bytes]],
) -> AsyncIterator[bytes]:
    """The neuron's chat stream translated to another dialect's events; a failure mid-way ends
    it with that dialect's error events."""
    usage: Usage | None = None
    tokens = 0
    error: CortexError | None = None
    try:
        # No eager start(): the first chunk's usage (continuous_usage_stats) gives message_start
        # its input token count; feed() and finish() start the stream themselves.
        async for chunk in chat_chunks(upstream):
            usage = chunk.usage or usage
            if any(c.delta.content or c.delta.tool_calls for c in chunk.choices):
                tokens += 1
                accounting.first_token(call)
            for event in translator.feed(chunk):
                yield encode(event)
        for event in translator.finish():
            yield encode(event)
    except (CortexError, ValueError) as exc:
        error = exc if isinstance(exc, CortexError) else NeuronUnavailable(f"bad stream: {exc}")
        for frame in on_error(error):
            yield frame
    finally:
        await _close(upstream)
        usage = usage or Usage(prompt_tokens=0, completion_tokens=tokens, total_tokens=tokens)
        accounting.finish(call, usage=usage, error=error)


async def when_ready(
    opening: asyncio.Task[Upstream],
    relay: Callable[[Upstream], AsyncIterator[bytes]],
    *,
    keepalive: Callable[[], bytes],
    interval: float,
    on_error: Callable[[CortexError], Iterable[bytes]],
) -> AsyncIterator[bytes]:
    """Keep-alives until the upstream opens (a cold load), then its relay; a failed open becomes
    the dialect's error events. A client that leaves while waiting withdraws from the load."""
    relaying = False
    try:
        while True:
            done, _ = await asyncio.wait({opening}, timeout=interval)
            if done:
                break
            yield keepalive()
        try:
            upstream = opening.result()
        except CortexError as err:
            for chunk in on_error(err):
                yield chunk
            return
        relaying = True
        async for chunk in relay(upstream):
            yield chunk
    finally:
        if not opening.done():
            opening.cancel()
        elif not relaying and not opening.cancelled() and opening.exception() is None:
            await _close(opening.result())


class EventStream(StreamingResponse):
    """A text/event-stream whose cleanup runs however the response ends, even when the client
    left before the body was first iterated (a generator never started never runs its finally)."""

    media_type = "text/event-stream"

    def __init__(
        self, content: AsyncIterator[bytes], cleanup: Callable[[], Awaitable[None]]
    ) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._cleanup = cleanup

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._cleanup()


async def _close(upstream: Upstream) -> None:
    # Shielded: this runs while the client's disconnect is cancelling us, and must still finish.
    with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
        await upstream.aclose()
