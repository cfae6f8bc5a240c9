"""The inference routes' short road: a POST to one of them goes from the server straight to the
proxy, without FastAPI's routing, dependency solving and middleware layers, which cost more per
request than the proxy's own code (docs/benchmarks.md, P1). The same steps as the FastAPI routes
(which stay, for the other methods' 405 and the API schema): authenticate, read, parse, proxy;
a refusal in the surface's envelope (error_handler.answer), recorded in the metrics."""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from cortex.core.errors import CortexError
from cortex.gateway.dialects.anthropic import COUNT_TOKENS, MESSAGES
from cortex.gateway.dialects.dialect import Dialect
from cortex.gateway.dialects.openai import CHAT, COMPLETIONS, EMBEDDINGS
from cortex.gateway.dialects.responses import RESPONSES
from cortex.gateway.http.access import authenticate, proxied
from cortex.gateway.http.error_handler import answer

# Path -> the dialect of its POST: the routes of http/openai.py, anthropic.py and responses.py.
INFERENCE: dict[str, Dialect] = {
    "/v1/chat/completions": CHAT,
    "/v1/completions": COMPLETIONS,
    "/v1/embeddings": EMBEDDINGS,
    "/v1/messages": MESSAGES,
    "/v1/messages/count_tokens": COUNT_TOKENS,
    "/v1/responses": RESPONSES,
}


class InferenceRoutes:
    """ASGI: serves the inference POSTs itself and hands every other request to `app`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            dialect = INFERENCE.get(scope["path"])
            if dialect is not None:
                await serve(dialect, scope, receive, send)
                return
        await self.app(scope, receive, send)


async def serve(dialect: Dialect, scope: Scope, receive: Receive, send: Send) -> None:
    """One inference call. Failures are handled as FastAPI's stack would: domain and HTTP errors
    answered; anything else answered (logged as a bug) and raised on to the server."""
    request = Request(scope, receive)
    try:
        await authenticate(request)
        response = await proxied(request, dialect)
    except Exception as exc:
        refusal = await answer(request, exc)
        await refusal(scope, receive, send)
        if isinstance(exc, CortexError | HTTPException):
            return
        raise
    try:
        await response(scope, receive, send)
    except Exception as exc:
        # The proxy answers its own failures; one escaping it came after its response began:
        # logged and counted, then the server closes the connection.
        await answer(request, exc)
        raise
