"""The real kopf operator against kmock's emulator over HTTP, with fake neurons over HTTP: each
behaviour of docs/kubernetes.md, observed through the objects' status, Events and the neurons'
own record of load and unload calls."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest
from fakes.cluster import CEL_RULES
from fakes.neuron import FakeNeuron, GiB, running
from operator_harness import (
    NEURONS,
    NS,
    PLACEMENTS,
    Kube,
    Operator,
    neuron,
    placement,
    probed_twice_more,
    until,
    until_async,
)
from prometheus_client.parser import text_string_to_metric_families

import cortex.operator.handlers as handlers
import cortex.operator.kube as kube_module
import cortex.operator.planning as planning
from cortex.cli.commands import free_port
from cortex.core.fleet import ModelState
from cortex.core.resources import DEMAND_ANNOTATION, PlacementDemand, rfc3339
from cortex.operator.controller import Controller

pytestmark = pytest.mark.asyncio(loop_scope="module")
PLACEMENT_PATH = f"/apis/{PLACEMENTS.rsplit('/', 1)[0]}/namespaces/{NS}/modelplacements"


def phase(kube: Kube, name: str) -> str | None:
    return kube.status(PLACEMENTS, name).get("phase")


def loads_of(fake: FakeNeuron, model: str) -> int:
    return sum(1 for load in fake.loads if load.model == model)


def retried(kube: Kube, name: str) -> bool:
    """kopf recorded a temporary failure of the placement's deletion handler (its progress)."""
    annotations = (kube.get(PLACEMENTS, name) or {}).get("metadata", {}).get("annotations", {})
    return any(key.endswith("placement_deleted") for key in annotations)


async def demand(kube: Kube, name: str, waiting: int = 1) -> None:
    """What the gateway does when a client waits for a model with no ready replica."""
    annotation = PlacementDemand(at=rfc3339(time.time()), waiting=waiting).annotation()
    await kube.patch(PLACEMENTS, name, {"metadata": {"annotations": annotation}})


async def test_a_placement_becomes_ready_and_names_its_neuron(
    kube: Kube, operator: Operator
) -> None:
    fake = FakeNeuron("n1", available={"chat": 2 * GiB})
    async with running(fake.app) as served, operator():
        await kube.create(NEURONS, neuron("n1", served.url))
        await kube.create(PLACEMENTS, placement("chat", "chat"))
        await until(lambda: phase(kube, "chat") == "Ready", "the placement to be Ready")
        status = kube.status(PLACEMENTS, "chat")
        assert status["readyReplicas"] == 1
        assert [(r["neuron"], r["endpoint"], r["state"]) for r in status["replicas"]] == [
            ("n1", served.url, "ready")
        ]
        assert kube.condition("chat", "Scheduled")["status"] == "True"
        assert kube.condition("chat", "Loaded")["reason"] == "Loaded"
        neuron_status = await until(
            lambda: (s := kube.status(NEURONS, "n1")).get("models") and s, "the neuron's models"
        )
        assert neuron_status["phase"] == "Ready"
        assert [m["model"] for m in neuron_status["models"]] == ["chat"]
        assert neuron_status["memoryFree"] == "6Gi"
        assert {e["reason"] for e in kube.events("chat")} >= {"Loading", "Loaded"}
        assert loads_of(fake, "chat") == 1


async def test_a_full_neuron_evicts_the_lowest_priority_replica(
    kube: Kube, operator: Operator
) -> None:
    fake = FakeNeuron(
        "n1", memory=4 * GiB, available={"low": 2 * GiB, "mid": 2 * GiB, "high": 2 * GiB}
    )
    async with running(fake.app) as served, operator():
        await kube.create(NEURONS, neuron("n1", served.url))
        for name, priority in (("low", 0), ("mid", 5)):
            body = placement(name, name, priority=priority, replicas={"min": 0, "max": 1})
            await kube.create(PLACEMENTS, body)
            await demand(kube, name)
            await until(lambda n=name: phase(kube, n) == "Ready", f"{name} to be Ready")
        await until(
            lambda: (
                DEMAND_ANNOTATION
                not in kube.get(PLACEMENTS, "mid")["metadata"].get("annotations", {})
            ),
            "the served demand to be removed",
        )
        high = placement("high", "high", priority=10, resources={"memory": "2Gi"})
        await kube.create(PLACEMENTS, high)
        await until(lambda: phase(kube, "high") == "Ready", "high to be Ready")
        assert fake.unloads == ["low"]
        assert phase(kube, "mid") == "Ready"
        await until(lambda: phase(kube, "low") == "Idle", "low to be Idle")
        assert kube.condition("low", "Loaded")["reason"] == "Evicted"
        assert "Evicted" in {e["reason"] for e in kube.events("low")}


async def test_a_model_no_placement_owns_gives_way_to_one_that_is_placed(
    kube: Kube, operator: Operator
) -> None:
    fake = FakeNeuron("n1", memory=4 * GiB, available={"chat": 2 * GiB}, loaded={"stray": 3 * GiB})
    async with running(fake.app) as served, operator():
        await kube.create(NEURONS, neuron("n1", served.url))
        await kube.create(PLACEMENTS, placement("chat", "chat", resources={"memory": "2Gi"}))
        await until(lambda: phase(kube, "chat") == "Ready", "the placement to be Ready")
        assert fake.unloads == ["stray"]
        assert "Evicted" in {e["reason"] for e in kube.events("n1")}  # said on the Neuron


async def test_a_pinned_replica_is_never_evicted(kube: Kube, operator: Operator) -> None:
    fake = FakeNeuron("n1", memory=4 * GiB, available={"pinned": 2 * GiB, "big": 3 * GiB})
    async with running(fake.app) as served, operator():
        await kube.create(NEURONS, neuron("n1", served.url))
        await kube.create(
            PLACEMENTS, placement("pinned", "pinned", pinned=True, resources={"memory": "2Gi"})
        )
        await until(lambda: phase(kube, "pinned") == "Ready", "the pinned placement to be Ready")
        await kube.create(
            PLACEMENTS, placement("big", "big", priority=100, resources={"memory": "3Gi"})
        )
        scheduled = await until(
            lambda: (c := kube.condition("big", "Scheduled")).get("status") == "False" and c,
            "the big placement to be reported unschedulable",
        )
        assert scheduled["reason"] == "Unschedulable"
        assert "pinned" in scheduled["message"]
        assert phase(kube, "big") == "Pending"
        assert fake.unloads == []
        assert phase(kube, "pinned") == "Ready"


