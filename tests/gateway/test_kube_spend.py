"""Budget spend in a ConfigMap, shared by the gateway replicas on Kubernetes (docs/security.md,
"Where spend is stored"): what one replica spends, the others count after a sync; it outlives a
gateway; concurrent writers lose nothing; windows keep their spend in periods; a sync that fails
keeps its charges for the next."""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

import httpx
from fakes.neuron import FakeNeuron
from gateway_cluster import chat_body, eventually
from kube_gateway import NS, Kube, emulator, kube_gateway, placement

from cortex.core.kube_api import KubeApi, KubeApiError, KubeLogin
from cortex.gateway.kube_spend import KubeSpendStore

GiB = 2**30
NAME = "cortex-spend"
KEY = "sk-team-key"


def _store(kube: Kube, api: KubeApi | None = None, now: float = 10_000.0) -> KubeSpendStore:
    api = api or KubeApi(KubeLogin(server=kube.url, namespace=NS, token="t"))
    return KubeSpendStore(api, NS, NAME, clock=lambda: now)


async def _data(kube: Kube) -> dict[str, Any]:
    response = await kube.http.get(f"/api/v1/namespaces/{NS}/configmaps/{NAME}")
    assert response.status_code == 200, response.text
    return {k: json.loads(v) for k, v in (response.json().get("data") or {}).items()}


async def test_what_one_replica_spends_the_other_counts_after_a_sync() -> None:
    async with emulator() as kube:
        a, b = _store(kube), _store(kube)
        a.record("team", 100, 9_000.0)
        assert a.spent("team", -math.inf) == 100  # before any write: its own charges count
        await a.sync()  # creates the ConfigMap
        await b.sync()
        assert b.spent("team", -math.inf) == 100
        b.record("team", 50, 9_500.0)
        await b.sync()
        await a.sync()
        assert a.spent("team", -math.inf) == b.spent("team", -math.inf) == 150
        assert await _data(kube) == {"team": {"total": 150, "spend": {}}}
        await a.api.aclose()
        await b.api.aclose()


async def test_two_writers_at_once_lose_nothing() -> None:
    """B writes between A's read and A's write: A's write is refused (409), and A reads B's
    spend and merges again."""
    async with emulator() as kube:
        a, b = _store(kube), _store(kube)
        await a.sync()
        real_get = a.api.get
        interleaved = []

        async def get_then_let_b_write(*args: Any) -> dict[str, Any] | None:
            found = await real_get(*args)
            if not interleaved:
                interleaved.append(True)
                b.record("team", 7, 9_000.0)
                await b.sync()
            return found

        a.api.get = get_then_let_b_write  # type: ignore[method-assign]
        a.record("team", 5, 9_000.0)
        await a.sync()
        patches = [
            r
            for r in list(kube.cluster)
            if str(r.method).upper().endswith("PATCH") and r.resource is not None
        ]
        assert interleaved and len(patches) == 3  # B's, A's refused one, A's again
        assert (await _data(kube))["team"]["total"] == 12
        assert a.spent("team", -math.inf) == 12
        await a.api.aclose()
        await b.api.aclose()


async def test_a_window_keeps_its_spend_in_periods_and_drops_what_left_it() -> None:
    async with emulator() as kube:
        store = _store(kube, now=10_000.0)
        store.windows = {"hourly": 3600.0}  # periods of 3600 / 240 = 15 s
        store.record("hourly", 40, 5_000.0)  # left the window by now
        store.record("hourly", 30, 9_001.0)
        store.record("hourly", 20, 9_010.0)
        await store.sync()
        assert store.charges("hourly", 10_000.0 - 3600) == [(9_015.0, 50)]
        assert store.spent("hourly", 10_000.0 - 3600) == 50
        assert await _data(kube) == {"hourly": {"total": 90, "spend": {"9015": 50}}}
        await store.api.aclose()


async def test_periods_at_todays_clock_keep_their_own_ends() -> None:
    """Epoch seconds need all their digits: two periods a minute apart stay two periods."""
    now = 1_796_296_620.0
    async with emulator() as kube:
        store = _store(kube, now=now)
        store.windows = {"daily": 86_400.0}  # periods of 360 s
        store.record("daily", 3, now - 700)
        store.record("daily", 4, now - 100)
        await store.sync()
        other = _store(kube, now=now)
        await other.sync()
        ends = [end for end, _ in other.charges("daily", now - 86_400)]
        assert other.charges("daily", now - 86_400) == [(ends[0], 3), (ends[1], 4)]
        for end, at in zip(ends, (now - 700, now - 100), strict=True):
            assert end % 360 == 0 and at <= end < at + 360  # its own period's end
        assert other.spent("daily", now - 86_400) == 7
        await store.api.aclose()
        await other.api.aclose()


async def test_a_failed_sync_keeps_the_charges_and_a_key_name_of_any_shape_round_trips() -> None:
    async with emulator() as kube:
        down = KubeApi(KubeLogin(server="http://127.0.0.1:9", namespace=NS, token="t"))
        store = _store(kube, api=down)
        store.record("alice@example.com", 9, 9_000.0)
        try:
            await store.sync()
        except KubeApiError:
            pass
        else:
            raise AssertionError("a sync with no API server succeeded")
        assert store.spent("alice@example.com", -math.inf) == 9
        await down.aclose()
        store.api = KubeApi(KubeLogin(server=kube.url, namespace=NS, token="t"))
        await store.sync()
        (data_key,) = (await _data(kube)).keys()
        assert data_key.startswith("b64.")
        other = _store(kube)
        await other.sync()
        assert other.spent("alice@example.com", -math.inf) == 9
        await store.api.aclose()
        await other.api.aclose()


