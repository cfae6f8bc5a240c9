"""Lifecycle routes of a neuron: health, status, models, load, unload, metrics."""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, Header, Request, Response
from fastapi.responses import JSONResponse

from cortex.core.errors import Unauthorized
from cortex.core.fleet import LoadedModel, LoadRequest, ModelListing, ModelState, NeuronStatus
from cortex.core.fleet import UnloadRequest as UnloadBody
from cortex.neuron.metrics import CONTENT_TYPE, NeuronMetrics

if TYPE_CHECKING:
    from cortex.neuron.runtime import NeuronRuntime

router = APIRouter()


def runtime_of(request: Request) -> NeuronRuntime:
    runtime: NeuronRuntime = request.app.state.runtime
    return runtime


def require_admin(request: Request, authorization: Annotated[str | None, Header()] = None) -> None:
    """Lifecycle changes need `Authorization: Bearer <admin_token>` when a token is configured."""
    token = runtime_of(request).config.neuron.admin_secret()
    if not token:
        return
    if not bears(authorization, token):
        raise Unauthorized("this neuron's lifecycle endpoints need its admin token")


def bears(authorization: str | None, token: str) -> bool:
    """Whether an `Authorization` header is `Bearer <token>`, compared in constant time as bytes:
    compare_digest refuses text that is not ASCII, and a header's text is its bytes as latin-1."""
    scheme, _, given = (authorization or "").partition(" ")
    presented = given.strip().encode("latin-1", errors="replace")
    return scheme.lower() == "bearer" and hmac.compare_digest(presented, token.encode())


Admin = Depends(require_admin)


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """200 while at least one device worker accepts work and the neuron is not shutting down;
    503 (with Retry-After) otherwise. /livez is the probe that the process still serves."""
    if runtime_of(request).status().healthy:
        return JSONResponse({"status": "ok"})
    return JSONResponse({"status": "unhealthy"}, 503, headers={"Retry-After": "2"})


@router.get("/livez")
async def livez() -> dict[str, str]:
    """The process serves (a liveness probe): 200 even while draining, when /health is 503."""
    return {"status": "alive"}


@router.get("/status")
async def status(request: Request) -> NeuronStatus:
    return runtime_of(request).status()


@router.get("/models")
async def models(request: Request) -> ModelListing:
    return runtime_of(request).listing()


@router.post("/models/load", dependencies=[Admin], response_model=LoadedModel)
async def load(body: LoadRequest, request: Request) -> Any:
    """200 with the ready model; 202 while still loading when the caller asked not to wait."""
    runtime_of(request).check_open()
    loaded = await runtime_of(request).load(body)
    code = 202 if loaded.state is ModelState.LOADING else 200
    return JSONResponse(loaded.model_dump(mode="json"), status_code=code)


@router.post("/models/unload", dependencies=[Admin])
async def unload(body: UnloadBody, request: Request) -> dict[str, str]:
    await runtime_of(request).unload(body.model, force=body.force)
    return {"model": body.model, "status": "unloaded"}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    registry: NeuronMetrics = request.app.state.metrics
    return Response(registry.exposition(), media_type=CONTENT_TYPE)
