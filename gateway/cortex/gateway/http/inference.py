"""The inference routes' short road: a POST to one of them goes from the server straight to the
proxy, without FastAPI's routing, dependency solving and middleware layers, which cost more per
request than the proxy's own code (docs/benchmarks.md, P1). The same steps as the FastAPI routes
(which stay, for the other methods' 405 and the API schema): authenticate, read, parse, proxy;
a refusal in the surface's envelope (error_handler.answer), recorded in the metrics."""

from __future__ import annotations

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

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
    """One inference call. A failure before the proxy takes the call is answered (a bug logged
    once, with its traceback, by the handler; not raised on for the server to log again); the
    proxy answers, logs and records its own."""
    request = Request(scope, receive)
    try:
        await authenticate(request)
        response = await proxied(request, dialect)
    except Exception as exc:
        refusal = await answer(request, exc)
        await refusal(scope, receive, send)
        return
    await response(scope, receive, send)
