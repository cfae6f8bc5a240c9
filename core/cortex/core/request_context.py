"""Who a request is, for logs: its `x-request-id` (taken from the caller, else made here, and
echoed in the response) and whether it is cortex's own internal poll. The gateway's NeuronClient
sends the id on to the neuron, so one id follows a request through both logs."""

from __future__ import annotations

import contextvars
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

# The ASGI shapes, spelled here so core needs no server library (docs/architecture.md, layers).
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

REQUEST_ID_HEADER = "x-request-id"
# What the Anthropic SDK reads as a response's id (`message._request_id`, an error's request_id).
ANTHROPIC_ID_HEADER = b"request-id"
ANTHROPIC_PATHS = "/v1/messages"
# NeuronClient's user agent: a GET with it of a neuron's state is the gateway's (or the
# operator's) own polling.
INTERNAL_AGENT = "cortex-gateway/"
# What they poll on each neuron. Anyone can send the agent, so only these GETs are taken for polls.
NEURON_POLLS = frozenset({"/status", "/models", "/health"})

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
internal_poll: contextvars.ContextVar[bool] = contextvars.ContextVar("internal_poll", default=False)


class RequestContext:
    """ASGI middleware (outermost): sets the context variables for the request's whole task,
    where uvicorn also writes its access line, and adds `x-request-id` to the response (and
    `request-id` on Anthropic's routes). `polls`: the paths whose GETs with cortex's own agent
    are internal polls (a neuron's; none on the gateway, whose clients could claim the agent)."""

    def __init__(self, app: ASGIApp, polls: frozenset[str] = NEURON_POLLS) -> None:
        self.app = app
        self.polls = polls

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        given = headers.get(REQUEST_ID_HEADER.encode(), b"").decode("latin-1")[:128]
        # 32 random hex digits, as a uuid4's hex, at a sixth of its cost (every request pays it).
        rid = given if given.isprintable() and given else os.urandom(16).hex()
        agent = headers.get(b"user-agent", b"").decode("latin-1")
        request_id.set(rid)
        polled = scope.get("method") == "GET" and scope.get("path") in self.polls
        internal_poll.set(polled and agent.startswith(INTERNAL_AGENT))

        said = [(REQUEST_ID_HEADER.encode(), rid.encode("latin-1"))]
        if scope.get("path", "").startswith(ANTHROPIC_PATHS):
            said.append((ANTHROPIC_ID_HEADER, said[0][1]))

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = [*message.get("headers", []), *said]
            await send(message)

        await self.app(scope, receive, send_with_id)
