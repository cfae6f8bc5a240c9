"""Gateway health: ok when every neuron is healthy, impaired when some are (or the fleet's
picture is stale), degraded when none is or no model is known. /livez says the process serves;
/readyz that it can take requests, as its fleet source says (a static fleet: not degraded;
Kubernetes: both CRDs listed once), and is not shutting down. Every 503 here carries Retry-After."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from cortex.core.shutdown import SHUTDOWN_RETRY_AFTER
from cortex.gateway.assembly import Gateway
from cortex.gateway.http.access import gateway_of

Health = Literal["ok", "impaired", "degraded"]

router = APIRouter()
_RETRY = {"Retry-After": str(round(SHUTDOWN_RETRY_AFTER))}


def classify(neurons: int, healthy: int, models: int) -> Health:
    if healthy == 0 or models == 0:
        return "degraded"
    return "ok" if healthy == neurons else "impaired"


def health_of(gateway: Gateway) -> Health:
    fleet = gateway.fleet
    healthy = sum(1 for name in fleet.neurons if fleet.healthy(name))
    health = classify(len(fleet.neurons), healthy, len(gateway.catalogue.specs()))
    # Routing on a stale picture (the API server is away) works, but is not all well.
    return "impaired" if health == "ok" and not gateway.source.current() else health


def _report(gateway: Gateway) -> dict[str, Any]:
    fleet = gateway.fleet
    return {
        "status": health_of(gateway),
        "fleet_view": "current" if gateway.source.current() else "stale",
        "neurons": {
            name: {
                "healthy": fleet.healthy(name),
                "consecutive_failures": handle.failures,
                "error": handle.last_error,
            }
            for name, handle in fleet.neurons.items()
        },
    }


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """ok | impaired | degraded for anyone; per-neuron details only for an admin key (or no auth)."""
    gateway = gateway_of(request)
    report = _report(gateway)
    if not gateway.auth.is_admin(request.headers):
        report = {"status": report["status"]}
    if report["status"] != "degraded":
        return JSONResponse(report)
    return JSONResponse(report, status_code=503, headers=_RETRY)


@router.get("/livez")
async def livez() -> dict[str, str]:
    return {"status": "alive"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    gateway = gateway_of(request)
    if gateway.drain.draining:
        ready, status = False, "shutting_down"
    else:
        ready, status = gateway.source.routable(), health_of(gateway)
    headers = {} if ready else _RETRY
    body = {"ready": ready, "status": status}
    return JSONResponse(body, status_code=200 if ready else 503, headers=headers)
