"""The neuron daemon's HTTP app: lifecycle and OpenAI routes over a NeuronRuntime, errors mapped once."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cortex.core.body_limit import BodyLimit
from cortex.core.errors import CortexError, InvalidRequest, PayloadTooLarge
from cortex.core.protocol.errors import error_headers, invalid_request, openai_error
from cortex.core.shutdown import Drain, DrainGate
from cortex.neuron import api_lifecycle, api_openai
from cortex.neuron.metrics import NeuronMetrics
from cortex.neuron.prompts import PromptPool

if TYPE_CHECKING:
    from cortex.neuron.runtime import NeuronRuntime

# Routes counted in cortex_neuron_requests_total; anything else would only add label cardinality.
INFERENCE_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")


def error_response(err: CortexError) -> JSONResponse:
    return JSONResponse(openai_error(err), status_code=err.status, headers=error_headers(err))


def _validation_error(exc: RequestValidationError) -> CortexError:
    """FastAPI's validation report as one 400 naming the first bad field."""
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return InvalidRequest(f"request body is not valid JSON: {detail}".rstrip(": "))
    # Locations start with "body": what follows is a path into the body.
    in_body = [{**error, "loc": tuple(error.get("loc", ()))[1:]} for error in errors]
    return invalid_request(in_body, exc.body)


def _http_error(exc: StarletteHTTPException) -> CortexError:
    err = CortexError(str(exc.detail))
    err.status = exc.status_code
    err.code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    err.kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return err


def _install_error_handlers(app: FastAPI) -> None:
    async def on_cortex(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, CortexError)
        return error_response(exc)

    async def on_validation(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return error_response(_validation_error(exc))

    async def on_http(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        return error_response(_http_error(exc))

    async def on_unexpected(_: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises after this answer is sent, so the server logs the traceback.
        return error_response(CortexError(f"internal error: {type(exc).__name__}: {exc}"))

    app.add_exception_handler(CortexError, on_cortex)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_unexpected)


async def _refuse_body(_: Scope, err: PayloadTooLarge) -> JSONResponse:
    return error_response(err)


class RequestCounter:
    """cortex_neuron_requests_total and request duration, by model, route and status."""

    def __init__(self, app: ASGIApp, metrics: NeuronMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path not in INFERENCE_ROUTES:
            await self.app(scope, receive, send)
            return
        status = 500
        started = time.perf_counter()

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            model = scope.get("state", {}).get("model", "")
            self.metrics.requests.labels(model, path, str(status)).inc()
            self.metrics.duration.labels(model, path).observe(time.perf_counter() - started)


def create_app(runtime: NeuronRuntime, *, manage_runtime: bool = True) -> FastAPI:
    """The neuron app; with manage_runtime it starts and stops the runtime with the app's lifespan."""

    prompts = PromptPool(runtime.config.neuron.prompt_timeout)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if manage_runtime:
            await runtime.start()
        try:
            yield
        finally:
            prompts.close()
            if manage_runtime:
                await runtime.stop()

    app = FastAPI(title="cortex neuron", lifespan=lifespan)
    metrics = NeuronMetrics(runtime.status)
    app.state.runtime = runtime
    app.state.metrics = metrics
    app.state.prompts = prompts
    # SIGTERM (served by a GracefulServer): refuse new work, finish what runs, then exit.
    drain = Drain(runtime.config.neuron.shutdown_grace, on_begin=runtime.begin_shutdown)
    app.state.drain = drain
    _install_error_handlers(app)
    app.include_router(api_lifecycle.router)
    app.include_router(api_openai.router)
    limit = runtime.config.neuron.max_body_bytes
    app.add_middleware(BodyLimit, limit=limit, refuse=_refuse_body)
    app.add_middleware(RequestCounter, metrics=metrics)
    app.add_middleware(DrainGate, drain=drain)
    return app