async def test_demand_scales_a_min_zero_placement_from_zero(kube: Kube, operator: Operator) -> None:
    fake = FakeNeuron("n1", available={"lazy": GiB})
    async with running(fake.app) as served, operator():
        await kube.create(NEURONS, neuron("n1", served.url))
        await kube.create(PLACEMENTS, placement("lazy", "lazy", replicas={"min": 0, "max": 1}))
        await until(lambda: phase(kube, "lazy") == "Idle", "the min-0 placement to be Idle")
        assert kube.condition("lazy", "Loaded")["reason"] == "Idle"
        assert fake.loads == []
        await demand(kube, "lazy", waiting=3)
        await until(lambda: phase(kube, "lazy") == "Ready", "the demanded placement to be Ready")
        await until(
            lambda: (
                DEMAND_ANNOTATION
                not in kube.get(PLACEMENTS, "lazy")["metadata"].get("annotations", {})
            ),
            "the served demand annotation to be removed",
        )
        assert loads_of(fake, "lazy") == 1


async def test_an_idle_replica_above_the_minimum_is_unloaded(
    kube: Kube, operator: Operator
) -> None:
    fake = FakeNeuron("n1", available={"lazy": GiB})
    async with running(fake.app) as served, operator():
        await kube.create(NEURONS, neuron("n1", served.url))
        body = placement("lazy", "lazy", replicas={"min": 0, "max": 1}, idleTimeout="1s")
        await kube.create(PLACEMENTS, body)
        await demand(kube, "lazy")
        await until(lambda: phase(kube, "lazy") == "Ready", "the demanded placement to be Ready")
        await until(lambda: fake.unloads == ["lazy"], "the idle replica to be unloaded")
        await until(lambda: phase(kube, "lazy") == "Idle", "the placement to be Idle again")
        assert kube.condition("lazy", "Loaded")["reason"] == "Idle"
        assert "Idle" in {e["reason"] for e in kube.events("lazy")}
        assert loads_of(fake, "lazy") == 1  # the served demand does not load it again


async def test_deleting_a_placement_unloads_it_everywhere(kube: Kube, operator: Operator) -> None:
    one, two = FakeNeuron("n1", available={"chat": GiB}), FakeNeuron("n2", available={"chat": GiB})
    async with running(one.app) as first, running(two.app) as second, operator():
        await kube.create(NEURONS, neuron("n1", first.url))
        await kube.create(NEURONS, neuron("n2", second.url))
        await kube.create(PLACEMENTS, placement("chat", "chat", replicas={"min": 2, "max": 2}))
        await until(
            lambda: kube.status(PLACEMENTS, "chat").get("readyReplicas") == 2, "two replicas"
        )
        await until(
            lambda: kube.get(PLACEMENTS, "chat")["metadata"].get("finalizers"), "the finalizer"
        )
        await kube.delete(PLACEMENTS, "chat")
        await until(lambda: kube.get(PLACEMENTS, "chat") is None, "the placement to be gone")
        assert (one.unloads, two.unloads) == (["chat"], ["chat"])
        assert one.models == {} and two.models == {}


async def test_deleting_a_placement_while_it_loads_cancels_the_load(
    kube: Kube, operator: Operator
) -> None:
    fake = FakeNeuron("n1", available={"chat": GiB})
    fake.faults.load_gate = asyncio.Event()  # the load never ends by itself
    async with running(fake.app) as served, operator():
        await kube.create(NEURONS, neuron("n1", served.url))
        await kube.create(PLACEMENTS, placement("chat", "chat"))
        await until(lambda: fake.loads, "the load to start")
        await kube.delete(PLACEMENTS, "chat")
        await until(lambda: kube.get(PLACEMENTS, "chat") is None, "the placement to be gone")
        assert fake.unloads == ["chat"] and fake.models == {}
        assert "LoadFailed" not in {e["reason"] for e in kube.events("chat")}


async def test_deleting_a_placement_keeps_a_model_another_placement_places(
    kube: Kube, operator: Operator
) -> None:
    """A refused duplicate deleted, then a rename (delete and create): nothing is unloaded."""
    fake = FakeNeuron("n1", available={"chat": GiB})
    async with running(fake.app) as served, operator():
        await kube.create(NEURONS, neuron("n1", served.url))
        await kube.create(PLACEMENTS, placement("chat", "chat"))
        await until(lambda: phase(kube, "chat") == "Ready", "the placement to be Ready")
        for name in ("chat-copy", "chat-renamed"):
            await kube.create(PLACEMENTS, placement(name, "chat"))
            await until(
                lambda n=name: kube.condition(n, "Scheduled").get("status") == "False",
                f"{name} to be refused as a duplicate",
            )
            await until(
                lambda n=name: kube.get(PLACEMENTS, n)["metadata"].get("finalizers"),
                f"{name}'s finalizer",
            )
        await kube.delete(PLACEMENTS, "chat-copy")
        await until(lambda: kube.get(PLACEMENTS, "chat-copy") is None, "the duplicate to be gone")
        await kube.delete(PLACEMENTS, "chat")
        await until(lambda: kube.get(PLACEMENTS, "chat") is None, "the old name to be gone")
        await until(lambda: phase(kube, "chat-renamed") == "Ready", "the new name to be Ready")
        assert fake.unloads == []
        assert loads_of(fake, "chat") == 1


async def test_a_later_placement_of_a_placed_model_is_refused_whatever_its_name(
    kube: Kube, operator: Operator
) -> None:
    fake = FakeNeuron("n1", available={"chat": GiB})
    async with running(fake.app) as served, operator():
        await kube.create(NEURONS, neuron("n1", served.url))
        await kube.create(PLACEMENTS, placement("zchat", "chat", pinned=True))
        await until(lambda: phase(kube, "zchat") == "Ready", "zchat to be Ready")
        # Created later, first by name, and it would unload an idle replica at once.
        later = placement("achat", "chat", replicas={"min": 0, "max": 3}, idleTimeout="1s")
        await kube.create(PLACEMENTS, later)
        await until(lambda: phase(kube, "achat") == "Refused", "achat to be refused")
        status = kube.status(PLACEMENTS, "achat")
        assert status.get("replicas", []) == [] and status.get("readyReplicas", 0) == 0
        for kind in ("Scheduled", "Loaded"):
            condition = kube.condition("achat", kind)
            assert (condition["status"], condition["reason"]) == ("False", "Duplicate")
            assert condition["message"] == "model chat is placed by ModelPlacement zchat"
        await probed_twice_more(kube)  # past achat's idleTimeout
        assert fake.unloads == []
        assert phase(kube, "zchat") == "Ready"


