"""The admin surface: the fleet page (GET /, one self-contained HTML page polling GET /fleet) and
the API docs. With [auth] on, every route here needs an admin key (docs/security.md)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse

from cortex.core.fleet import FleetNeuron, FleetReplica, FleetView
from cortex.gateway.fleet import NeuronHandle
from cortex.gateway.health import health_of
from cortex.gateway.wiring import Gateway, authenticate_admin, gateway_of

router = APIRouter(dependencies=[Depends(authenticate_admin)], include_in_schema=False)


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
            )
            for m in (status.models if status else [])
        ],
    )


@router.get("/fleet")
async def fleet(request: Request) -> FleetView:
    return fleet_view(gateway_of(request))


@router.get("/", response_class=HTMLResponse)
async def page() -> str:
    return PAGE


@router.get("/openapi.json")
async def openapi(request: Request) -> dict[str, Any]:
    schema: dict[str, Any] = request.app.openapi()
    return schema


@router.get("/docs")
async def docs() -> HTMLResponse:
    return get_swagger_ui_html(openapi_url="/openapi.json", title="cortex gateway")


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>cortex fleet</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{font:14px/1.4 system-ui,sans-serif;margin:2rem;background:#0f1115;color:#e6e6e6}
 h1{font-size:1.3rem;margin:0 0 1rem} h2{font-size:1rem;margin:0 0 .5rem}
 .status{padding:.1rem .5rem;border-radius:.3rem;font-weight:600}
 .ok,.ready,.loaded{background:#1f6f3f} .impaired,.loading,.unloading{background:#8a6d1a}
 .degraded,.failed,.down{background:#8a2323} .available{background:#333}
 .grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(22rem,1fr));gap:1rem}
 .card{background:#181b22;border:1px solid #2a2f3a;border-radius:.5rem;padding:1rem}
 .bar{height:.6rem;background:#2a2f3a;border-radius:.3rem;overflow:hidden;margin:.2rem 0 .6rem}
 .bar>div{height:100%;background:#4c8bf5}
 table{border-collapse:collapse;width:100%} td,th{text-align:left;padding:.2rem .4rem}
 th{color:#9aa3b2;font-weight:500} .muted{color:#9aa3b2}
</style></head><body>
<h1>cortex fleet <span id="status" class="status">…</span></h1>
<div id="neurons" class="grid"></div>
<h2 style="margin-top:1.5rem">Models</h2>
<table><thead><tr><th>model</th><th>state</th><th>where</th><th>aliases</th><th>context</th>
</tr></thead><tbody id="models"></tbody></table>
<p class="muted" id="updated"></p>
<script>
const esc = s => String(s ?? "").replace(/[&<>"]/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;",
  '"':"&quot;"}[c]));
const gib = b => (b / 2 ** 30).toFixed(2) + " GiB";
function neuron(n) {
  const devices = n.devices.map(d => {
    const used = d.memory_total ? 100 * (d.memory_total - d.memory_free) / d.memory_total : 0;
    return `<div>${esc(d.id)} <span class="muted">${esc(d.name)}</span>
      <span class="muted">${gib(d.memory_total - d.memory_free)} / ${gib(d.memory_total)}</span>
      <div class="bar"><div style="width:${used.toFixed(1)}%"></div></div></div>`;
  }).join("");
  const rows = n.replicas.map(r => `<tr><td>${esc(r.id)}</td>
    <td><span class="status ${esc(r.state)}">${esc(r.state)}${r.state === "loading"
      ? " " + Math.round(100 * r.progress) + "%" : ""}</span></td>
    <td>${gib(r.memory_bytes)}</td><td>${r.in_flight} in flight</td></tr>`).join("");
  const health = n.healthy ? "ok" : "down";
  return `<div class="card"><h2>${esc(n.name)} <span class="status ${health}">${health}</span></h2>
    ${n.error ? `<div class="muted">${esc(n.error)}</div>` : ""}${devices}
    <table>${rows || '<tr><td class="muted">no models loaded</td></tr>'}</table></div>`;
}
async function refresh() {
  try {
    const fleet = await (await fetch("/fleet")).json();
    const status = document.getElementById("status");
    status.textContent = fleet.status; status.className = "status " + fleet.status;
    document.getElementById("neurons").innerHTML = fleet.neurons.map(neuron).join("");
    document.getElementById("models").innerHTML = fleet.models.map(m => `<tr>
      <td>${esc(m.id)}</td><td><span class="status ${esc(m.state)}">${esc(m.state)}</span></td>
      <td>${esc(m.locations.join(", "))}</td><td class="muted">${esc(m.aliases.join(", "))}</td>
      <td>${esc(m.context_length)}</td></tr>`).join("");
    document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (e) {
    document.getElementById("updated").textContent = "gateway unreachable: " + e;
  }
}
refresh(); setInterval(refresh, 2000);
</script></body></html>
"""
