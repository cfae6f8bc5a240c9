"""The operator's decisions as plain functions, without kopf: snapshot -> plan -> status."""

from __future__ import annotations

from typing import Any

from cortex.core.fleet import DeviceStatus, LoadedModel, ModelState, NeuronStatus
from cortex.core.placement.model import Load, Unload
from cortex.core.resources import (
    DEMAND_ANNOTATION,
    ModelPlacement,
    Neuron,
    PlacementDemand,
    rfc3339,
)
from cortex.operator.conditions import set_condition
from cortex.operator.config import OperatorConfig, parse_selector
from cortex.operator.neurons import Probe, neuron_drift, neuron_for_pod, neuron_status, quantity
from cortex.operator.placement_status import placement_status
from cortex.operator.reconcile import (
    DEMAND_TTL,
    Fleet,
    LoadFailure,
    PendingLoad,
    active_demand,
    outdated_failures,
    plan_fleet,
    settled_failures,
    unanswered,
    unprobed,
)

GIB = 2**30
NOW = 1_800_000_000.0


def answer(node: str, total: int = 8 * GIB, **models: tuple[ModelState, int]) -> NeuronStatus:
    used = sum(memory for _, memory in models.values())
    device = DeviceStatus(
        id="cuda-dev-0", index=0, kind="cuda", name="H100", memory_total=total,
        memory_free=total - used, memory_used=used,
    )  # fmt: skip
    loaded = [
        LoadedModel(id=m, source="", state=state, memory_bytes=memory, loaded_at=NOW - 10)
        for m, (state, memory) in models.items()
    ]
    return NeuronStatus(node=node, version="1", devices=[device], models=loaded)


def nr(name: str, **spec: Any) -> Neuron:
    return Neuron.model_validate(
        {"metadata": {"name": name}, "spec": {"endpoint": f"http://{name}:13131", **spec}}
    )


def mp(name: str, model: str, status: dict[str, Any] | None = None, **spec: Any) -> ModelPlacement:
    meta: dict[str, Any] = {"name": name, "generation": 3}
    if "annotations" in spec:
        meta["annotations"] = spec.pop("annotations")
    body = {"metadata": meta, "spec": {"model": model, **spec}}
    if status is not None:
        body["status"] = status
    return ModelPlacement.model_validate(body)


def fleet(
    neurons: list[Neuron], probes: dict[str, Probe], placements: list[ModelPlacement], **rest: Any
) -> Fleet:
    return Fleet(tuple(neurons), probes, tuple(placements), **rest)


def probe(status: NeuronStatus | None, failures: int = 0) -> Probe:
    return Probe(
        "http://x:13131",
        NOW,
        status=status,
        failures=failures,
        error="refused" if failures else None,
    )


def test_planning_waits_until_every_neuron_answered_once() -> None:
    placements = [mp("chat", "chat")]
    waiting = fleet([nr("a"), nr("b")], {"a": probe(answer("a"))}, placements)
    assert unprobed(waiting) == ["b"]
    ready = fleet([nr("a"), nr("b")], {"a": probe(answer("a")), "b": probe(None, 1)}, placements)
    assert unprobed(ready) == []


def test_a_deletion_waits_for_neurons_that_have_not_answered_unless_unreachable() -> None:
    neurons = [nr("new"), nr("failed-once"), nr("down"), nr("up"), nr("away", endpoint=None)]
    probes = {"failed-once": probe(None, 1), "down": probe(None, 2), "up": probe(answer("up"))}
    assert unanswered(fleet(neurons, probes, [])) == ["failed-once", "new"]


def test_a_replica_already_on_a_neuron_is_counted_not_loaded_again() -> None:
    probes = {"a": probe(answer("a", chat=(ModelState.READY, GIB))), "b": probe(answer("b"))}
    planned = plan_fleet(fleet([nr("a"), nr("b")], probes, [mp("chat", "chat")]), NOW)
    assert planned.plan.actions == ()


def test_a_pending_load_is_not_asked_for_twice() -> None:
    probes = {"a": probe(answer("a"))}
    pending = {("chat", "a"): PendingLoad("chat", "a", GIB, NOW)}
    state = fleet([nr("a")], probes, [mp("chat", "chat")], pending=pending)
    assert plan_fleet(state, NOW).plan.actions == ()
    status = placement_status(mp("chat", "chat"), state, plan_fleet(state, NOW), NOW)
    assert (status.phase, [r.state for r in status.replicas]) == ("Loading", ["loading"])