async def test_spec_model_is_immutable_and_a_change_anyway_unloads_the_old_model(
    kube: Kube, operator: Operator, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeNeuron("n1", memory=4 * GiB, available={"a": 3 * GiB, "b": 3 * GiB})
    async with running(fake.app) as served, operator():
        await kube.create(NEURONS, neuron("n1", served.url))
        await kube.create(PLACEMENTS, placement("p", "a"))
        await until(lambda: phase(kube, "p") == "Ready", "p to be Ready")
        headers = {"Content-Type": "application/merge-patch+json"}
        change = {"spec": {"model": "b"}}
        async with kube.http.patch(f"{PLACEMENT_PATH}/p", json=change, headers=headers) as answer:
            assert answer.status == 422
            assert "spec.model is immutable" in (await answer.json())["message"]
        # A cluster that does not evaluate the CRD's CEL rules takes the change: the operator
        # unloads the old model before it places the new one (both do not fit).
        monkeypatch.setitem(CEL_RULES, "self == oldSelf", lambda value, old: True)
        await kube.patch(PLACEMENTS, "p", change)
        await until(
            lambda: (
                phase(kube, "p") == "Ready" and kube.status(PLACEMENTS, "p").get("model") == "b"
            ),
            "p to place b",
        )
        assert fake.unloads == ["a"] and list(fake.models) == ["b"]
        unloaded = await until(
            lambda: [e["message"] for e in kube.events("p") if e["reason"] == "Unloaded"],
            "the Unloaded Event",
        )
        assert unloaded == ["a unloaded from n1: spec.model changed"]


async def test_a_neuron_that_is_down_does_not_hold_a_deletion(
    kube: Kube, operator: Operator
) -> None:
    up, down = (
        FakeNeuron("up", available={"chat": GiB}),
        FakeNeuron("down", available={"chat": GiB}),
    )
    async with running(up.app) as first, running(down.app) as second, operator():
        await kube.create(NEURONS, neuron("up", first.url))
        await kube.create(NEURONS, neuron("down", second.url))
        await kube.create(PLACEMENTS, placement("chat", "chat", replicas={"min": 2, "max": 2}))
        await until(
            lambda: kube.status(PLACEMENTS, "chat").get("readyReplicas") == 2, "two replicas"
        )
        await second.stop(force=True)
        await until(
            lambda: kube.status(NEURONS, "down").get("phase") == "Unreachable", "down Unreachable"
        )
        await kube.delete(PLACEMENTS, "chat")
        await until(lambda: kube.get(PLACEMENTS, "chat") is None, "the placement to be gone")
        assert (up.unloads, down.unloads) == (["chat"], [])


async def test_a_restarted_operator_loads_nothing_twice(kube: Kube, operator: Operator) -> None:
    fake = FakeNeuron("n1", available={"a": GiB, "b": GiB})
    async with running(fake.app) as served:
        async with operator():
            await kube.create(NEURONS, neuron("n1", served.url))
            await kube.create(PLACEMENTS, placement("a", "a"))
            await kube.create(PLACEMENTS, placement("b", "b"))
            await until(lambda: phase(kube, "a") == phase(kube, "b") == "Ready", "both Ready")
        # Stale status while no operator runs: only a reconcile by the new one restores it.
        for name in ("a", "b"):
            await kube.patch(PLACEMENTS, name, {"status": {"phase": "Pending"}})
        async with operator():
            await until(lambda: phase(kube, "a") == phase(kube, "b") == "Ready", "both Ready again")
        assert (loads_of(fake, "a"), loads_of(fake, "b")) == (1, 1)
        assert fake.unloads == []


async def test_a_restarted_operator_unloads_a_deleted_placement_once_neurons_answer(
    kube: Kube, operator: Operator
) -> None:
    """Deleted while no operator ran: the new one waits for the neuron's first answer instead of
    releasing the finalizer with the replica still loaded."""
    fake = FakeNeuron("n1", available={"chat": GiB})
    async with running(fake.app) as served:
        async with operator():
            await kube.create(NEURONS, neuron("n1", served.url))
            await kube.create(PLACEMENTS, placement("chat", "chat"))
            await until(lambda: phase(kube, "chat") == "Ready", "the placement to be Ready")
        await kube.delete(PLACEMENTS, "chat")
        fake.faults.status_gate = gate = asyncio.Event()
        # Probes time out after 2 s here: the neuron stays unprobed, not unreachable, meanwhile.
        async with operator(probe_interval=1.0):
            await until(lambda: retried(kube, "chat"), "the deletion to be retried")
            gate.set()
            await until(lambda: kube.get(PLACEMENTS, "chat") is None, "the placement to be gone")
        assert fake.unloads == ["chat"]


async def test_a_fleet_at_rest_is_planned_once_not_once_per_reconcile(
    kube: Kube, operator: Operator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Timers reconcile every placement each probe interval; nothing changes, so no new plan."""
    counts = {"plans": 0, "reconciles": 0}
    plan_fleet, reconcile = planning.plan_fleet, Controller.reconcile

    def counted_plan(*args: Any) -> Any:
        counts["plans"] += 1
        return plan_fleet(*args)

    async def counted_reconcile(self: Controller, *args: Any) -> Any:
        counts["reconciles"] += 1
        return await reconcile(self, *args)

    monkeypatch.setattr(planning, "plan_fleet", counted_plan)
    monkeypatch.setattr(Controller, "reconcile", counted_reconcile)
    names = [f"m{i}" for i in range(6)]
    fake = FakeNeuron("n1", available=dict.fromkeys(names, GiB // 2))
    async with running(fake.app) as served, operator():
        await kube.create(NEURONS, neuron("n1", served.url))
        for name in names:
            await kube.create(PLACEMENTS, placement(name, name))
        await until(lambda: all(phase(kube, n) == "Ready" for n in names), "all Ready")
        plans, reconciles = counts["plans"], counts["reconciles"]
        await until(lambda: counts["reconciles"] >= reconciles + 60, "60 more reconciles")
        # At most the last load's own changes (its probe, then its reservation dropped).
        assert counts["plans"] - plans <= 2
    assert sorted(load.model for load in fake.loads) == names


async def test_a_lost_neuron_s_replica_is_rescheduled(kube: Kube, operator: Operator) -> None:
    big = FakeNeuron("big", memory=16 * GiB, available={"chat": GiB})
    small = FakeNeuron("small", memory=8 * GiB, available={"chat": GiB})
    async with running(big.app) as first, running(small.app) as second, operator():
        await kube.create(NEURONS, neuron("big", first.url))
        await kube.create(NEURONS, neuron("small", second.url))
        await kube.create(PLACEMENTS, placement("chat", "chat"))
        await until(lambda: phase(kube, "chat") == "Ready", "the placement to be Ready")
        assert [r["neuron"] for r in kube.status(PLACEMENTS, "chat")["replicas"]] == ["big"]
        await first.stop(force=True)
        await until(
            lambda: kube.status(NEURONS, "big").get("phase") == "Unreachable", "big Unreachable"
        )
        await until(
            lambda: (
                [
                    (r["neuron"], r["state"])
                    for r in kube.status(PLACEMENTS, "chat").get("replicas", [])
                ]
                == [("small", "ready")]
            ),
            "the replica to move to the small neuron",
        )
        assert phase(kube, "chat") == "Ready"
        assert loads_of(small, "chat") == 1
        assert "ReplicaLost" in {e["reason"] for e in kube.events("chat")}
        assert "Unreachable" in {e["reason"] for e in kube.events("big")}


async def test_a_neuron_back_keeps_its_ready_replica_and_the_replacement_load_goes(
    kube: Kube, operator: Operator
) -> None:
    back = FakeNeuron("back", available={"chat": GiB}, loaded={"chat": GiB})
    spare = FakeNeuron("spare", available={"chat": GiB})
    spare.faults.load_gate = asyncio.Event()  # a large model: the replacement takes a while
    async with running(back.app) as first, running(spare.app) as second, operator():
        await kube.create(NEURONS, neuron("back", first.url))
        await kube.create(NEURONS, neuron("spare", second.url))
        await kube.create(PLACEMENTS, placement("chat", "chat"))
        await until(lambda: phase(kube, "chat") == "Ready", "the placement to be Ready")
        blip = back.faults.status_gate = asyncio.Event()  # misses its probes for a moment
        await until(lambda: spare.loads, "the replacement load on spare")
        back.faults.status_gate = None
        blip.set()
        # Above replicas.max: the loading replica goes (its load cancelled), the ready one stays.
        await until(lambda: spare.unloads == ["chat"], "the replacement load to be unloaded")
        await until(
            lambda: [r["neuron"] for r in kube.status(PLACEMENTS, "chat")["replicas"]] == ["back"],
            "the replica on back alone in the status",
        )
        assert phase(kube, "chat") == "Ready"
        assert back.unloads == [] and "chat" in back.models
        assert "LoadFailed" not in {e["reason"] for e in kube.events("chat")}


async def test_a_neuron_whose_endpoint_is_cleared_leaves_the_fleet(
    kube: Kube, operator: Operator
) -> None:
    gone, other = (
        FakeNeuron("gone", available={"chat": GiB}),
        FakeNeuron("other", available={"chat": GiB}),
    )
    async with running(gone.app) as first, running(other.app) as second, operator():
        await kube.create(NEURONS, neuron("gone", first.url))
        await kube.create(PLACEMENTS, placement("chat", "chat"))
        await until(lambda: phase(kube, "chat") == "Ready", "the placement to be Ready")
        await kube.create(NEURONS, neuron("other", second.url))
        await until(lambda: kube.status(NEURONS, "other").get("phase") == "Ready", "other Ready")
        await kube.patch(NEURONS, "gone", {"spec": {"endpoint": None}})
        await first.stop(force=True)  # the machine is gone too
        await until(
            lambda: (
                [
                    (r["neuron"], r["state"])
                    for r in kube.status(PLACEMENTS, "chat").get("replicas", [])
                ]
                == [("other", "ready")]
            ),
            "the replica to move to other",
        )
        await until(lambda: kube.status(NEURONS, "gone").get("models") == [], "gone's models")
        assert kube.condition("chat", "Loaded")["reason"] == "Loaded"


async def test_a_draining_neuron_is_not_ready_and_its_replica_moves(
    kube: Kube, operator: Operator
) -> None:
    """A neuron that answers unhealthy (SIGTERM: shutting down) leaves Ready, and its replica is
    no longer listed ready while the replica is placed again elsewhere."""
    first = FakeNeuron("a", available={"chat": GiB}, loaded={"chat": GiB})
    second = FakeNeuron("b", available={"chat": GiB})
    async with running(first.app) as one, running(second.app) as two, operator():
        await kube.create(NEURONS, neuron("a", one.url))
        await kube.create(NEURONS, neuron("b", two.url))
        await kube.create(PLACEMENTS, placement("chat", "chat"))
        await until(lambda: phase(kube, "chat") == "Ready", "the placement to be Ready")
        first.faults.unhealthy = True
        await until(
            lambda: kube.status(NEURONS, "a").get("phase") == "Pending", "the draining neuron"
        )
        conditions = kube.status(NEURONS, "a")["conditions"]
        healthy = next(c for c in conditions if c["type"] == "Healthy")
        assert (healthy["status"], healthy["reason"]) == ("False", "ShuttingDown")
        await until(
            lambda: (
                [(r["neuron"], r["state"]) for r in kube.status(PLACEMENTS, "chat")["replicas"]]
                == [("b", "ready")]
            ),
            "the replica to be listed on b only",
        )
        assert kube.status(PLACEMENTS, "chat")["readyReplicas"] == 1


async def test_an_unschedulable_placement_says_why(kube: Kube, operator: Operator) -> None:
    fake = FakeNeuron("n1", memory=4 * GiB, available={"huge": 8 * GiB, "picky": GiB})
    async with running(fake.app) as served, operator():
        await kube.create(NEURONS, neuron("n1", served.url, labels={"gpu": "t4"}))
        await kube.create(PLACEMENTS, placement("huge", "huge", resources={"memory": "8Gi"}))
        selector = {"matchLabels": {"gpu": "a100"}}
        await kube.create(PLACEMENTS, placement("picky", "picky", neuronSelector=selector))
        for name, why in (
            ("huge", "needs 8.0 GiB, more than any neuron it may use holds (4.0 GiB)"),
            ("picky", "gpu=a100"),
        ):
            scheduled = await until(
                lambda n=name: (c := kube.condition(n, "Scheduled")).get("status") == "False" and c,
                f"{name} to be reported unschedulable",
            )
            assert scheduled["reason"] == "Unschedulable"
            assert why in scheduled["message"]
            assert phase(kube, name) == "Pending"
        assert fake.loads == []


async def test_a_placement_naming_an_alias_is_refused_not_loaded_forever(
    kube: Kube, operator: Operator
) -> None:
    """The neuron loads an alias under the model's own id; the operator says so and stops."""
    fake = FakeNeuron("n1", available={"smollm2-135m": GiB}, aliases={"smol": "smollm2-135m"})
    async with running(fake.app) as served, operator():
        await kube.create(NEURONS, neuron("n1", served.url))
        await kube.create(PLACEMENTS, placement("smol", "smol"))
        scheduled = await until(
            lambda: (c := kube.condition("smol", "Scheduled")).get("status") == "False" and c,
            "the alias to be refused",
        )
        assert scheduled["reason"] == "Unschedulable"
        assert scheduled["message"] == (
            "spec.model smol is an alias of smollm2-135m: use smollm2-135m"
        )
        await probed_twice_more(kube)
        assert len(fake.loads) == 1
        assert phase(kube, "smol") == "Pending"
        assert "Unschedulable" in {e["reason"] for e in kube.events("smol")}


async def test_a_placement_sized_in_pebibytes_is_read_and_deleted(
    kube: Kube, operator: Operator
) -> None:
    fake = FakeNeuron("n1", available={"chat": GiB})
    async with running(fake.app) as served, operator():
        await kube.create(NEURONS, neuron("n1", served.url))
        await kube.create(PLACEMENTS, placement("big", "chat", resources={"memory": "1Pi"}))
        await until(
            lambda: "more than any neuron" in kube.condition("big", "Scheduled").get("message", ""),
            "big to be unschedulable",
        )
        await kube.delete(PLACEMENTS, "big")
        await until(lambda: kube.get(PLACEMENTS, "big") is None, "big to be gone")
        assert fake.loads == []


async def test_a_failed_load_is_reported_and_backed_off(kube: Kube, operator: Operator) -> None:
    fake = FakeNeuron("n1", available={"broken": GiB})
    fake.faults.load_error = "weights are corrupt"
    async with running(fake.app) as served, operator():
        await kube.create(NEURONS, neuron("n1", served.url))
        await kube.create(PLACEMENTS, placement("broken", "broken"))
        await until(lambda: phase(kube, "broken") == "Failed", "the placement to be Failed")
        loaded = kube.condition("broken", "Loaded")
        assert loaded["reason"] == "LoadFailed"
        assert "weights are corrupt" in loaded["message"]
        # kopf posts Events in the background: the status patch may land first.
        failed = await until(
            lambda: [e for e in kube.events("broken") if e["reason"] == "LoadFailed"],
            "the LoadFailed Event",
        )
        assert failed[0]["type"] == "Warning"
        # Several probes later, still one attempt: the next one waits out the 30 s backoff.
        await probed_twice_more(kube)
        assert loads_of(fake, "broken") == 1
        assert phase(kube, "broken") == "Failed"


async def test_a_failing_placement_evicts_nothing_until_a_load_succeeds(
    kube: Kube, operator: Operator
) -> None:
    fake = FakeNeuron("n1", memory=3 * GiB, available={"low": 2 * GiB})  # "high" never loads
    async with running(fake.app) as served, operator(retry_backoff=0.5):
        await kube.create(NEURONS, neuron("n1", served.url))
        await kube.create(PLACEMENTS, placement("low", "low", resources={"memory": "2Gi"}))
        await until(lambda: phase(kube, "low") == "Ready", "low to be Ready")
        high = placement("high", "high", priority=10, resources={"memory": "2Gi"})
        await kube.create(PLACEMENTS, high)
        await until(lambda: phase(kube, "high") == "Failed", "high to be Failed")
        # Its first attempt evicted low; past the backoff it waits for free room instead.
        await until(
            lambda: "evicts nothing" in kube.condition("high", "Scheduled").get("message", ""),
            "high to wait for free room",
        )
        await until(lambda: phase(kube, "low") == "Ready", "low to be Ready again")
        assert fake.unloads == ["low"]
        assert loads_of(fake, "high") == 1


async def test_an_edited_spec_is_tried_at_once_its_attempts_counted_afresh(
    kube: Kube, operator: Operator
) -> None:
    fake = FakeNeuron("n1", available={"broken": GiB})
    fake.faults.load_error = "weights are corrupt"
    async with running(fake.app) as served, operator():  # a 30 s backoff
        await kube.create(NEURONS, neuron("n1", served.url))
        await kube.create(PLACEMENTS, placement("broken", "broken", source="file:/bad"))
        await until(lambda: phase(kube, "broken") == "Failed", "the placement to be Failed")
        # A write that leaves the spec (an annotation, a status) keeps the backoff.
        await kube.patch(PLACEMENTS, "broken", {"metadata": {"annotations": {"note": "x"}}})
        await probed_twice_more(kube)
        assert loads_of(fake, "broken") == 1
        # An edited spec is the user's correction: tried at once, as a first attempt.
        await kube.patch(PLACEMENTS, "broken", {"spec": {"source": "file:/still-bad"}})
        failed = await until(
            lambda: [e["message"] for e in kube.events("broken") if e["reason"] == "LoadFailed"][
                1:
            ],
            "the edited spec's load to fail too",
        )
        assert failed == ["n1: weights are corrupt; next try in 30s"]  # not 60 s: a first attempt
        fake.faults.load_error = None
        await kube.patch(PLACEMENTS, "broken", {"spec": {"source": "file:/fixed"}})
        await until(lambda: phase(kube, "broken") == "Ready", "the corrected spec to load")
        assert [load.source for load in fake.loads] == [
            "file:/bad",
            "file:/still-bad",
            "file:/fixed",
        ]


def holds(fake: FakeNeuron, model: str, source: str | None = None) -> bool:
    """The fake neuron has `model` ready (from `source`, when given)."""
    held = fake.models.get(model)
    ready = held is not None and held.state == ModelState.READY
    return ready and held is not None and (source is None or held.source == source)


async def test_an_edited_source_loads_the_replacement_first_then_unloads_the_old_replica(
    kube: Kube, operator: Operator
) -> None:
    n1, n2 = FakeNeuron("n1", available={"chat": GiB}), FakeNeuron("n2", available={"chat": GiB})
    async with running(n1.app) as one, running(n2.app) as two, operator():
        await kube.create(NEURONS, neuron("n1", one.url, labels={"zone": "a"}))
        await kube.create(NEURONS, neuron("n2", two.url, labels={"zone": "b"}))
        selected = {"matchLabels": {"zone": "a"}}
        body = placement("chat", "chat", source="file:/v1", neuronSelector=selected)
        await kube.create(PLACEMENTS, body)
        await until(lambda: phase(kube, "chat") == "Ready", "chat to be Ready")
        assert holds(n1, "chat", "file:/v1")
        n2.faults.load_gate = asyncio.Event()
        await kube.patch(
            PLACEMENTS, "chat", {"spec": {"source": "file:/v2", "neuronSelector": None}}
        )
        await until(lambda: n2.loads, "the replacement's load")
        # While the replacement loads, the old replica serves: nothing is unloaded.
        await until(
            lambda: kube.condition("chat", "UpToDate").get("reason") == "Replacing",
            "the rollout in the status",
        )
        assert n1.unloads == [] and phase(kube, "chat") == "Ready"
        n2.faults.load_gate.set()
        await until(lambda: n1.unloads == ["chat"], "the old replica to be unloaded")
        assert holds(n2, "chat", "file:/v2") and n2.loads[0].source == "file:/v2"
        await until(
            lambda: kube.condition("chat", "UpToDate").get("reason") == "RolledOut",
            "the rollout to end",
        )
        reasons = await until(
            lambda: (
                [
                    e["message"]
                    for e in kube.events("chat")
                    if e["reason"] in ("Replacing", "Unloaded")
                ]
                if any(e["reason"] == "Unloaded" for e in kube.events("chat"))
                else None
            ),
            "the Replacing and Unloaded Events",
        )
        assert reasons == [
            "chat on n1: spec.source file:/v1 -> file:/v2; loading its replacement on n2 first",
            "chat unloaded from n1: replaced by a replica of the edited spec"
            " (spec.source file:/v1 -> file:/v2)",
        ]


async def test_an_edited_source_with_no_room_for_both_is_replaced_in_place(
    kube: Kube, operator: Operator
) -> None:
    fake = FakeNeuron("n1", memory=GiB, available={"chat": GiB})
    async with running(fake.app) as served, operator():
        await kube.create(NEURONS, neuron("n1", served.url))
        await kube.create(PLACEMENTS, placement("chat", "chat", source="file:/v1"))
        await until(lambda: phase(kube, "chat") == "Ready", "chat to be Ready")
        await kube.patch(PLACEMENTS, "chat", {"spec": {"source": "file:/v2"}})
        await until(lambda: holds(fake, "chat", "file:/v2"), "chat loaded from the new source")
        assert fake.unloads == ["chat"]
        await until(lambda: phase(kube, "chat") == "Ready", "chat to be Ready again")
        replacing = await until(
            lambda: [e["message"] for e in kube.events("chat") if e["reason"] == "Replacing"],
            "the Replacing Event",
        )
        assert replacing == [
            "chat on n1: spec.source file:/v1 -> file:/v2; no room for a replacement beside it:"
            " replaced in place (unloaded, then loaded)"
        ]


async def test_an_edited_selector_moves_the_replica_to_a_neuron_it_matches(
    kube: Kube, operator: Operator
) -> None:
    n1, n2 = FakeNeuron("n1", available={"chat": GiB}), FakeNeuron("n2", available={"chat": GiB})
    async with running(n1.app) as one, running(n2.app) as two, operator():
        await kube.create(NEURONS, neuron("n1", one.url, labels={"zone": "a"}))
        await kube.create(NEURONS, neuron("n2", two.url, labels={"zone": "b"}))
        body = placement("chat", "chat", neuronSelector={"matchLabels": {"zone": "a"}})
        await kube.create(PLACEMENTS, body)
        await until(lambda: phase(kube, "chat") == "Ready", "chat to be Ready")
        assert holds(n1, "chat")
        await kube.patch(
            PLACEMENTS, "chat", {"spec": {"neuronSelector": {"matchLabels": {"zone": "b"}}}}
        )
        await until(lambda: n1.unloads == ["chat"], "the replica on n1 to be unloaded")
        assert holds(n2, "chat")  # ready before the old one went
        await until(
            lambda: (
                [r["neuron"] for r in kube.status(PLACEMENTS, "chat").get("replicas", [])] == ["n2"]
            ),
            "the status to name n2 only",
        )


async def test_a_neuron_pod_becomes_a_neuron_owned_by_it(kube: Kube, operator: Operator) -> None:
    fake = FakeNeuron("gpu-node-1")
    async with running(fake.app) as served, operator():
        port = int(served.url.rsplit(":", 1)[1])
        pod: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "cortex-neuron-x7k2p",
                "labels": {
                    "app.kubernetes.io/name": "cortex",
                    "app.kubernetes.io/component": "neuron",
                },
            },
            "spec": {
                "nodeName": "gpu-node-1",
                "containers": [
                    {"name": "neuron", "ports": [{"name": "http", "containerPort": port}]}
                ],
            },
            "status": {"podIP": "127.0.0.1"},
        }
        created = await kube.create("v1/pods", pod)
        stray = {**pod, "metadata": {"name": "web", "labels": {"app": "web"}}}
        await kube.create("v1/pods", stray)
        made = await until(lambda: kube.get(NEURONS, "gpu-node-1"), "the Neuron for the pod")
        assert made["spec"]["endpoint"] == served.url
        assert made["spec"]["labels"] == {"kubernetes.io/hostname": "gpu-node-1"}
        owner = made["metadata"]["ownerReferences"][0]
        assert (owner["kind"], owner["name"], owner["uid"]) == (
            "Pod",
            "cortex-neuron-x7k2p",
            created["metadata"]["uid"],
        )
        await until(
            lambda: kube.status(NEURONS, "gpu-node-1").get("phase") == "Ready", "the Neuron Ready"
        )
        assert [key[2] for key in kube.cluster.objects if key[0].plural == "neurons"] == [
            "gpu-node-1"
        ]
        assert made["metadata"]["namespace"] == NS


