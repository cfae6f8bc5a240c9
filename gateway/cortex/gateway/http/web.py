"""The admin surface: the fleet page (GET /, rendered here, kept live by its script), its JSON
(GET /fleet, GET /activity) and the API docs. With [auth] on, every route here needs an admin key
(docs/security.md); the page's own GETs also take it from the cookie its key form sets, so a
browser can show the page without JavaScript."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs

from fastapi import APIRouter, Depends, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from cortex.core.errors import Forbidden, Unauthorized
from cortex.core.fleet import FleetActivity, FleetNeuron, FleetReplica, FleetView
from cortex.gateway.assembly import Gateway
from cortex.gateway.http import fleet_page
from cortex.gateway.http.access import authenticate_admin, gateway_of
from cortex.gateway.http.admin import listing
from cortex.gateway.http.health import health_of
from cortex.gateway.registry import NeuronHandle

router = APIRouter(include_in_schema=False)
ADMIN = [Depends(authenticate_admin)]
COOKIE = (
    "cortex_admin"  # the page's key, from its form: HttpOnly, SameSite=Strict, this tab's session
)


def fleet_view(gateway: Gateway) -> FleetView:
    """What the page and `cortex status` show: health, each neuron's devices and replicas, the
    merged catalogue."""
    fleet = gateway.fleet
    return FleetView(
        status=health_of(gateway),
        neurons=[_neuron(handle, fleet.healthy(name)) for name, handle in fleet.neurons.items()],
        models=list(gateway.model_cards()),
    )


def _neuron(handle: NeuronHandle, healthy: bool) -> FleetNeuron:
    status = handle.status
    return FleetNeuron(
        name=handle.name,
        endpoint=handle.entry.endpoint,
        healthy=healthy,
        error=handle.last_error,
        last_seen=handle.last_seen,
        devices=status.devices if status else [],
        replicas=[
            FleetReplica(
                id=m.id,
                state=m.state,
                devices=m.devices,
                memory_bytes=m.memory_bytes,
                queued=m.queued,
                progress=m.progress,
                in_flight=max(m.in_flight, handle.in_flight[m.id]),
                last_used=m.last_used,
                error=m.error,
            )
            for m in (status.models if status else [])
        ],
    )


@router.get("/fleet", dependencies=ADMIN)
async def fleet(request: Request) -> FleetView:
    return fleet_view(gateway_of(request))


@router.get("/activity", dependencies=ADMIN)
async def activity(request: Request) -> FleetActivity:
    """Requests/s, tokens/s and time to first token per model over the last seconds."""
    return gateway_of(request).activity.view()


def authenticate_page(request: Request) -> None:
    """An admin key from the header, else from the page's cookie (401 or 403 as the API's)."""
    headers = dict(request.headers)
    key = request.cookies.get(COOKIE)
    if key and "authorization" not in headers and "x-api-key" not in headers:
        headers["authorization"] = f"Bearer {key}"
    request.state.principal = gateway_of(request).auth.authenticate_admin(headers)


def panel_of(gateway: Gateway) -> str:
    return fleet_page.panel(fleet_view(gateway), listing(gateway), gateway.activity.view())


@router.get("/", response_class=HTMLResponse)
async def page(request: Request) -> HTMLResponse:
    """The page, its panel filled; without an admin key (auth on) a 401 page asking for one."""
    try:
        authenticate_page(request)
    except Unauthorized as err:
        note = f"{err.message}: enter an admin key above"
        return HTMLResponse(fleet_page.page(None, signed_out=note), status_code=401)
    return HTMLResponse(fleet_page.page(panel_of(gateway_of(request))))


@router.get("/fleet/panel", response_class=HTMLResponse)
async def panel(request: Request) -> HTMLResponse:
    """The page's live part alone: its script swaps it in every few seconds."""
    authenticate_page(request)
    return HTMLResponse(panel_of(gateway_of(request)))


@router.post("/session")
async def session(request: Request) -> Response:
    """The key form without JavaScript: an admin key becomes the page's cookie, then back to /."""
    key = parse_qs((await request.body()).decode(errors="replace")).get("key", [""])[0].strip()
    try:
        gateway_of(request).auth.authenticate_admin({"authorization": f"Bearer {key}"})
    except (Unauthorized, Forbidden) as err:
        note = f"{err.message}: enter an admin key above"
        return HTMLResponse(fleet_page.page(None, signed_out=note), status_code=err.status)
    back = RedirectResponse("/", status_code=303)
    back.set_cookie(COOKIE, key, httponly=True, samesite="strict")
    return back


@router.get("/openapi.json", dependencies=ADMIN)
async def openapi(request: Request) -> dict[str, Any]:
    schema: dict[str, Any] = request.app.openapi()
    return schema


@router.get("/docs", dependencies=ADMIN)
async def docs() -> HTMLResponse:
    return get_swagger_ui_html(openapi_url="/openapi.json", title="cortex gateway")
