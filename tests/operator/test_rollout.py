"""Rolling a placement onto its edited spec (operator/cortex/operator/rollout.py), as plain
functions: a replica of an old spec.source, or on a neuron the selector no longer matches, is
replaced, beside it where there is free room, else in place."""

from __future__ import annotations

from typing import Any

from test_reconcile import GIB, NOW, fleet, mp, nr, probe

from cortex.core.fleet import DeviceStatus, LoadedModel, ModelState, NeuronStatus
from cortex.core.placement.model import Load, Unload
from cortex.operator.placement_status import placement_status
from cortex.operator.reconcile import LoadFailure, plan_fleet
from cortex.operator.rollout import Stale

READY, LOADING = ModelState.READY, ModelState.LOADING


def holding(node: str, total: int = 8 * GIB, **models: tuple[ModelState, int, str]) -> Any:
    """A probe of a neuron holding `models` (state, bytes, source)."""
    used = sum(memory for _, memory, _ in models.values())
    device = DeviceStatus(
        id="cuda-dev-0", index=0, kind="cuda", name="H100", memory_total=total,
        memory_free=total - used, memory_used=used,
    )  # fmt: skip
    loaded = [
        LoadedModel(id=m, source=src, state=state, memory_bytes=memory, loaded_at=NOW - 10)
        for m, (state, memory, src) in models.items()
    ]
    return probe(NeuronStatus(node=node, version="1", devices=[device], models=loaded))


NEW = mp("chat", "chat", source="file:/new", resources={"memory": "1Gi"})


def test_a_replacement_loads_beside_the_replica_of_the_old_source_first() -> None:
    probes = {"a": holding("a", chat=(READY, GIB, "file:/old")), "b": holding("b")}
    state = fleet([nr("a"), nr("b")], probes, [NEW])
    planned = plan_fleet(state, NOW)
    assert planned.plan.actions == (Load("chat", "b", GIB),)
    assert planned.rolling == () and planned.excess == ()  # the old one serves meanwhile
    assert planned.stale == (Stale("chat", "a", "spec.source file:/old -> file:/new", True),)
    status = placement_status(NEW, state, planned, NOW)
    rolling = status.condition("UpToDate")
    assert status.phase == "Ready" and rolling is not None
    assert (rolling.status, rolling.reason) == ("False", "Replacing")
    assert "a: spec.source file:/old -> file:/new" in rolling.message


def test_the_old_replica_goes_once_its_replacement_is_ready_not_before() -> None:
    old = holding("a", chat=(READY, GIB, "file:/old"))
    loading = fleet(
        [nr("a"), nr("b")], {"a": old, "b": holding("b", chat=(LOADING, GIB, "file:/new"))}, [NEW]
    )
    planned = plan_fleet(loading, NOW)
    assert planned.steps == ()
    ready = fleet(
        [nr("a"), nr("b")], {"a": old, "b": holding("b", chat=(READY, GIB, "file:/new"))}, [NEW]
    )
    assert plan_fleet(ready, NOW).steps == (Unload("chat", "a", "evict"),)


def test_with_no_room_for_both_the_replica_is_replaced_in_place_and_nothing_evicted() -> None:
    probes = {
        "a": holding("a", total=GIB, chat=(READY, GIB, "file:/old")),
        "b": holding("b", total=GIB, other=(READY, GIB, "file:/other")),  # evictable, priority 0
    }
    state = fleet(
        [nr("a"), nr("b")],
        probes,
        [NEW.model_copy(update={"spec": NEW.spec.model_copy(update={"priority": 5})})],
    )
    planned = plan_fleet(state, NOW)
    assert planned.steps == (Unload("chat", "a", "evict"), Load("chat", "a", GIB))


def test_a_replica_on_a_neuron_the_selector_left_moves_to_one_it_matches() -> None:
    picky = mp("chat", "chat", neuronSelector={"matchLabels": {"gpu": "a100"}})
    neurons = [nr("a", labels={"gpu": "t4"}), nr("b", labels={"gpu": "a100"})]
    before = fleet(
        neurons, {"a": holding("a", chat=(READY, GIB, "file:/x")), "b": holding("b")}, [picky]
    )
    planned = plan_fleet(before, NOW)
    assert planned.plan.actions == (Load("chat", "b", GIB),) and planned.rolling == ()
    assert planned.stale[0].why == "its neuron no longer matches spec.neuronSelector gpu=a100"
    probes = {
        "a": holding("a", chat=(READY, GIB, "file:/x")),
        "b": holding("b", chat=(READY, GIB, "file:/x")),
    }
    assert plan_fleet(fleet(neurons, probes, [picky]), NOW).steps == (Unload("chat", "a", "evict"),)


def test_a_new_spec_whose_load_failed_leaves_the_old_replica_serving() -> None:
    failure = LoadFailure("a", "no such file", 1, NOW - 60, NOW - 30, 3)  # its backoff is over
    probes = {"a": holding("a", total=GIB, chat=(READY, GIB, "file:/old"))}
    state = fleet([nr("a")], probes, [NEW], failures={"chat": failure})
    assert plan_fleet(state, NOW).steps == ()


def test_a_placement_without_a_source_takes_the_neuron_s_and_the_rollout_ends() -> None:
    plain = mp("chat", "chat")
    probes = {"a": holding("a", chat=(READY, GIB, "file:/any"))}
    state = fleet([nr("a")], probes, [plain])
    planned = plan_fleet(state, NOW)
    assert planned.stale == () and planned.steps == ()
    was_rolling = {"conditions": [{"type": "UpToDate", "status": "False", "reason": "Replacing",
                                   "message": "...", "lastTransitionTime": "2027-01-15T08:00:00Z"}]}  # fmt: skip
    status = placement_status(mp("chat", "chat", status=was_rolling), state, planned, NOW)
    done = status.condition("UpToDate")
    assert done is not None and (done.status, done.reason) == ("True", "RolledOut")
    assert placement_status(plain, state, planned, NOW).condition("UpToDate") is None