def neuron_pod(name: str, node: str, port: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": {"app.kubernetes.io/name": "cortex", "app.kubernetes.io/component": "neuron"},
        },
        "spec": {
            "nodeName": node,
            "containers": [{"name": "neuron", "ports": [{"name": "http", "containerPort": port}]}],
        },
        "status": {"podIP": "127.0.0.1"},
    }


async def test_a_neuron_still_going_when_its_new_pod_comes_is_made_again_once_gone(
    kube: Kube, operator: Operator
) -> None:
    """A rollout: the old pod's Neuron is still terminating when the new pod is up; it is not
    patched (it goes anyway) but made again for the new pod once it is gone."""
    fake = FakeNeuron("gpu-node-1")
    async with running(fake.app) as served, operator():
        port = int(served.url.rsplit(":", 1)[1])
        await kube.create("v1/pods", neuron_pod("neuron-old", "gpu-node-1", port))
        await until(lambda: kube.get(NEURONS, "gpu-node-1"), "the Neuron for the old pod")
        # Something else holds its deletion for a while, as kopf's finalizer does.
        await kube.patch(NEURONS, "gpu-node-1", {"metadata": {"finalizers": ["test/hold"]}})
        await kube.delete(NEURONS, "gpu-node-1")
        await kube.delete("v1/pods", "neuron-old")
        new = await kube.create("v1/pods", neuron_pod("neuron-new", "gpu-node-1", port))
        await until(
            lambda: (
                (kube.get(NEURONS, "gpu-node-1") or {}).get("metadata", {}).get("deletionTimestamp")
            ),
            "the Neuron to be terminating",
        )
        await kube.patch(NEURONS, "gpu-node-1", {"metadata": {"finalizers": []}})

        def remade() -> bool:
            meta = (kube.get(NEURONS, "gpu-node-1") or {}).get("metadata", {})
            owners = [o["uid"] for o in meta.get("ownerReferences", [])]
            return not meta.get("deletionTimestamp") and owners == [new["metadata"]["uid"]]

        await until(remade, "the Neuron made again for the new pod")


