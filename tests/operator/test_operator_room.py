"""The real kopf operator against kmock's emulator, with fake neurons that refuse a load for room
and say the size (`error.memory`, as the real neuron does): a placement without
spec.resources.memory is planned again with that size at once, instead of backing off
(docs/kubernetes.md, "The operator")."""

from __future__ import annotations

import pytest
from fakes.neuron import FakeNeuron, GiB, running
from operator_harness import (
    NEURONS,
    PLACEMENTS,
    Kube,
    Operator,
    neuron,
    placement,
    probed_twice_more,
    until,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

# Far longer than any wait below: a placement that waited out a backoff would time out the test.
BACKOFF = 120.0


def phase(kube: Kube, name: str) -> str | None:
    return kube.status(PLACEMENTS, name).get("phase")


def reasons(kube: Kube, name: str) -> list[str]:
    return [e["reason"] for e in kube.events(name)]


async def test_a_refusal_for_room_evicts_a_cold_model_for_the_size_it_said(
    kube: Kube, operator: Operator
) -> None:
    fake = FakeNeuron("n1", memory=4 * GiB, available={"big": 2 * GiB}, loaded={"stray": 3 * GiB})
    async with running(fake.app) as served, operator(retry_backoff=BACKOFF):
        await kube.create(NEURONS, neuron("n1", served.url))
        await kube.create(PLACEMENTS, placement("big", "big", source="file:/w/big"))
        await until(lambda: phase(kube, "big") == "Ready", "big to be Ready")
        assert fake.unloads == ["stray"]
        assert [(load.model, load.source) for load in fake.loads] == [
            ("big", "file:/w/big"),
            ("big", "file:/w/big"),
        ]
        assert fake.models["big"].source == "file:/w/big"  # the fake reports what it loaded
        said = await until(
            lambda: [e["message"] for e in kube.events("big") if e["reason"] == "NoRoom"],
            "the NoRoom Event",
        )
        assert said == [
            f"n1: big needs {2 * GiB}, {GiB} free; planning again for the 2.0 GiB it needs"
        ]
        assert "LoadFailed" not in reasons(kube, "big")


async def test_a_refusal_for_room_places_the_model_on_a_neuron_with_room(
    kube: Kube, operator: Operator
) -> None:
    """Two models of unknown size, found together by the operator's first plan, are both sent
    to the roomiest neuron; the one it refuses goes to the other neuron, planned with the size
    the refusal said."""
    sizes = {"a": 3 * GiB, "b": 3 * GiB}
    n1 = FakeNeuron("n1", memory=4 * GiB, available=sizes)
    n2 = FakeNeuron("n2", memory=4 * GiB, available=sizes)
    async with running(n1.app) as one, running(n2.app) as two:
        await kube.create(NEURONS, neuron("n1", one.url))
        await kube.create(NEURONS, neuron("n2", two.url))
        for name in ("a", "b"):
            await kube.create(PLACEMENTS, placement(name, name, source=f"file:/w/{name}"))
        async with operator(retry_backoff=BACKOFF):
            for name in ("a", "b"):
                await until(lambda n=name: phase(kube, n) == "Ready", f"{name} to be Ready")
            assert sorted(load.model for load in n1.loads) == ["a", "b"]  # both sent there
            assert len(n2.loads) == 1 and n1.unloads == n2.unloads == []
            moved = n2.loads[0].model
            assert set(n1.models) == {"a", "b"} - {moved}
            assert n2.models[moved].source == f"file:/w/{moved}"
            await until(lambda: "NoRoom" in reasons(kube, moved), "the NoRoom Event")


async def test_a_model_bigger_than_every_neuron_says_so_and_is_not_tried_again(
    kube: Kube, operator: Operator
) -> None:
    fake = FakeNeuron("n1", memory=4 * GiB, available={"huge": 8 * GiB})
    async with running(fake.app) as served, operator(retry_backoff=BACKOFF):
        await kube.create(NEURONS, neuron("n1", served.url))
        await kube.create(PLACEMENTS, placement("huge", "huge"))
        scheduled = await until(
            lambda: (c := kube.condition("huge", "Scheduled")).get("status") == "False" and c,
            "huge to be reported unschedulable",
        )
        assert scheduled["reason"] == "Unschedulable"
        assert scheduled["message"] == (
            "0 of 1 replicas placed: needs 8.0 GiB, more than any neuron it may use holds (4.0 GiB)"
        )
        said = await until(
            lambda: [e for e in kube.events("huge") if e["reason"] == "Unschedulable"],
            "the Unschedulable Event",
        )
        assert said[0]["type"] == "Warning"
        assert said[0]["message"] == (
            "n1 refused it for room: it needs 8.0 GiB, more than any neuron it may use holds"
            " (largest 4.0 GiB)"
        )
        await probed_twice_more(kube)
        assert len(fake.loads) == 1
        assert phase(kube, "huge") == "Pending"
        assert kube.condition("huge", "Loaded")["reason"] == "NoRoom"
