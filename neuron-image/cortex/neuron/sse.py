"""Server-sent events: the framing OpenAI clients read, and a response that stops when they leave."""

from __future__ import annotations

import json
from contextlib import suppress
from typing import Any

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from cortex.core.errors import CortexError
from cortex.core.protocol import openai
from cortex.core.protocol.errors import openai_error

DONE = f"data: {openai.DONE}\n\n".encode()


def sse_data(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def sse_error(err: CortexError) -> bytes:
    """An error after the stream began: OpenAI's SDKs raise on a data event with an `error` key."""
    return sse_data(openai_error(err))


class EventStreamResponse(StreamingResponse):
    """A text/event-stream that ends its body iterator as soon as the client disconnects.

    Starlette only notices a gone client on its next write under ASGI 2.4, and never closes the
    iterator itself; a generation waiting for a slow token must stop at once, so we listen for
    the disconnect ourselves and always close the iterator (which cancels the generation).
    """

    media_type = "text/event-stream"

    def __init__(self, content: Any, headers: dict[str, str] | None = None) -> None:
        base = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(content, headers=base | (headers or {}))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def stream() -> None:
                    with suppress(OSError):  # the client went away between two writes
                        await self.stream_response(send)
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                with anyio.CancelScope(shield=True):
                    await close()
