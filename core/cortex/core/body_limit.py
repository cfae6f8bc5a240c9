"""A request body cap in front of an app, for the routes that read their whole body before they
judge the caller (FastAPI parses a body before it runs a route's dependencies, the key check
included): docs/security.md, "Request sizes". The neuron's routes and the gateway's control
routes (/admin/*, /session) are served behind one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from cortex.core.errors import PayloadTooLarge
from cortex.core.request_context import ASGIApp, Message, Receive, Scope, Send

# The component's answer to a refused body, in its API's error shape.
Refusal = Callable[[Scope, PayloadTooLarge], Awaitable[ASGIApp]]


class BodyLimit:
    """413 for bodies over `limit`, judged by Content-Length and again while reading.

    The body is read here (it is at most `limit` bytes) and replayed to the app chunk by chunk;
    later receive() calls go to the server, so disconnects still reach the streaming responses.
    """

    def __init__(self, app: ASGIApp, limit: int, refuse: Refusal) -> None:
        self.app = app
        self.limit = limit
        self.refuse = refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = PayloadTooLarge(f"request body larger than {self.limit} bytes")
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            await (await self.refuse(scope, too_large))(scope, receive, send)
            return
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await (await self.refuse(scope, too_large))(scope, receive, send)
                return
            more = message.get("more_body", False)
        chunks.reverse()

        async def replay() -> Message:
            if not chunks:
                return await receive()
            return {"type": "http.request", "body": chunks.pop(), "more_body": bool(chunks)}

        await self.app(scope, replay, send)
