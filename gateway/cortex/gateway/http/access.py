"""What every route starts with: the gateway's parts, the caller's principal, and, for an
inference route, the hand-over to the proxy."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import Response

from cortex.gateway.assembly import Gateway
from cortex.gateway.dialects.dialect import Dialect
from cortex.gateway.http.payload import read_json


def gateway_of(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


# The dependencies are `async def` though they never wait: FastAPI runs a plain `def` one on a
# worker thread, and that hand-off cost more than the whole check (docs/benchmarks.md, P1).
async def authenticate(request: Request) -> None:
    """Route dependency: the caller's principal, on request.state (401 when auth rejects it)."""
    request.state.principal = gateway_of(request).auth.authenticate(request.headers)


async def authenticate_admin(request: Request) -> None:
    """Route dependency of the admin surface (fleet view, docs): 401 or 403 unless an admin key."""
    request.state.principal = gateway_of(request).auth.authenticate_admin(request.headers)


async def proxied(request: Request, dialect: Dialect) -> Response:
    """An inference route's whole body: read, parse in the dialect, hand to the proxy."""
    gateway = gateway_of(request)
    data = await read_json(request, gateway.config.gateway.max_body_bytes)
    return gateway.proxy.serve(request, dialect, dialect.parse(data))
