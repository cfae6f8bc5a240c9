"""The fleet page's HTML, rendered here so the first paint needs no JavaScript: the neurons, every
catalogue model with its state (one vocabulary: core/fleet.py `shown_state`), its failure reason,
its live rates and its action buttons. The page's script (static/page.js) re-fetches the same
panel to stay live, and sends the actions to the admin API (docs/fleet-control.md)."""

from __future__ import annotations

from html import escape
from pathlib import Path

from cortex.core.admin import AdminModels
from cortex.core.fleet import (
    FleetActivity,
    FleetNeuron,
    FleetReplica,
    FleetView,
    ModelActivity,
    shown_state,
)
from cortex.gateway.catalogue import FleetModelCard

_STATIC = Path(__file__).parent / "static"
_CSS = (_STATIC / "page.css").read_text()
_SCRIPT = (_STATIC / "page.js").read_text()


def page(panel: str | None, *, signed_out: str | None = None) -> str:
    """The whole page: the panel when the caller may see it, else a note and the key form."""
    body = panel if panel is not None else f'<p class="notice">{escape(signed_out or "")}</p>'
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>cortex fleet</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{_CSS}</style></head><body>
<header><h1>cortex fleet</h1>
<form id="signin" method="post" action="/session"><label>admin key
<input id="admin-key" name="key" type="password" autocomplete="off"></label>
<button type="submit">use key</button></form></header>
<p id="notice" class="muted" role="status"></p>
<main id="panel">{body}</main>
<section id="playground" class="card"><h2>Playground</h2>
<form id="chat"><div class="row"><select id="chat-model" name="model"></select>
<input id="api-key" type="password" placeholder="API key (when auth is on)" autocomplete="off">
</div><textarea id="prompt" rows="3" placeholder="Say something to the model"></textarea>
<button type="submit" id="send">send</button></form>
<pre id="answer" aria-live="polite"></pre></section>
<p class="muted" id="updated"></p>
<script>{_SCRIPT}</script></body></html>
"""


def panel(fleet: FleetView, listing: AdminModels, activity: FleetActivity) -> str:
    """The live part: health, the neurons' cards, the models' table."""
    cordoned = {n.name for n in listing.neurons if n.cordoned}
    pinned = {m.id: m.pinned_on for m in listing.models}
    rates = {a.model: a for a in activity.models}
    progress = {r.id: r.progress for n in fleet.neurons for r in n.replicas if r.state == "loading"}
    cards = "".join(_neuron(n, n.name in cordoned) for n in fleet.neurons)
    targets = "".join(f'<option value="{_e(n.name)}">{_e(n.name)}</option>' for n in fleet.neurons)
    rows = "".join(
        _model(card, pinned.get(card.id, []), rates.get(card.id), progress.get(card.id, 0.0))
        for card in fleet.models
        if isinstance(card, FleetModelCard)
    )
    return f"""<h2>fleet <span id="health" class="status {_e(fleet.status)}">{_e(fleet.status)}</span></h2>
<div id="neurons" class="grid">{cards or '<p class="muted">no neurons</p>'}</div>
<h2>Models <label class="muted">on <select id="target"><option value="">any neuron</option>{targets}</select></label></h2>
<table id="models"><thead><tr><th>model</th><th>state</th><th>where</th><th>req/s</th>
<th>tok/s</th><th>TTFT</th><th>actions</th></tr></thead><tbody>{rows}</tbody></table>
<p class="muted">rates over the last {activity.window_seconds:.0f} s</p>"""


def _neuron(neuron: FleetNeuron, cordoned: bool) -> str:
    health = "ok" if neuron.healthy else "down"
    badge = ' <span class="status cordoned">cordoned</span>' if cordoned else ""
    action = "uncordon" if cordoned else "cordon"
    devices = "".join(
        f"""<div>{_e(d.id)} <span class="muted">{_e(d.name)} {_gib(d.memory_used)} /
{_gib(d.memory_total)}</span><div class="bar"><div style="width:{_share(d.memory_used, d.memory_total)}%">
</div></div></div>"""
        for d in neuron.devices
    )
    rows = "".join(_replica(r) for r in neuron.replicas)
    error = f'<div class="reason">{_e(neuron.error)}</div>' if neuron.error else ""
    return f"""<div class="card" data-neuron="{_e(neuron.name)}"><h2>{_e(neuron.name)}
<span class="status {health}">{health}</span>{badge}</h2>{error}{devices}
<table>{rows or '<tr><td class="muted">no models loaded</td></tr>'}</table>
<button type="button" data-action="{action}" data-neuron="{_e(neuron.name)}">{action}</button></div>"""


def _replica(replica: FleetReplica) -> str:
    state = shown_state(replica.state, replica.error)
    return f"""<tr data-replica="{_e(replica.id)}"><td>{_e(replica.id)}</td>
<td>{_state(state, replica.progress, replica.error)}</td><td>{_gib(replica.memory_bytes)}</td>
<td>{replica.in_flight} in flight</td></tr>"""


def _model(
    card: FleetModelCard, pinned_on: list[str], rate: ModelActivity | None, progress: float
) -> str:
    state = shown_state(card.state, card.last_error)
    where = ", ".join(card.locations) or "-"
    if pinned_on:
        where += f' <span class="muted">pinned on {_e(", ".join(pinned_on))}</span>'
    aliases = f'<div class="muted">{_e(", ".join(card.aliases))}</div>' if card.aliases else ""
    ttft = f"{rate.ttft_seconds * 1000:.0f} ms" if rate and rate.ttft_seconds is not None else "-"
    buttons = " ".join(
        f'<button type="button" data-action="{a}" data-model="{_e(card.id)}">{a}</button>'
        for a in _actions(state, pinned=bool(pinned_on))
    )
    return f"""<tr data-model="{_e(card.id)}" data-kind="{_e(card.kind)}" data-state="{state}"
data-locations="{_e(",".join(card.locations))}"><td>{_e(card.id)}
<span class="muted">{_e(card.kind)}</span>{aliases}</td>
<td class="state">{_state(state, progress, card.last_error)}</td><td>{where}</td>
<td>{rate.requests_per_second if rate else 0:.2f}</td><td>{rate.tokens_per_second if rate else 0:.1f}</td>
<td>{ttft}</td><td class="actions">{buttons}</td></tr>"""


def _actions(state: str, *, pinned: bool) -> list[str]:
    """The buttons that make sense now: load what is not loaded, unload what is, pin either way."""
    actions = {"ready": ["load", "unload"], "loading": [], "unloading": []}.get(state, ["load"])
    return [*actions, "unpin" if pinned else "pin"]


def _state(state: str, progress: float, reason: str | None) -> str:
    percent = f" {progress:.0%}" if state == "loading" and progress else ""
    cause = f'<div class="reason">{_e(reason)}</div>' if state == "failed" and reason else ""
    css = state.replace(" ", "-")
    return f'<span class="status {css}">{_e(state)}{percent}</span>{cause}'


def _e(text: object) -> str:
    return escape(str(text), quote=True)


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB"


def _share(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}" if whole else "0"