def test_an_unreachable_neuron_s_replica_is_placed_elsewhere_and_left_out() -> None:
    probes = {
        "a": probe(answer("a", chat=(ModelState.READY, GIB)), failures=2),
        "b": probe(answer("b")),
    }
    state = fleet([nr("a"), nr("b")], probes, [mp("chat", "chat")])
    planned = plan_fleet(state, NOW)
    assert planned.plan.actions == (Load("chat", "b", GIB),)  # the size seen on the lost one
    assert placement_status(mp("chat", "chat"), state, planned, NOW).replicas == []


def test_one_failed_probe_keeps_the_neuron_and_its_replicas() -> None:
    probes = {"a": probe(answer("a", chat=(ModelState.READY, GIB)), failures=1)}
    state = fleet([nr("a")], probes, [mp("chat", "chat")])
    assert plan_fleet(state, NOW).plan.actions == ()
    assert placement_status(mp("chat", "chat"), state, plan_fleet(state, NOW), NOW).phase == "Ready"


def test_a_failed_placement_asks_for_nothing_until_its_backoff_ends() -> None:
    failure = LoadFailure("a", "weights are corrupt", 2, NOW - 1, NOW + 20, 3)
    state = fleet(
        [nr("a")], {"a": probe(answer("a"))}, [mp("bad", "bad")], failures={"bad": failure}
    )
    planned = plan_fleet(state, NOW)
    assert planned.plan.actions == () and planned.blocked == {"bad"}
    status = placement_status(mp("bad", "bad"), state, planned, NOW)
    loaded = status.condition("Loaded")
    assert status.phase == "Failed"
    assert loaded is not None and loaded.reason == "LoadFailed"
    assert "weights are corrupt" in loaded.message and "attempt 2" in loaded.message
    assert plan_fleet(state, NOW + 21).plan.actions == (Load("bad", "a", 0),)  # then it retries


def test_a_failure_past_its_backoff_is_dropped_once_nothing_is_wanted() -> None:
    """A min-0 placement nobody waits for is Idle once its backoff is over, not Failed forever."""
    failure = LoadFailure("a", "weights are corrupt", 1, NOW - 60, NOW - 30, 3)
    lazy = mp("lazy", "lazy", replicas={"min": 0, "max": 1})
    state = fleet([nr("a")], {"a": probe(answer("a"))}, [lazy], failures={"lazy": failure})
    planned = plan_fleet(state, NOW)
    assert placement_status(lazy, state, planned, NOW).phase == "Idle"
    assert settled_failures(state, planned, NOW) == ["lazy"]
    waiting = plan_fleet(state, NOW - 31)  # still backing off: kept, and reported
    assert settled_failures(state, waiting, NOW - 31) == []
    assert placement_status(lazy, state, waiting, NOW - 31).phase == "Failed"
    wanting = fleet([nr("a")], state.probes, [mp("bad", "bad")], failures={"bad": failure})
    assert settled_failures(wanting, plan_fleet(wanting, NOW), NOW) == []  # it retries


def test_unschedulable_names_the_selector_that_matched_nothing() -> None:
    placement = mp("picky", "picky", neuronSelector={"matchLabels": {"gpu": "a100"}})
    state = fleet([nr("a", labels={"gpu": "t4"})], {"a": probe(answer("a"))}, [placement])
    status = placement_status(placement, state, plan_fleet(state, NOW), NOW)
    scheduled = status.condition("Scheduled")
    assert status.phase == "Pending"
    assert scheduled is not None and scheduled.reason == "Unschedulable"
    assert "gpu=a100" in scheduled.message


def test_labels_of_metadata_and_spec_both_match_a_selector() -> None:
    neuron = Neuron.model_validate(
        {
            "metadata": {"name": "a", "labels": {"zone": "eu"}},
            "spec": {"endpoint": "http://a", "labels": {"gpu": "a100"}},
        }
    )
    placement = mp("p", "p", neuronSelector={"matchLabels": {"gpu": "a100", "zone": "eu"}})
    planned = plan_fleet(fleet([neuron], {"a": probe(answer("a"))}, [placement]), NOW)
    assert planned.plan.actions == (Load("p", "a", 0),)


def test_two_placements_of_one_model_the_second_is_refused() -> None:
    first, second = mp("a-chat", "chat"), mp("b-chat", "chat")
    state = fleet(
        [nr("n")], {"n": probe(answer("n", chat=(ModelState.READY, GIB)))}, [first, second]
    )
    scheduled = placement_status(second, state, plan_fleet(state, NOW), NOW).condition("Scheduled")
    assert scheduled is not None and "placed by ModelPlacement a-chat" in scheduled.message