async def test_closing_during_a_write_lets_it_finish_and_counts_it_once() -> None:
    """A gateway stopping while a sync's write is on its way: the write is not cut off (a cut
    write the server took would be written again), and what came after it is written last."""
    async with emulator() as kube:
        store = _store(kube)
        store.interval = 0.01
        real_patch = store.api.merge_patch
        writing, go_on = asyncio.Event(), asyncio.Event()

        async def slow_patch(*args: Any) -> dict[str, Any]:
            stored = await real_patch(*args)  # the server has taken the write
            writing.set()
            await go_on.wait()  # and its answer is on its way
            return stored

        store.api.merge_patch = slow_patch  # type: ignore[method-assign]
        await store.open()
        store.record("team", 5, 9_000.0)
        await writing.wait()
        store.record("team", 2, 9_001.0)  # after the write began: the last sync's
        closing = asyncio.create_task(store.aclose())
        await asyncio.sleep(0)
        go_on.set()
        await closing
        assert (await _data(kube))["team"]["total"] == 7
        await store.api.aclose()


ADMIN = "sk-admin-key"


async def test_a_reset_forgets_the_stored_spend_and_the_other_replica_follows() -> None:
    async with emulator() as kube:
        a, b = _store(kube), _store(kube)
        a.record("team", 100, 9_000.0)
        a.record("other", 5, 9_000.0)
        await a.sync()
        await b.sync()
        a.record("team", 7, 9_100.0)  # not yet written: the reset forgets it too
        b.record("team", 3, 9_100.0)  # another replica's, not yet written: it still counts
        await a.reset("team")
        assert a.spent("team", -math.inf) == 0 and a.spent("other", -math.inf) == 5
        assert await _data(kube) == {"other": {"total": 5, "spend": {}}}
        await b.sync()
        await a.sync()
        assert a.spent("team", -math.inf) == b.spent("team", -math.inf) == 3
        await a.reset("nobody")  # a key that never spent: nothing to remove
        await a.api.aclose()
        await b.api.aclose()


def _auth(budget: int) -> dict[str, Any]:
    key = {"name": "team", "key": KEY, "budget_tokens": budget}
    admin = {"name": "ops", "key": ADMIN, "admin": True}
    return {"enabled": True, "keys": [key, admin], "spend_configmap": NAME}


async def _ask(http: httpx.AsyncClient) -> int:
    headers = {"authorization": f"Bearer {KEY}"}
    answer = await http.post("/v1/chat/completions", json=chat_body("chat-a"), headers=headers)
    return answer.status_code


async def test_gateway_replicas_share_a_budget_and_a_new_one_keeps_it() -> None:
    """Two gateways on one namespace: what the key spends through one closes it on the other,
    and a gateway started afterwards (a rollout) still counts it."""
    n1 = FakeNeuron("n1", loaded={"chat-a": GiB})
    async with emulator() as kube:
        await kube.create("modelplacements", placement("chat-a", "chat-a"))
        async with kube_gateway(kube, n1, auth=_auth(budget=1)) as one:
            await one.add_neuron("n1")
            await kube.set_replicas("chat-a", ("n1", one.endpoint("n1"), "ready"))
            async with kube_gateway(kube, auth=_auth(budget=1)) as two:
                assert await _ask(one.http) == 200  # spends more than the budget's 1 token
                assert await _ask(one.http) == 429
                spent = await _wait_for_spend(kube)
                assert spent > 1
                # Asking `two` before its next sync would be answered: within one sync interval
                # a replica does not know what another spent (docs/security.md).
                store = two.gateway.ledger.store
                assert store is not None
                await eventually(lambda: store.spent("team", -math.inf) == spent)
                assert await _ask(two.http) == 429
        async with kube_gateway(kube, auth=_auth(budget=1)) as three:
            assert await _ask(three.http) == 429  # read at its start
            ledger = three.gateway.ledger
            assert ledger.store is not None and ledger.store.spent("team", -math.inf) == spent
            # An admin resets the key through this replica: the ConfigMap forgets it at once.
            reset = await three.http.post(
                "/admin/keys/team/reset", headers={"authorization": f"Bearer {ADMIN}"}
            )
            assert reset.status_code == 200 and reset.json()["spent"] == 0, reset.text
            assert reset.json()["remaining"] == 1
            assert "team" not in await _data(kube)
            assert ledger.store.spent("team", -math.inf) == 0


async def _wait_for_spend(kube: Kube) -> int:
    for _ in range(600):
        response = await kube.http.get(f"/api/v1/namespaces/{NS}/configmaps/{NAME}")
        data = response.json().get("data") or {} if response.status_code == 200 else {}
        if "team" in data:
            return int(json.loads(data["team"])["total"])
        await asyncio.sleep(0.02)
    raise AssertionError("the spend never reached the ConfigMap")
