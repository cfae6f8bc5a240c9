"""The placer (docs/architecture.md, "The placement kernel"): plans run against neurons whose
lifecycle calls are answered from memory, and requests racing them."""

from __future__ import annotations

import asyncio
import time

import pytest
from gateway_cluster import eventually

from cortex.core.catalogue import ModelSpec
from cortex.core.config import NeuronEntry
from cortex.core.errors import CapacityExhausted, ModelBusy, ModelNotFound, Shortfall
from cortex.core.fleet import (
    DeviceStatus,
    LoadedModel,
    LoadRequest,
    ModelListing,
    ModelState,
    NeuronStatus,
)
from cortex.core.placement.model import Load, Policy, Unload
from cortex.gateway.catalogue import LiveCatalogue
from cortex.gateway.metrics import GatewayMetrics
from cortex.gateway.ondemand import OnDemand
from cortex.gateway.placer import MAX_PLANS, Placer
from cortex.gateway.registry import Fleet

GiB = 2**30


class Neuron:
    """A neuron's lifecycle calls answered from memory; a gate holds loads or unloads."""

    def __init__(self, name: str, memory: int, **resident: tuple[int, float]) -> None:
        self.name, self.memory = name, memory
        self.resident = {m: _loaded(m, size, used) for m, (size, used) in resident.items()}
        self.calls: list[tuple[str, str]] = []
        self.load_gate: asyncio.Event | None = None
        self.unload_gate: asyncio.Event | None = None
        self.busy: set[str] = set()  # unloads of these are refused, as with requests in flight
        # Loads are refused for room, each saying the model needs the next of these (memory
        # taken outside cortex since the last poll, say).
        self.refusals: list[int] = []

    def status_now(self) -> NeuronStatus:
        used = sum(m.memory_bytes for m in self.resident.values())
        models = [
            m.model_copy(update={"in_flight": int(m.id in self.busy)})
            for m in self.resident.values()
        ]
        device = DeviceStatus(
            id="cuda-0",
            index=0,
            kind="cuda",
            name="fake",
            memory_total=self.memory,
            memory_free=self.memory - used,
            memory_used=used,
        )
        return NeuronStatus(node=self.name, version="test", devices=[device], models=models)

    async def status(self) -> NeuronStatus:
        return self.status_now()

    async def models(self) -> ModelListing:
        return ModelListing(loaded=list(self.resident.values()))

    async def load(self, request: LoadRequest, *, timeout: float | None = None) -> LoadedModel:
        self.calls.append(("load", request.model))
        if self.load_gate is not None:
            await self.load_gate.wait()
        size = SIZES[request.model]
        used = sum(m.memory_bytes for m in self.resident.values())
        if self.refusals:
            needed = self.refusals.pop(0)
            raise CapacityExhausted(
                f"{request.model} needs {needed}", memory=Shortfall(needed, self.memory - used)
            )
        if used + size > self.memory:
            raise CapacityExhausted(
                f"{request.model} needs {size}, {self.memory - used} free",
                memory=Shortfall(size, self.memory - used),
            )
        self.resident[request.model] = _loaded(request.model, size, time.time())
        return self.resident[request.model]

    async def unload(self, model: str, force: bool = False) -> None:
        self.calls.append(("unload", model))
        if self.unload_gate is not None:
            await self.unload_gate.wait()
        if model in self.busy:
            raise ModelBusy(f"{model!r} has requests in flight")
        if self.resident.pop(model, None) is None:
            raise ModelNotFound(f"{model!r} is not loaded")

    async def aclose(self) -> None:
        pass


SIZES = {
    "a": 6 * GiB,
    "b": 6 * GiB,
    "x": 4 * GiB,
    "y": 3 * GiB,
    "w": 7 * GiB,
    "m": 7 * GiB,
    "big": 8 * GiB,
    "z": 6 * GiB,
    "v": 3 * GiB,
}


def _loaded(model: str, size: int, used: float) -> LoadedModel:
    return LoadedModel(
        id=model,
        source="file:/m",
        state=ModelState.READY,
        memory_bytes=size,
        loaded_at=used,
        last_used=used,
    )


def placer_over(*neurons: Neuron, strategy: str = "lru", **specs: dict[str, object]) -> Placer:
    """A placer over these neurons, polled once; `specs`: the catalogue, fields by model."""
    fleet = Fleet([])
    for neuron in neurons:
        fleet.add(NeuronEntry(name=neuron.name, endpoint=f"http://{neuron.name}"), neuron)  # type: ignore[arg-type]
        fleet[neuron.name].status = neuron.status_now()
        fleet[neuron.name].listing = ModelListing()
    catalogue = LiveCatalogue(
        [
            ModelSpec(id=m, source="file:/m", **({"memory": SIZES[m]} | fields))  # type: ignore[arg-type]
            for m, fields in specs.items()
        ],
        fleet,
    )
    return Placer(fleet, catalogue, Policy(strategy, 0), GatewayMetrics())  # type: ignore[arg-type]