@pytest.mark.parametrize("remembered", [True, False])
async def test_a_cordon_and_labels_outlive_the_neuron_pod(
    kube: Kube, operator: Operator, monkeypatch: pytest.MonkeyPatch, remembered: bool
) -> None:
    """A Neuron goes with its pod; the one made for the node's next pod (a rollout, a restart)
    is still cordoned, so a node being drained takes no new replicas meanwhile, and keeps the
    labels placements select it by (`kubectl label nr`, spec.labels). A pod that comes after
    CORDON_MEMORY (a node name reused) starts afresh."""
    if not remembered:
        monkeypatch.setattr(handlers, "CORDON_MEMORY", -1.0)
    fake = FakeNeuron("gpu-node-1")
    async with running(fake.app) as served, operator():
        port = int(served.url.rsplit(":", 1)[1])
        await kube.create("v1/pods", neuron_pod("neuron-old", "gpu-node-1", port))
        await until(lambda: kube.get(NEURONS, "gpu-node-1"), "the Neuron for the old pod")
        await kube.patch(
            NEURONS,
            "gpu-node-1",
            {
                "metadata": {"labels": {"gpu": "a100"}},  # kubectl label nr gpu-node-1 gpu=a100
                "spec": {"cordoned": True, "labels": {"zone": "eu-1"}},
            },
        )
        await until(
            lambda: kube.status(NEURONS, "gpu-node-1").get("phase") == "Cordoned", "Cordoned"
        )
        await kube.delete("v1/pods", "neuron-old")
        await kube.delete(NEURONS, "gpu-node-1")  # what the garbage collector does
        new = await kube.create("v1/pods", neuron_pod("neuron-new", "gpu-node-1", port))

        def remade() -> dict[str, Any] | None:
            made = kube.get(NEURONS, "gpu-node-1") or {}
            owners = [o["uid"] for o in made.get("metadata", {}).get("ownerReferences", [])]
            return made if owners == [new["metadata"]["uid"]] else None

        made = await until(remade, "the Neuron made for the new pod")
        assert bool(made["spec"].get("cordoned")) is remembered
        user = {"gpu": "a100"} if remembered else {}
        assert (
            made["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "cortex-operator"} | user
        )
        zone = {"zone": "eu-1"} if remembered else {}
        assert made["spec"]["labels"] == {"kubernetes.io/hostname": "gpu-node-1"} | zone


async def test_a_neuron_holds_no_finalizer_so_it_goes_after_the_operator(
    kube: Kube, operator: Operator
) -> None:
    """A `helm uninstall` stops the operator and deletes the Neurons (with their pods) at once:
    a Neuron the operator probes must not wait for it to come back. One still carrying an older
    operator's finalizer loses it at its next event."""
    fake = FakeNeuron("n1", available={"chat": GiB})
    async with running(fake.app) as served:
        old = neuron("old", served.url)
        old["metadata"]["finalizers"] = ["cortex.helexa.ai/finalizer"]
        await kube.create(NEURONS, old)
        async with operator():
            await kube.create(NEURONS, neuron("n1", served.url))
            await until(lambda: kube.status(NEURONS, "n1").get("phase") == "Ready", "n1 probed")
            await until(lambda: kube.status(NEURONS, "old").get("phase") == "Ready", "old probed")
            await until(
                lambda: not kube.get(NEURONS, "old")["metadata"].get("finalizers"),
                "the older operator's finalizer dropped",
            )
            assert not kube.get(NEURONS, "n1")["metadata"].get("finalizers")
        await kube.delete(NEURONS, "n1")
        assert kube.get(NEURONS, "n1") is None  # gone at once, with no operator running


async def test_of_peered_operators_one_acts_and_the_others_stand_by(
    kube: Kube, operator: Operator
) -> None:
    """The chart's operator.replicas > 1: peers at one priority would all pause (kopf's rule),
    so each draws its own; the highest acts, and only it probes and loads."""
    peering = {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "peers"}}
    await kube.create("kopf.dev/v1/kopfpeerings", peering)
    fake = FakeNeuron("n1", available={"chat": GiB})
    ports = free_port(), free_port()
    peered = {"peering": "peers", "standalone": False}
    async with (
        running(fake.app) as served,
        operator(metrics_port=ports[0], **peered),
        operator(metrics_port=ports[1], **peered),
    ):
        await until(
            lambda: len(kube.status("kopf.dev/v1/kopfpeerings", "peers")) == 2, "both peers"
        )
        await kube.create(NEURONS, neuron("n1", served.url))
        await kube.create(PLACEMENTS, placement("chat", "chat"))
        await until(lambda: phase(kube, "chat") == "Ready", "the placement to be Ready")
        probes = [await _probes(port) for port in ports]
    assert [load.model for load in fake.loads] == ["chat"]
    assert sorted(p > 0 for p in probes) == [False, True], probes  # the standby probed nothing


