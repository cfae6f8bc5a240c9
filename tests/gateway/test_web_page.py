"""The fleet page (docs/fleet-control.md): rendered by the server so its first paint needs no
script, one state vocabulary in the card and the table, the failure reason beside a failed model,
the admin key from a header or the page's own form, and live rates from the gateway's counters.
The browser half is tests/gateway/test_web_browser.py."""

from __future__ import annotations

import asyncio
import re
import time

import httpx
from fakes.neuron import FakeNeuron, GiB
from gateway_cluster import chat_body, cluster, spec

from cortex.core.fleet import shown_state
from cortex.gateway.activity import Totals, rates

OOM = "needs 9000 MiB; cpu-0 has 800 MiB free"
CATALOGUE = [spec("chat-a"), spec("chat-b"), spec("broken")]
ADMIN = "sk-root-admin"
AUTH = {
    "enabled": True,
    "keys": [{"name": "root", "key": ADMIN, "admin": True}, {"name": "u", "key": "sk-user"}],
}


def neuron() -> FakeNeuron:
    n1 = FakeNeuron("n1", loaded={"chat-a": GiB}, available={"chat-b": GiB, "broken": GiB})
    n1.faults.load_error = OOM
    return n1


async def until_failure_shows(http: httpx.AsyncClient, model: str) -> None:
    """The failed replica reaches the gateway with the neuron's next poll."""
    deadline = time.monotonic() + 10
    while not any(
        m["id"] == model and m["last_error"] for m in (await http.get("/fleet")).json()["models"]
    ):
        assert time.monotonic() < deadline, "the failure never reached the fleet view"
        await asyncio.sleep(0.05)  # the next poll, with a deadline


def states(html: str) -> dict[str, str]:
    """The models table's rows: model id to its shown state."""
    return dict(re.findall(r'<tr data-model="([^"]+)" data-kind="\w+" data-state="([^"]+)"', html))


async def test_the_first_paint_holds_every_model_in_one_vocabulary() -> None:
    async with cluster(neuron(), catalogue=CATALOGUE) as c:
        failed = await c.http.post("/v1/chat/completions", json=chat_body("broken"))
        assert failed.status_code >= 400
        await until_failure_shows(c.http, "broken")
        page = await c.http.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        html = page.text
        assert states(html) == {"chat-a": "ready", "chat-b": "not loaded", "broken": "failed"}
        assert f'<div class="reason">n1: {OOM}</div>' in html  # the reason, beside the state
        card = html[html.index('<div class="card" data-neuron="n1">') :]
        assert '<tr data-replica="chat-a"><td>chat-a</td>\n<td><span class="status ready">' in card
        panel = html[html.index('<main id="panel">') : html.index("</main>")]
        for word in re.findall(r'<span class="status [\w-]+">([\w ]+)', panel):
            assert word in ("ok", "ready", "not loaded", "failed"), word  # never loaded/available
        assert 'data-action="load" data-model="chat-b"' in html
        assert 'data-action="unload" data-model="chat-a"' in html  # only what is loaded unloads
        assert 'data-action="unload" data-model="chat-b"' not in html
        assert 'data-action="cordon" data-neuron="n1"' in html
        assert '<option value="n1">n1</option>' in html
        assert (await c.http.get("/fleet/panel")).text.startswith("<h2>fleet")


def test_the_vocabulary_maps_both_shapes() -> None:
    assert [shown_state(s) for s in ("ready", "loading", "unloading", "failed")] == [
        "ready",
        "loading",
        "unloading",
        "failed",
    ]
    assert shown_state("loaded") == "ready" and shown_state("available") == "not loaded"
    assert shown_state("available", "n1: out of memory") == "failed"


async def test_with_auth_the_page_asks_for_an_admin_key_and_keeps_it() -> None:
    async with cluster(neuron(), catalogue=CATALOGUE, auth=AUTH) as c:
        anonymous = await c.http.get("/")
        assert anonymous.status_code == 401 and 'action="/session"' in anonymous.text
        assert states(anonymous.text) == {} and c.served["n1"].url not in anonymous.text
        assert (await c.http.get("/", headers={"x-api-key": "sk-user"})).status_code == 403
        assert states((await c.http.get("/", headers={"x-api-key": ADMIN})).text)
        wrong = await c.http.post("/session", data={"key": "sk-user"})
        assert wrong.status_code == 403 and "not an admin key" in wrong.text
        assert "cortex_admin" not in wrong.headers.get("set-cookie", "")
        signed = await c.http.post("/session", data={"key": ADMIN})
        assert signed.status_code == 303 and signed.headers["location"] == "/"
        cookie = signed.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie
        page = await c.http.get("/", cookies={"cortex_admin": ADMIN})
        assert page.status_code == 200 and states(page.text)["chat-a"] == "ready"
        # The cookie opens the page's reads only: the admin API still wants the header.
        c.http.cookies.clear()
        acted = await c.http.post("/admin/neurons/n1/cordon", cookies={"cortex_admin": ADMIN})
        assert acted.status_code == 401


async def test_activity_counts_requests_tokens_and_time_to_first_token() -> None:
    async with cluster(neuron(), catalogue=CATALOGUE) as c:
        for stream in (False, True):
            answer = await c.http.post(
                "/v1/chat/completions", json=chat_body("chat-a", stream=stream)
            )
            assert answer.status_code == 200
        activity = (await c.http.get("/activity")).json()
        (chat_a,) = [m for m in activity["models"] if m["model"] == "chat-a"]
        assert chat_a["requests_per_second"] > 0 and chat_a["tokens_per_second"] > 0
        assert chat_a["ttft_seconds"] is not None and chat_a["ttft_seconds"] >= 0
        panel = (await c.http.get("/fleet/panel")).text
        row = panel[panel.index('<tr data-model="chat-a"') :].split("</tr>")[0]
        assert " ms</td>" in row  # the TTFT column is filled


def test_rates_are_differences_over_the_window() -> None:
    before = {"m": Totals(requests=10, tokens=100, ttft_sum=1.0, ttft_count=4)}
    after = {"m": Totals(requests=30, tokens=600, ttft_sum=3.0, ttft_count=8), "new": Totals(2)}
    view = rates(before, after, 10.0)
    m, new = sorted(view.models, key=lambda a: a.model != "m")
    assert (m.requests_per_second, m.tokens_per_second, m.ttft_seconds) == (2.0, 50.0, 0.5)
    assert new.model == "new" and new.requests_per_second == 0.2 and new.ttft_seconds is None