async def test_switching_models_before_a_poll_evicts_the_one_just_loaded() -> None:
    # `cortex up` with room for one of two models: the second one asked for must evict the first
    # even though no poll has yet said how much memory the first load took.
    n1 = Neuron("n1", 10 * GiB)
    placer = placer_over(n1, a={}, b={})
    assert await placer.place("a") == "n1"
    assert await placer.place("b") == "n1"
    assert n1.calls == [("load", "a"), ("unload", "a"), ("load", "b")]
    assert await placer.place("a") == "n1"  # and back, still without a poll
    assert n1.calls[3:] == [("unload", "b"), ("load", "a")]


async def test_a_load_refused_for_memory_is_planned_again_with_evictions() -> None:
    # The last poll predates x's load (by another gateway): m looks like it fits as it is.
    n1 = Neuron("n1", 10 * GiB)
    placer = placer_over(n1, x={}, m={})
    n1.resident["x"] = _loaded("x", SIZES["x"], time.time() - 60)
    assert await placer.place("m") == "n1"
    assert n1.calls == [("load", "m"), ("unload", "x"), ("load", "m")]


async def test_a_load_sent_on_a_guess_is_planned_again_with_the_size_its_refusal_says() -> None:
    # m has no budget and was never seen ready: its first load goes out on a guess, without
    # evicting x. The neuron refuses it, saying what m needs: the next plan evicts x for it.
    n1 = Neuron("n1", 10 * GiB, x=(4 * GiB, time.time() - 60))
    placer = placer_over(n1, x={}, m={"memory": None})
    assert await placer.place("m") == "n1"
    assert n1.calls == [("load", "m"), ("unload", "x"), ("load", "m")]
    assert placer.fleet.sizes["m"] == SIZES["m"]


async def test_refusals_for_room_are_planned_again_once_per_size_learnt() -> None:
    # Every load is refused. A refusal that raises the known size is planned again; one that
    # does not is retried once (the view may be stale), then reaches the caller.
    n1 = Neuron("n1", 10 * GiB)
    n1.refusals = [GiB, GiB, GiB, GiB]
    placer = placer_over(n1, m={"memory": None})
    with pytest.raises(CapacityExhausted, match="needs"):
        await placer.place("m")
    assert n1.calls == [("load", "m")] * 3  # the guess, with 1 GiB, the stale-view retry
    # A size that keeps growing is planned again at most MAX_PLANS times, then reported.
    n2 = Neuron("n2", 10 * GiB)
    n2.refusals = [GiB, 2 * GiB, 3 * GiB, 4 * GiB, 5 * GiB]
    placer = placer_over(n2, m={"memory": None})
    with pytest.raises(CapacityExhausted, match="needs"):
        await placer.place("m")
    assert n2.calls == [("load", "m")] * MAX_PLANS


async def test_an_eviction_refused_is_planned_again_with_another_victim() -> None:
    old = time.time() - 600
    n1 = Neuron("n1", 10 * GiB, x=(4 * GiB, old), y=(3 * GiB, old + 60))
    placer = placer_over(n1, x={}, y={}, a={})
    n1.busy.add("x")  # a request through another gateway since the last poll
    assert await placer.place("a") == "n1"
    assert n1.calls == [("unload", "x"), ("unload", "y"), ("load", "a")]


async def test_an_eviction_under_way_completes_when_its_waiter_leaves() -> None:
    n1 = Neuron("n1", 10 * GiB, x=(4 * GiB, time.time() - 600))
    placer = placer_over(n1, x={}, m={})
    n1.unload_gate = asyncio.Event()
    waiter = asyncio.create_task(placer.place("m"))
    await eventually(lambda: n1.calls == [("unload", "x")])
    waiter.cancel()  # the client leaves while the neuron unloads x
    with pytest.raises(asyncio.CancelledError):
        await waiter
    n1.unload_gate.set()
    # Recorded and released: x is neither routed to nor stuck leaving, and can come back.
    await eventually(lambda: placer.fleet["n1"].model("x") is None, timeout=5)
    assert placer.reservations.leaving == frozenset()
    assert placer.reservations.arriving == {}
    assert await placer.place("x") == "n1"