def test_of_two_placements_of_one_model_the_older_places_it_whatever_its_name() -> None:
    older, newer = mp("z-chat", "chat"), mp("a-chat", "chat")
    older.metadata.creation_timestamp = rfc3339(NOW - 60)
    newer.metadata.creation_timestamp = rfc3339(NOW)
    state = fleet([nr("n")], {"n": probe(answer("n"))}, [newer, older])
    assert state.owner("chat") == "z-chat" and state.owners["chat"] is older
    status = placement_status(newer, state, plan_fleet(state, NOW), NOW)
    assert (status.phase, status.replicas, status.ready_replicas) == ("Refused", [], 0)


def test_demand_counts_until_a_ready_transition_after_it() -> None:
    at = rfc3339(NOW)
    demanded = {"annotations": PlacementDemand(at=at, waiting=2).annotation()}
    assert active_demand(mp("m", "m", **dict(demanded)), NOW) is not None
    loaded_before = {"conditions": [_condition("Loaded", "True", NOW - 60)]}
    assert active_demand(mp("m", "m", status=loaded_before, **dict(demanded)), NOW) is not None
    loaded_after = {"conditions": [_condition("Loaded", "True", NOW + 5)]}
    assert active_demand(mp("m", "m", status=loaded_after, **dict(demanded)), NOW) is None
    garbage = {"annotations": {DEMAND_ANNOTATION: "soon"}}
    assert active_demand(mp("m", "m", **garbage), NOW) is None


def test_a_demand_nobody_renews_expires() -> None:
    """Gateways renew a demand while clients wait; an old one has nobody waiting for it."""
    stale = PlacementDemand(at=rfc3339(NOW - DEMAND_TTL - 1)).annotation()
    placement = mp("m", "m", replicas={"min": 0, "max": 1}, annotations=stale)
    state = fleet([nr("a")], {"a": probe(answer("a"))}, [placement])
    assert plan_fleet(state, NOW).plan.actions == ()
    assert placement_status(placement, state, plan_fleet(state, NOW), NOW).phase == "Idle"
    assert plan_fleet(state, NOW - 2).plan.actions == (Load("m", "a", 0),)  # younger then


def test_min_zero_is_idle_and_demand_makes_it_want_one() -> None:
    idle = mp("m", "m", replicas={"min": 0, "max": 1})
    state = fleet([nr("a")], {"a": probe(answer("a"))}, [idle])
    assert placement_status(idle, state, plan_fleet(state, NOW), NOW).phase == "Idle"
    demanded = mp(
        "m",
        "m",
        replicas={"min": 0, "max": 1},
        annotations=PlacementDemand(at=rfc3339(NOW)).annotation(),
    )
    state = fleet([nr("a")], {"a": probe(answer("a"))}, [demanded])
    assert plan_fleet(state, NOW).plan.actions == (Load("m", "a", 0),)


def test_status_keeps_since_and_transition_times_while_nothing_changes() -> None:
    probes = {"a": probe(answer("a", chat=(ModelState.READY, GIB)))}
    state = fleet([nr("a")], probes, [mp("chat", "chat")])
    first = placement_status(mp("chat", "chat"), state, plan_fleet(state, NOW), NOW)
    later = mp("chat", "chat", status=first.wire())
    second = placement_status(later, state, plan_fleet(state, NOW + 100), NOW + 100)
    assert second.wire() == first.wire()
    assert (first.phase, first.ready_replicas, first.observed_generation) == ("Ready", 1, 3)


def test_neuron_status_from_a_probe_and_after_losing_it() -> None:
    neuron = nr("a")
    ok = neuron_status(neuron, probe(answer("a", chat=(ModelState.READY, 2 * GIB))), 2, NOW)
    assert (ok.phase, ok.memory_free, [m.model for m in ok.models]) == ("Ready", "6Gi", ["chat"])
    with_status = Neuron.model_validate({**neuron.model_dump(by_alias=True), "status": ok.wire()})
    wobbly = neuron_status(
        with_status, probe(answer("a", chat=(ModelState.READY, GIB)), failures=1), 2, NOW
    )
    reachable = next(c for c in wobbly.conditions if c.type == "Reachable")
    assert (wobbly.phase, reachable.status) == ("Ready", "Unknown")
    lost = neuron_status(with_status, probe(answer("a"), failures=2), 2, NOW + 1)
    reachable = next(c for c in lost.conditions if c.type == "Reachable")
    assert (lost.phase, lost.models, reachable.reason) == ("Unreachable", [], "ProbeFailed")
    assert neuron_status(nr("a", cordoned=True), probe(answer("a")), 2, NOW).phase == "Cordoned"
    assert neuron_status(nr("a"), None, 2, NOW).phase == "Pending"


