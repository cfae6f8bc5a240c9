"""Every error a route raises, mapped once: Anthropic's envelope on /v1/messages*, OpenAI's
everywhere else. Framework errors (unknown path, wrong method) get the same treatment. A call the
proxy has taken on answers its own errors, in its dialect, and records them (proxy/proxy.py)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from cortex.core.errors import CortexError, InvalidRequest
from cortex.core.protocol.errors import (
    anthropic_error,
    anthropic_status,
    error_headers,
    openai_error,
)
from cortex.gateway.anthropic_models import wants_anthropic
from cortex.gateway.http.access import gateway_of
from cortex.gateway.metrics import NO_NEURON
from cortex.gateway.proxy.exchange import log_refusal
from cortex.gateway.proxy.proxy import unexpected

ANTHROPIC_PREFIX = "/v1/messages"
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


def is_anthropic(path: str) -> bool:
    return path == ANTHROPIC_PREFIX or path.startswith(ANTHROPIC_PREFIX + "/")


def _http_error(exc: HTTPException) -> CortexError:
    err = CortexError(str(exc.detail))
    err.status = exc.status_code
    err.code = _HTTP_CODES.get(exc.status_code, "http_error")
    err.kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return err


async def answer(request: Request, exc: Exception) -> JSONResponse:
    """The one handler: record the failure, then answer in the surface's envelope."""
    if isinstance(exc, HTTPException):
        err = _http_error(exc)
    elif isinstance(exc, RequestValidationError):
        err = InvalidRequest(str(exc.errors()[0].get("msg", "invalid request")))
    else:
        err = unexpected(exc, request.url.path)
    if request.url.path.startswith("/v1/"):
        # Refused before the proxy took the call: no model, no neuron. Still a request answered.
        gateway, surface = gateway_of(request), _surface(request)
        gateway.metrics.requests.labels(NO_NEURON, NO_NEURON, surface).inc()
        gateway.metrics.errors.labels(NO_NEURON, NO_NEURON, surface, err.code).inc()
        if gateway.config.gateway.usage_log:
            principal = getattr(request.state, "principal", None)
            log_refusal(principal.name if principal else "-", surface, err.code)
    if _anthropic_envelope(request):
        body, status = anthropic_error(err), anthropic_status(err)
    else:
        body, status = openai_error(err), err.status
    return JSONResponse(body, status_code=status, headers=error_headers(err))


def _anthropic_envelope(request: Request) -> bool:
    """Anthropic's paths, and the model list asked for in Anthropic's shape."""
    path = request.url.path
    listing = path == "/v1/models" or path.startswith("/v1/models/")
    return is_anthropic(path) or (listing and wants_anthropic(request.headers))


def _surface(request: Request) -> str:
    if is_anthropic(request.url.path):
        return "anthropic"
    return "responses" if request.url.path.startswith("/v1/responses") else "openai"


def install(app: FastAPI) -> None:
    for kind in (CortexError, HTTPException, RequestValidationError, Exception):
        app.add_exception_handler(kind, answer)
