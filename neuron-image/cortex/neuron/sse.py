"""Server-sent events: the framing OpenAI clients read, and a response that stops when they leave."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import suppress
from typing import Any

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from cortex.core.errors import CortexError
from cortex.core.protocol import openai
from cortex.core.protocol.errors import openai_error
from cortex.core.protocol.openai import sse_data

DONE = f"data: {openai.DONE}\n\n".encode()
# Sent after this long without an event: a tool call is held back until it is whole, so a long
# one is minutes of silence that read timeouts (the gateway's, a proxy's) would take for a hang.
KEEPALIVE = b": keep-alive\n\n"
KEEPALIVE_AFTER_S = 5.0


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

    def __init__(
        self,
        content: Any,
        headers: dict[str, str] | None = None,
        keepalive_after: float = KEEPALIVE_AFTER_S,
        on_close: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        base = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(content, headers=base | (headers or {}))
        self.keepalive_after = keepalive_after
        # Run at the end whatever happened: closing a body iterator that never started runs none
        # of its own cleanup (a client gone before the first chunk would leave it generating).
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:
                sender = _KeptAlive(send)

                async def stream() -> None:
                    with suppress(OSError):  # the client went away between two writes
                        await self.stream_response(sender.send)
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                group.start_soon(sender.keep_alive, self.keepalive_after)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            close = getattr(self.body_iterator, "aclose", None)
            with anyio.CancelScope(shield=True):
                if close is not None:
                    await close()
                if self.on_close is not None:
                    await self.on_close()


class _KeptAlive:
    """The response's `send`, and a keep-alive comment whenever the body has said nothing for a
    while. One send at a time: a comment never lands inside another message."""

    def __init__(self, send: Send) -> None:
        self._send, self._lock = send, anyio.Lock()
        self._last = anyio.current_time()
        self._begun = self._ended = False

    async def send(self, message: Message) -> None:
        async with self._lock:
            if message["type"] == "http.response.start":
                self._begun = True
            elif not message.get("more_body", False):
                self._ended = True
            self._last = anyio.current_time()
            await self._send(message)

    async def keep_alive(self, after: float) -> None:
        while True:
            await anyio.sleep(max(0.0, self._last + after - anyio.current_time()))
            async with self._lock:
                if self._ended:
                    return
                if anyio.current_time() - self._last < after:
                    continue  # something was sent meanwhile
                if self._begun:
                    with suppress(OSError):
                        await self._send(
                            {"type": "http.response.body", "body": KEEPALIVE, "more_body": True}
                        )
                self._last = anyio.current_time()