async def test_a_peer_outranked_stops_probing(kube: Kube, operator: Operator) -> None:
    """A peer acts while it leads; once a peer of higher priority is alive, kopf pauses it and
    its probe loop stops too (only the new leader writes the Neurons' status)."""
    peering = {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "peers"}}
    await kube.create("kopf.dev/v1/kopfpeerings", peering)
    fake = FakeNeuron("n1")
    low, high = free_port(), free_port()
    peered = {"peering": "peers", "standalone": False}
    async with running(fake.app) as served, operator(metrics_port=low, priority=1, **peered):
        await kube.create(NEURONS, neuron("n1", served.url))
        await until(lambda: kube.status(NEURONS, "n1").get("phase") == "Ready", "n1 probed")
        async with operator(metrics_port=high, priority=100, **peered):
            await until_async(lambda: _probed(high, 1), "the new leader's first probe", 15)
            before = await _probes(low)
            await until_async(lambda: _probed(high, 4), "the leader's next probes", 15)
            assert await _probes(low) == before  # the outranked peer asked nothing meanwhile


async def test_the_probe_loop_outlives_an_api_error(
    kube: Kube, operator: Operator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The API server away for a while (the peering object unreadable): probing resumes."""
    peering = {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "peers"}}
    await kube.create("kopf.dev/v1/kopfpeerings", peering)
    real = kube_module.peers
    failures = [TimeoutError("the API server is away")] * 3

    async def flaky(*args: Any, **kwargs: Any) -> Any:
        if failures:
            raise failures.pop()
        return await real(*args, **kwargs)

    monkeypatch.setattr(kube_module, "peers", flaky)
    fake = FakeNeuron("n1")
    async with running(fake.app) as served, operator(peering="peers", standalone=False):
        await kube.create(NEURONS, neuron("n1", served.url))
        await until(lambda: kube.status(NEURONS, "n1").get("phase") == "Ready", "n1 probed")
    assert not failures


async def test_probing_goes_on_when_the_peering_object_is_deleted(
    kube: Kube, operator: Operator
) -> None:
    """kopf judges from the peering object's events: deleted under a running operator, it leaves
    kopf acting, and so the probes go on (a Neuron's status stays true)."""
    peering = {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "peers"}}
    await kube.create("kopf.dev/v1/kopfpeerings", peering)
    fake = FakeNeuron("n1")
    async with running(fake.app) as served, operator(peering="peers", standalone=False):
        await kube.create(NEURONS, neuron("n1", served.url))
        await until(lambda: kube.status(NEURONS, "n1").get("phase") == "Ready", "n1 probed")
        await kube.delete("kopf.dev/v1/kopfpeerings", "peers")
        fake.faults.unhealthy = True
        await until(lambda: kube.status(NEURONS, "n1").get("phase") == "Pending", "n1 Pending")


async def test_a_probe_in_flight_is_not_written_onto_a_neuron_made_again(
    kube: Kube, operator: Operator
) -> None:
    """A Neuron deleted and made again under its name (a new pod, a new address) while its old
    endpoint's probe is in flight: the new Neuron never shows the old neuron's answer, even when
    that answer comes before the new endpoint's (the deletion cancels the probe)."""
    old, new = FakeNeuron("old", loaded={"chat": GiB}), FakeNeuron("new")
    async with running(old.app) as a, running(new.app) as b, operator(probe_interval=1.0):
        await kube.create(NEURONS, neuron("n1", a.url))
        await until(lambda: kube.status(NEURONS, "n1").get("models"), "n1 Ready with chat")
        gate = asyncio.Event()
        old.faults.status_gate = gate
        asked = old.status_calls
        await until(lambda: old.status_calls > asked, "a probe of the old endpoint in flight")
        await kube.delete(NEURONS, "n1")
        mark = len(list(kube.cluster))  # the API calls so far
        new.faults.status_gate = held = asyncio.Event()
        await kube.create(NEURONS, neuron("n1", b.url))
        await until(lambda: new.status_calls > 0, "a probe of the new endpoint in flight")
        answered = old.status_answers
        gate.set()  # the old endpoint answers first
        await until(lambda: old.status_answers > answered, "the old endpoint's answer")
        held.set()
        await until(lambda: kube.status(NEURONS, "n1").get("endpoint") == b.url, "the new probed")
        probed = new.status_calls
        await until(lambda: new.status_calls >= probed + 2, "two more probes of the new one")
    written = [
        request.data["status"].get("endpoint")
        for request in list(kube.cluster)[mark:]
        if request.subresource == "status" and request.name == "n1"
    ]
    assert written and set(written) == {b.url}, written


async def _probed(port: int, times: int) -> bool:
    return await _probes(port) >= times


async def _probes(port: int) -> float:
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "cortex_operator_probes_total"
    )


