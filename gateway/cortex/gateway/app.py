"""The gateway's ASGI apps and the function that serves them (`cortex gateway`, `cortex up`)."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import Depends, FastAPI, Request, Response
from starlette.types import Receive, Scope, Send

from cortex.core.access_log import redact_access_log
from cortex.core.body_limit import BodyLimit
from cortex.core.catalogue import ModelSpec
from cortex.core.config import GatewayConfig, NeuronEntry
from cortex.core.errors import PayloadTooLarge
from cortex.core.kube_api import KubeLogin
from cortex.core.reload import hangup_handler
from cortex.core.request_context import RequestContext
from cortex.core.shutdown import Drain, DrainGate, GracefulServer
from cortex.gateway.assembly import Gateway, Tuning
from cortex.gateway.corked import CorkedHttpToolsProtocol
from cortex.gateway.http import anthropic, error_handler, health, openai, responses, web
from cortex.gateway.http.access import authenticate_admin, gateway_of
from cortex.gateway.http.admin import router as fleet_control
from cortex.gateway.http.inference import InferenceRoutes
from cortex.gateway.metrics import CONTENT_TYPE

log = logging.getLogger(__name__)


def create_app(
    config: GatewayConfig,
    catalogue: Sequence[ModelSpec],
    *,
    extra_neurons: Iterable[NeuronEntry] = (),
    tuning: Tuning | None = None,
    kubernetes: KubeLogin | None = None,
) -> FastAPI:
    """The gateway API. Its lifespan takes the fleet's first picture before serving (a poll, or
    the CRDs' first lists with `kubernetes`), then keeps it current."""
    gateway = Gateway(
        config, catalogue, extra_neurons=extra_neurons, tuning=tuning, kubernetes=kubernetes
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.aclose()

    # /docs and /openapi.json are served by `web`, behind the admin key when auth is on.
    app = GatewayAPI(
        gateway.drain,
        title="cortex gateway",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.gateway = gateway
    error_handler.install(app)
    for module in (openai, anthropic, responses, health, web):
        app.include_router(module.router)
    app.include_router(fleet_control)  # /admin/*, behind the admin key (docs/fleet-control.md)
    # On the API port the metrics are part of the admin surface; `metrics_listen` serves them open.
    admin = [Depends(authenticate_admin)]
    app.add_api_route(
        "/metrics", metrics, methods=["GET"], include_in_schema=False, dependencies=admin
    )
    return app


# What a request that is not an inference call may send: /admin/* and /session take a few hundred
# bytes. The inference calls cap theirs at `max_body_bytes`, read after the key is checked.
CONTROL_BODY_BYTES = 64 * 1024


class GatewayAPI(FastAPI):
    """FastAPI behind four plain ASGI layers: the drain's count of requests in flight, the request
    id (outermost but for the drain: the id covers the whole call, and its logs), the inference
    routes' short road to the proxy (http/inference.py), and a body cap for every other request
    (FastAPI reads a body before it checks the key: docs/security.md); the rest is FastAPI's."""

    def __init__(self, drain: Drain, **settings: Any) -> None:
        super().__init__(**settings)
        control = BodyLimit(super().__call__, limit=CONTROL_BODY_BYTES, refuse=_refuse_body)
        # Any client of the API port can send cortex's agent: none is taken for an internal poll.
        front = RequestContext(InferenceRoutes(control), polls=frozenset())
        self._front = DrainGate(front, drain=drain)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["app"] = self  # what Request.app reads, on the short road as in FastAPI's stack
        await self._front(scope, receive, send)


async def _refuse_body(scope: Scope, err: PayloadTooLarge) -> Response:
    return await error_handler.answer(Request(scope), err)


async def metrics(request: Request) -> Response:
    return Response(gateway_of(request).metrics.exposition(), media_type=CONTENT_TYPE)


def create_metrics_app(app: FastAPI) -> FastAPI:
    """The Prometheus endpoint (`metrics_listen`), over the same registry as `app`."""
    metrics_app = FastAPI(title="cortex gateway metrics", docs_url=None, redoc_url=None)
    metrics_app.state.gateway = app.state.gateway
    metrics_app.add_api_route("/metrics", metrics, methods=["GET"])
    return metrics_app


def _split(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


async def serve(
    config: GatewayConfig,
    catalogue: Sequence[ModelSpec],
    *,
    extra_neurons: Iterable[NeuronEntry] = (),
    kubernetes: KubeLogin | None = None,
    reread: Callable[[], GatewayConfig] | None = None,
    reload_first: Callable[[GatewayConfig], Awaitable[list[str]]] | None = None,
) -> None:
    """Serve the API on `gateway.listen` and metrics on `gateway.metrics_listen` until stopped;
    the first SIGTERM drains the streams in flight before both stop (cortex.core.shutdown).
    SIGHUP applies what `reread` reads (the config file again) to the running gateway, after
    `reload_first` has applied it to what serves beside the gateway (`cortex up`'s neuron)."""
    app = create_app(config, catalogue, extra_neurons=extra_neurons, kubernetes=kubernetes)
    drain = app.state.gateway.drain
    host, port = _split(config.gateway.listen)
    api = uvicorn.Config(app, host=host, port=port, lifespan="on", http=CorkedHttpToolsProtocol)
    servers = [GracefulServer(api, drain)]
    if config.gateway.metrics_listen:
        host, port = _split(config.gateway.metrics_listen)
        metrics_app = create_metrics_app(app)
        metrics_config = uvicorn.Config(metrics_app, host=host, port=port, lifespan="off")
        servers.append(GracefulServer(metrics_config, drain))
    redact_access_log()  # after the uvicorn.Configs above, which set uvicorn's loggers up
    tasks = [asyncio.create_task(server.serve()) for server in servers]
    loop = asyncio.get_running_loop()
    if reread is not None:
        gateway: Gateway = app.state.gateway

        async def apply(config: GatewayConfig) -> list[str]:
            first = await reload_first(config) if reload_first is not None else []
            return first + await gateway.reload(config)

        loop.add_signal_handler(signal.SIGHUP, hangup_handler(reread, apply))
    try:
        # One server stopping (a signal, a bind failure) stops the other.
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if reread is not None:
            loop.remove_signal_handler(signal.SIGHUP)
        for server in servers:
            server.should_exit = True
        results = await asyncio.gather(*tasks, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