async def test_a_request_racing_an_idle_unload_waits_and_loads_the_model_back() -> None:
    n1 = Neuron("n1", 10 * GiB, x=(4 * GiB, time.time() - 3600))
    placer = placer_over(n1, x={"idle_ttl": 60})
    n1.unload_gate = asyncio.Event()
    assert placer.reconcile(0) == [Unload("x", "n1", "idle")]
    await eventually(lambda: n1.calls == [("unload", "x")])
    request = asyncio.create_task(placer.place("x"))  # a request for x, too late to keep it
    await asyncio.sleep(0)  # one turn of the loop: it waits rather than answering at once
    assert not request.done()
    n1.unload_gate.set()
    assert await request == "n1"
    assert n1.calls == [("unload", "x"), ("load", "x")]


async def test_a_request_for_a_pin_waits_for_its_load_planned_behind_an_eviction() -> None:
    n1 = Neuron("n1", 10 * GiB, a=(6 * GiB, time.time() - 3600))
    placer = placer_over(n1, a={}, b={"pinned_on": ["n1"]})
    n1.unload_gate = asyncio.Event()
    assert placer.reconcile(0) == [Unload("a", "n1", "evict"), Load("b", "n1", 6 * GiB)]
    await eventually(lambda: n1.calls == [("unload", "a")])
    request = asyncio.create_task(placer.place("b"))  # b is reserved, its load not begun
    await asyncio.sleep(0)  # one turn of the loop: it waits rather than answering at once
    assert not request.done()
    n1.unload_gate.set()
    assert await request == "n1"
    assert n1.calls == [("unload", "a"), ("load", "b")]


async def test_a_replica_moved_by_defrag_serves_until_its_new_copy_is_ready() -> None:
    now = time.time()
    n1 = Neuron("n1", 10 * GiB, y=(3 * GiB, now - 600))
    n2 = Neuron("n2", 10 * GiB, w=(7 * GiB, now - 5))
    placer = placer_over(n1, n2, strategy="cost", y={}, w={}, big={})
    n2.load_gate = asyncio.Event()
    placing = asyncio.create_task(placer.place("big"))  # room on n1 by moving y to n2
    await eventually(lambda: n2.calls == [("load", "y")])
    assert placer.ready("y") == ["n1"]
    n2.load_gate.set()
    assert await placing == "n1"
    assert n1.calls == [("unload", "y"), ("load", "big")]
    assert placer.ready("y") == ["n2"]


async def test_a_defrag_move_gets_the_idle_unload_that_makes_its_room() -> None:
    now = time.time()
    n1 = Neuron("n1", 10 * GiB, y=(3 * GiB, now - 30))
    n2 = Neuron("n2", 10 * GiB, z=(6 * GiB, now - 7200), v=(3 * GiB, now - 1))
    placer = placer_over(n1, n2, strategy="cost", y={}, z={"idle_ttl": 3600}, v={}, big={})
    placer.fleet["n2"].in_flight["v"] = 1  # busy: y moves to n2 only once idle z has left
    assert await placer.place("big") == "n1"
    assert n2.calls == [("unload", "z"), ("load", "y")]
    assert n1.calls == [("unload", "y"), ("load", "big")]


@pytest.mark.parametrize("turns", range(4))
async def test_a_request_right_after_a_load_was_abandoned_loads_it_anew(turns: int) -> None:
    n1 = Neuron("n1", 10 * GiB)
    ondemand = OnDemand(placer_over(n1, m={}), timeout=30)
    n1.load_gate = asyncio.Event()
    first = asyncio.create_task(ondemand.ensure("m"))
    await eventually(lambda: n1.calls == [("load", "m")])
    first.cancel()  # its only client left: the load is abandoned ...
    for _ in range(turns):  # ... and a new request comes that many turns of the loop later
        await asyncio.sleep(0)
    second = asyncio.create_task(ondemand.ensure("m"))
    n1.load_gate.set()
    left, joined = await asyncio.gather(first, second, return_exceptions=True)
    assert isinstance(left, asyncio.CancelledError)
    assert joined == "n1"  # not the abandoned load's cancellation


async def test_a_request_joined_to_a_load_its_starter_cancels_loads_it_anew() -> None:
    n1 = Neuron("n1", 10 * GiB)
    placer = placer_over(n1, m={})
    n1.load_gate = asyncio.Event()
    by_hand = asyncio.create_task(placer.load_on("m", "n1"))  # an operator's load
    await eventually(lambda: n1.calls == [("load", "m")])
    request = asyncio.create_task(placer.place("m"))
    await asyncio.sleep(0)  # one turn of the loop: the request joins the load
    by_hand.cancel()  # the operator's client leaves, cancelling the load
    n1.load_gate.set()
    assert await request == "n1"
    assert n1.calls == [("load", "m"), ("unload", "m"), ("load", "m")]