async def test_a_replica_already_loaded_is_adopted_not_loaded_again(
    kube: Kube, operator: Operator
) -> None:
    """The operator plans from the neurons' own /status: what is loaded counts from the start."""
    fake = FakeNeuron("n1", available={"chat": GiB}, loaded={"chat": GiB})
    async with running(fake.app) as served:
        await kube.create(NEURONS, neuron("n1", served.url))
        await kube.create(PLACEMENTS, placement("chat", "chat"))
        async with operator():
            await until(lambda: phase(kube, "chat") == "Ready", "the placement to be Ready")
        assert fake.loads == []


# What the chart's Role and ClusterRole grant the operator (docs/kubernetes.md, Permissions).
GRANTED = {
    ("cortex.helexa.ai", "neurons"): {"get", "list", "watch", "create", "patch", "delete"},
    ("cortex.helexa.ai", "neurons/status"): {"get", "patch"},
    ("cortex.helexa.ai", "modelplacements"): {"get", "list", "watch", "patch"},
    ("cortex.helexa.ai", "modelplacements/status"): {"get", "patch"},
    ("", "pods"): {"get", "list", "watch"},
    ("", "events"): {"create"},
    ("kopf.dev", "kopfpeerings"): {"get", "list", "watch", "patch"},
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"},
    ("", "namespaces"): {"list", "watch"},
}
VERBS = {"LIST": "list", "WATCH": "watch", "FETCH": "get", "CREATE": "create", "DELETE": "delete"}


