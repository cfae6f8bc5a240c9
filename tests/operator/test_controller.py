"""The controller's probing, against a neuron answering over httpx's mock transport: of two probes
in flight, the answer to the later question is kept, whichever arrives last."""

from __future__ import annotations

import asyncio
import datetime
import itertools
import json

import httpx
import kopf
import pytest
from operator_harness import FAST, NS, until
from test_reconcile import GIB, answer, nr

from cortex.core.client import NeuronClient
from cortex.core.errors import CapacityExhausted, Shortfall
from cortex.core.fleet import LoadRequest, ModelState
from cortex.core.protocol.errors import openai_error
from cortex.core.resources import ModelPlacement, rfc3339
from cortex.operator.controller import Controller
from cortex.operator.kube import parse_peers
from cortex.operator.neurons import Probe
from cortex.operator.probing import leads
from cortex.operator.reconcile import DELETION_GRACE, LoadFailure


async def test_a_slow_older_probe_does_not_overwrite_a_newer_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The timer's probe is asked while a load is under way and answers late; the probe after the
    load is asked later and answers first. The replica must stay ready, not go back to loading."""
    loading = answer("a", chat=(ModelState.LOADING, GIB))
    ready = answer("a", chat=(ModelState.READY, GIB))
    late = asyncio.Event()
    asked: list[int] = []

    async def neuron(_: httpx.Request) -> httpx.Response:
        asked.append(len(asked))
        if len(asked) == 1:
            await late.wait()
            return httpx.Response(200, json=loading.model_dump(mode="json"))
        return httpx.Response(200, json=ready.model_dump(mode="json"))

    ticks = itertools.count(1_800_000_000)
    controller = Controller(FAST, clock=lambda: float(next(ticks)))
    client = NeuronClient("http://a:13131", transport=httpx.MockTransport(neuron))
    monkeypatch.setattr(controller, "client", lambda *_, **__: client)
    timer_probe = asyncio.create_task(controller.probe(NS, nr("a")))
    await until(lambda: asked, "the first probe to be asked")
    after_load = await controller.probe(NS, nr("a"))
    late.set()
    assert await timer_probe is after_load
    kept = controller.probes[(NS, "a")]
    assert kept.status is not None and kept.status.models[0].state == ModelState.READY
    await client.aclose()


async def test_a_deleted_placement_s_busy_replica_is_forced_out_after_the_grace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before the grace a busy replica holds the deletion; after it, it is unloaded anyway."""
    now = 1_800_000_000.0
    controller = Controller(FAST, clock=lambda: now)
    forced: list[bool] = []

    async def neuron(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/status":  # the probe after an unload
            return httpx.Response(200, json=answer("a").model_dump(mode="json"))
        force = json.loads(request.content)["force"]
        forced.append(force)
        if force:
            return httpx.Response(200, json={})
        busy = {"error": {"message": "chat has 1 request in flight", "code": "model_busy"}}
        return httpx.Response(409, json=busy)

    client = NeuronClient("http://a:13131", transport=httpx.MockTransport(neuron))
    monkeypatch.setattr(controller, "client", lambda *_, **__: client)
    monkeypatch.setattr(kopf, "info", lambda *_, **__: None)
    controller.probes[(NS, "a")] = Probe(
        "http://a:13131", now, status=answer("a", chat=(ModelState.READY, GIB))
    )

    def deleted(ago: float) -> ModelPlacement:
        meta = {"name": "chat", "deletionTimestamp": rfc3339(now - ago)}
        return ModelPlacement.model_validate({"metadata": meta, "spec": {"model": "chat"}})

    assert await controller.unload_everywhere(NS, deleted(10), [nr("a")], []) != []
    assert await controller.unload_everywhere(NS, deleted(DELETION_GRACE), [nr("a")], []) == []
    assert forced == [False, True]
    await client.aclose()


async def test_a_load_may_take_the_operator_s_load_timeout_not_the_client_s_read_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The neuron answers a load only once the model is ready: the read waits as long as the
    operator allows a load (30 min), not the 10 min any other read of a neuron may take."""
    controller = Controller(FAST)
    reads: dict[str, float] = {}

    async def neuron(request: httpx.Request) -> httpx.Response:
        reads[request.url.path] = request.extensions["timeout"]["read"]
        if request.url.path == "/status":
            return httpx.Response(200, json=answer("a").model_dump(mode="json"))
        return httpx.Response(
            200, json=answer("a", chat=(ModelState.READY, GIB)).models[0].model_dump(mode="json")
        )

    client = NeuronClient("http://a:13131", transport=httpx.MockTransport(neuron))
    monkeypatch.setattr(controller, "client", lambda *_, **__: client)
    monkeypatch.setattr(kopf, "info", lambda *_, **__: None)
    chat = ModelPlacement.model_validate({"metadata": {"name": "chat"}, "spec": {"model": "chat"}})
    await controller._load(NS, chat, nr("a"), LoadRequest(model="chat"))
    assert controller.failures == {}
    assert reads["/models/load"] == FAST.load_timeout > reads["/status"]
    await client.aclose()


def test_only_placements_still_backing_off_count_in_the_gauge() -> None:
    now = 1_800_000_000.0
    controller = Controller(FAST, clock=lambda: now)
    controller.failures[(NS, "over")] = LoadFailure("a", "corrupt", 3, now - 90, now - 10, 1)
    controller.failures[(NS, "waiting")] = LoadFailure("a", "corrupt", 1, now - 5, now + 5, 1)
    gauge = controller.metrics.registry.get_sample_value("cortex_operator_backing_off_placements")
    assert gauge == 1


def test_the_failure_of_a_spec_since_edited_is_not_in_the_fleet() -> None:
    now = 1_800_000_000.0
    controller = Controller(FAST, clock=lambda: now)
    controller.failures[(NS, "chat")] = LoadFailure("a", "no such source", 3, now - 5, now + 90, 1)
    body = {"metadata": {"name": "chat", "generation": 1}, "spec": {"model": "chat"}}
    asked = ModelPlacement.model_validate(body)
    assert set(controller.fleet(NS, [nr("a")], [asked]).failures) == {"chat"}
    body["metadata"]["generation"] = 2  # type: ignore[index]
    edited = ModelPlacement.model_validate(body)
    assert controller.fleet(NS, [nr("a")], [edited]).failures == {}


def test_a_peer_leads_unless_a_live_peer_is_at_or_above_its_priority() -> None:
    """kopf's rule, on a peering object's status as kopf parses it: the dead and this peer do
    not count; a peer with no lastseen is alive (kopf takes it as now)."""
    now = datetime.datetime.now(datetime.UTC)

    def peer(priority: int, seen_ago: float) -> dict[str, object]:
        seen = now - datetime.timedelta(seconds=seen_ago)
        return {"priority": priority, "lifetime": 60, "lastseen": seen.isoformat()}

    def leading(status: dict[str, object]) -> bool:
        return leads(parse_peers(status), "me", 5)

    assert leading({})
    assert leading({"me": peer(5, 0), "b": peer(4, 0)})
    assert not leading({"me": peer(5, 0), "b": peer(6, 0)})
    assert not leading({"me": peer(5, 0), "b": peer(5, 0)})  # kopf pauses both
    assert leading({"me": peer(5, 0), "b": peer(9, 61)})  # b is dead
    assert not leading({"me": peer(5, 0), "b": {"priority": 9}})  # no lastseen: seen now
    assert leading({"b": {"priority": "?"}, "c": "not a peer"})  # entries kopf never writes


async def test_a_refusal_for_room_is_learnt_and_planned_again_once_per_size_it_said(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The neuron's `error.memory` reaches the controller through the real NeuronClient: a load
    planned with less than it said is planned again at once; one planned with that size and
    refused again (a stale probe, say) is backed off like any failed load."""
    now = 1_800_000_000.0
    controller = Controller(FAST, clock=lambda: now)
    refusal = CapacityExhausted("big needs 3 GiB, 1 GiB free", memory=Shortfall(3 * GIB, GIB))

    async def neuron(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/status":
            return httpx.Response(200, json=answer("a").model_dump(mode="json"))
        return httpx.Response(refusal.status, json=openai_error(refusal))

    client = NeuronClient("http://a:13131", transport=httpx.MockTransport(neuron))
    monkeypatch.setattr(controller, "client", lambda *_, **__: client)
    events: list[tuple[str, str]] = []
    for say in ("info", "warn"):
        monkeypatch.setattr(kopf, say, lambda _, reason, message: events.append((reason, message)))
    big = ModelPlacement.model_validate(
        {"metadata": {"name": "big", "generation": 1}, "spec": {"model": "big"}}
    )
    await controller._load(NS, big, nr("a"), LoadRequest(model="big"), 0, 8 * GIB)
    assert controller.sizes[(NS, "big")].memory == 3 * GIB
    failure = controller.failures[(NS, "big")]
    assert (failure.room, failure.retry_at) == (True, now)
    assert events[-1] == (
        "NoRoom",
        "a: big needs 3 GiB, 1 GiB free; planning again for the 3.0 GiB it needs",
    )
    await controller._load(NS, big, nr("a"), LoadRequest(model="big"), 3 * GIB, 8 * GIB)
    failure = controller.failures[(NS, "big")]
    assert (failure.room, failure.attempts, failure.retry_at) == (False, 2, now + FAST.backoff(2))
    assert events[-1][0] == "LoadFailed"
    await controller._load(NS, big, nr("a"), LoadRequest(model="big"), 0, 2 * GIB)
    assert events[-1] == (
        "Unschedulable",
        "a refused it for room: it needs 3.0 GiB, more than any neuron it may use holds"
        " (largest 2.0 GiB)",
    )
    await client.aclose()