def test_a_neuron_pod_maps_to_a_neuron_named_after_its_node() -> None:
    pod = {
        "metadata": {"name": "neuron-x", "namespace": "cortex", "uid": "u1"},
        "spec": {
            "nodeName": "gpu-1",
            "containers": [{"ports": [{"name": "http", "containerPort": 9000}]}],
        },
        "status": {"podIP": "10.0.0.7"},
    }
    wanted = neuron_for_pod(pod, 13131)
    assert wanted is not None
    assert wanted["metadata"]["name"] == "gpu-1"
    assert wanted["spec"] == {
        "endpoint": "http://10.0.0.7:9000",
        "labels": {"kubernetes.io/hostname": "gpu-1"},
    }
    assert wanted["metadata"]["ownerReferences"][0]["uid"] == "u1"
    existing = Neuron.model_validate(
        {**wanted, "spec": {**wanted["spec"], "endpoint": "http://10.0.0.6:9000"}}
    )
    assert neuron_drift(existing, wanted) == {"spec": {"endpoint": "http://10.0.0.7:9000"}}
    assert neuron_drift(Neuron.model_validate(wanted), wanted) is None
    unscheduled = {**pod, "spec": {}}
    assert neuron_for_pod(unscheduled, 13131) is None
    assert neuron_for_pod({**pod, "status": {}}, 13131) is None


def test_conditions_move_their_transition_time_only_on_a_status_change() -> None:
    first = set_condition([], "Loaded", "False", "Loading", "0 of 1", NOW)
    same = set_condition(first, "Loaded", "False", "Loading", "still 0 of 1", NOW + 10)
    flipped = set_condition(same, "Loaded", "True", "Loaded", "1 ready", NOW + 20)
    assert same[0].last_transition_time == rfc3339(NOW)
    assert flipped[0].last_transition_time == rfc3339(NOW + 20)


def test_flags_parse_into_a_config() -> None:
    assert parse_selector("a=b, c==d") == {"a": "b", "c": "d"}
    assert OperatorConfig(retry_backoff=10, retry_backoff_max=60).backoff(1) == 10
    assert OperatorConfig(retry_backoff=10, retry_backoff_max=60).backoff(4) == 60
    assert quantity(3 * GIB // 2) == "1.5Gi" and quantity(512) == "512"


def _condition(kind: str, status: str, at: float) -> dict[str, Any]:
    return {
        "type": kind,
        "status": status,
        "reason": "Loaded",
        "message": "",
        "lastTransitionTime": rfc3339(at),
    }


def test_a_replica_above_max_goes_the_least_recently_used_first() -> None:
    busy = LoadedModel(id="chat", source="", state=ModelState.READY, memory_bytes=GIB, in_flight=1)
    old = LoadedModel(
        id="chat", source="", state=ModelState.READY, memory_bytes=GIB, last_used=NOW - 100
    )
    new = LoadedModel(
        id="chat", source="", state=ModelState.READY, memory_bytes=GIB, last_used=NOW - 1
    )
    probes = {}
    for name, replica in (("a", busy), ("b", old), ("c", new)):
        status = answer(name)
        probes[name] = probe(status.model_copy(update={"models": [replica]}))
    placement = mp("chat", "chat", replicas={"min": 1, "max": 2})
    planned = plan_fleet(fleet([nr("a"), nr("b"), nr("c")], probes, [placement]), NOW)
    assert planned.plan.actions == ()
    assert planned.excess == (Unload("chat", "b", "evict"),)
    within = mp("chat", "chat", replicas={"min": 1, "max": 3})
    assert plan_fleet(fleet([nr("a"), nr("b"), nr("c")], probes, [within]), NOW).excess == ()


def test_a_failure_holds_only_for_the_spec_it_was_asked_under() -> None:
    failure = LoadFailure("a", "no such source", 4, NOW - 1, NOW + 120, 3)
    asked = mp("bad", "bad")  # generation 3
    edited = asked.model_copy(
        update={"metadata": asked.metadata.model_copy(update={"generation": 4})}
    )
    assert outdated_failures({"bad": failure}, [asked]) == []
    assert outdated_failures({"bad": failure}, [edited]) == ["bad"]
    assert outdated_failures({"gone": failure}, [edited]) == []  # deleted: the finalizer's