async def test_the_operator_needs_no_permission_beyond_what_the_chart_grants(
    kube: Kube, operator: Operator
) -> None:
    """Every API call of a peered operator through its whole life, as (group, resource, verb)."""
    peering = {
        "apiVersion": "kopf.dev/v1",
        "kind": "KopfPeering",
        "metadata": {"name": "cortex-operator"},
    }
    await kube.create("kopf.dev/v1/kopfpeerings", peering)
    fake = FakeNeuron("n1", available={"chat": GiB})
    async with running(fake.app) as served, operator(peering="cortex-operator", standalone=False):
        await kube.create(NEURONS, neuron("n1", served.url))
        await kube.create(PLACEMENTS, placement("chat", "chat"))
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "neuron-pod",
                "labels": {
                    "app.kubernetes.io/name": "cortex",
                    "app.kubernetes.io/component": "neuron",
                },
            },
            "spec": {"nodeName": "node-2"},
            "status": {"podIP": "127.0.0.1"},
        }
        await kube.create("v1/pods", pod)
        await until(lambda: phase(kube, "chat") == "Ready", "the placement to be Ready")
        await until(lambda: kube.get(NEURONS, "node-2"), "the pod's Neuron")
        await kube.delete(PLACEMENTS, "chat")
        await until(lambda: kube.get(PLACEMENTS, "chat") is None, "the placement to be gone")
    used: set[tuple[str, str, str]] = set()
    for request in kube.cluster:
        kopf = "kopf" in request.headers.get("User-Agent", "")
        if not kopf or request.resource is None or not request.resource.plural:
            continue  # ours, or discovery (open to every authenticated client)
        resource = request.resource.plural + (
            f"/{request.subresource}" if request.subresource else ""
        )
        action = request.action.value if request.action is not None else ""
        verb = VERBS.get(action, "patch" if request.method.value == "PATCH" else "update")
        used.add((request.resource.group, resource, verb))
    refused = {(g, r, v) for g, r, v in used if v not in GRANTED.get((g, r), set())}
    assert refused == set(), f"calls the chart's RBAC does not allow: {sorted(refused)}"
    assert ("kopf.dev", "kopfpeerings", "patch") in used  # it really ran as a peer
    assert ("cortex.helexa.ai", "neurons", "create") in used


async def test_the_operator_counts_what_it_asked_of_the_neurons(
    kube: Kube, operator: Operator
) -> None:
    """Its /metrics: loads, unloads by reason, probes and plans, as they happen."""
    fake = FakeNeuron("n1", memory=4 * GiB, available={"chat": 2 * GiB}, loaded={"stray": 3 * GiB})
    port = free_port()
    async with running(fake.app) as served, operator(metrics_port=port):
        await kube.create(NEURONS, neuron("n1", served.url))
        await kube.create(PLACEMENTS, placement("chat", "chat", resources={"memory": "2Gi"}))
        await until(lambda: phase(kube, "chat") == "Ready", "the placement to be Ready")
        await kube.delete(PLACEMENTS, "chat")
        await until(lambda: "chat" in fake.unloads, "the deleted placement's unload")
        async with httpx.AsyncClient() as http:
            text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("cortex_operator_loads_total", (("outcome", "ok"),))] == 1
    evicted = (("outcome", "ok"), ("reason", "evict"))
    assert samples[("cortex_operator_unloads_total", evicted)] == 1  # the stray model
    deleted = (("outcome", "ok"), ("reason", "delete"))
    assert samples[("cortex_operator_unloads_total", deleted)] == 1
    assert samples[("cortex_operator_probes_total", (("outcome", "ok"),))] >= 1
    assert samples[("cortex_operator_plan_duration_seconds_count", ())] >= 1
    assert samples[("cortex_operator_pending_loads", ())] == 0
