"""Sizes learnt from a neuron's refusal for room (operator/cortex/operator/shortfall.py), as plain
functions: the size the plan uses, when a refusal is planned again at once, what the status
says, and what drops a learnt size."""

from __future__ import annotations

from test_reconcile import GIB, NOW, answer, fleet, mp, nr, probe

from cortex.core.fleet import ModelState
from cortex.core.placement.model import Load, NeuronView, Unload
from cortex.operator.placement_status import placement_status
from cortex.operator.planning import plan_key
from cortex.operator.reconcile import LoadFailure, load_failure, plan_fleet
from cortex.operator.shortfall import (
    MAX_PLANS,
    LearntSize,
    largest_home,
    learn,
    learnt_sizes,
    replica_memory,
    spec_key,
)


def backoff(attempts: int) -> float:
    return 10.0 * 2 ** (attempts - 1)


def room_failure(attempts: int = 1) -> LoadFailure:
    return LoadFailure("a", "big needs 3 GiB, 1 GiB free", attempts, NOW - 1, NOW - 1, 3, True)


def test_a_refusal_that_says_a_larger_size_is_planned_again_at_once_a_few_times() -> None:
    first = load_failure(None, "a", "no room", 3, NOW, backoff, learnt=True)
    assert (first.attempts, first.retry_at, first.room) == (1, NOW, True)
    failure = first
    for _ in range(MAX_PLANS - 1):
        failure = load_failure(failure, "a", "no room", 3, NOW, backoff, learnt=True)
    assert (failure.attempts, failure.retry_at, failure.room) == (MAX_PLANS, NOW, True)
    # Then a refusal for room is a failed load like any other: backed off, evicting nothing.
    bounded = load_failure(failure, "a", "no room", 3, NOW, backoff, learnt=True)
    assert (bounded.retry_at, bounded.room) == (NOW + backoff(MAX_PLANS + 1), False)
    # A refusal that teaches nothing new (the plan knew the size) waits out its backoff.
    same = load_failure(None, "a", "no room", 3, NOW, backoff, learnt=False)
    assert (same.retry_at, same.room) == (NOW + 10.0, False)


def test_the_larger_of_the_spec_s_size_and_the_learnt_one_is_planned_with() -> None:
    unsized, sized = mp("big", "big"), mp("big", "big", resources={"memory": "2Gi"})
    assert learn(None, unsized, 3 * GIB) == LearntSize(3 * GIB, spec_key(unsized))
    # The neuron refuses below its own estimate whatever the spec says: the larger one wins.
    learnt = learn(None, sized, 3 * GIB)
    assert learnt is not None and replica_memory(sized, learnt) == 3 * GIB
    roomy = mp("big", "big", resources={"memory": "4Gi"})
    assert learn(None, roomy, 3 * GIB) is None  # no more than the spec said: nothing learnt
    assert replica_memory(roomy, LearntSize(3 * GIB, spec_key(roomy))) == 4 * GIB
    assert replica_memory(unsized, None) is None
    # Estimates differ by neuron: a smaller one teaches nothing, a larger one replaces it.
    known = LearntSize(3 * GIB, spec_key(unsized))
    assert learn(known, unsized, 2 * GIB) is None
    assert learn(known, unsized, 5 * GIB) == LearntSize(5 * GIB, spec_key(unsized))


def test_an_edited_source_or_resources_drops_the_learnt_size() -> None:
    asked = mp("big", "big", source="file:/w/v1")
    learnt = {"big": LearntSize(3 * GIB, spec_key(asked))}
    assert learnt_sizes(learnt, [asked]) == learnt
    assert learnt_sizes(learnt, [mp("big", "big", source="file:/w/v1", priority=5)]) == learnt
    assert learnt_sizes(learnt, [mp("big", "big", source="file:/w/v2")]) == {}
    devices = {"devices": 2}
    assert learnt_sizes(learnt, [mp("big", "big", source="file:/w/v1", resources=devices)]) == {}
    assert learnt_sizes(learnt, []) == {}  # the placement went


def test_a_learnt_size_evicts_a_cold_replica_a_broken_model_s_failure_does_not() -> None:
    probes = {"a": probe(answer("a", 4 * GIB, stray=(ModelState.READY, 3 * GIB)))}
    big = mp("big", "big")
    learnt = {"big": LearntSize(2 * GIB, spec_key(big))}
    # Unknown size: sent to the roomiest neuron on a guess, nothing evicted for it.
    assert plan_fleet(fleet([nr("a")], probes, [big]), NOW).plan.actions == (Load("big", "a", 0),)
    refused = fleet([nr("a")], probes, [big], failures={"big": room_failure()}, sizes=learnt)
    assert plan_fleet(refused, NOW).plan.actions == (
        Unload("stray", "a", "evict"),
        Load("big", "a", 2 * GIB),
    )
    broken = LoadFailure("a", "weights are corrupt", 1, NOW - 60, NOW - 30, 3)
    failing = fleet([nr("a")], probes, [big], failures={"big": broken}, sizes=learnt)
    planned = plan_fleet(failing, NOW)
    assert planned.plan.actions == ()
    assert "evicts nothing" in planned.plan.unplaceable["big"]


def test_a_learnt_size_places_the_model_where_it_fits() -> None:
    probes = {
        "a": probe(answer("a", 4 * GIB, other=(ModelState.READY, 3 * GIB))),
        "b": probe(answer("b", 4 * GIB)),
    }
    big = mp("big", "big")
    sizes = {"big": LearntSize(3 * GIB, spec_key(big))}
    placements = [mp("other", "other"), big]
    failures = {"big": room_failure()}
    refused = fleet([nr("a"), nr("b")], probes, placements, failures=failures, sizes=sizes)
    assert plan_fleet(refused, NOW).plan.actions == (Load("big", "b", 3 * GIB),)


def test_a_refusal_for_room_is_no_failed_model_in_the_status() -> None:
    probes = {"a": probe(answer("a", 4 * GIB, stray=(ModelState.READY, 3 * GIB)))}
    big = mp("big", "big")
    learnt = {"big": LearntSize(2 * GIB, spec_key(big))}
    refused = fleet([nr("a")], probes, [big], failures={"big": room_failure()}, sizes=learnt)
    status = placement_status(big, refused, plan_fleet(refused, NOW), NOW)
    loaded = status.condition("Loaded")
    assert status.phase == "Pending"
    assert loaded is not None and loaded.reason == "NoRoom"
    assert loaded.message == (
        "a refused it for room: big needs 3 GiB, 1 GiB free; planned again with its size"
    )


def test_a_model_bigger_than_every_neuron_is_unschedulable_and_not_loaded() -> None:
    probes = {"a": probe(answer("a", 4 * GIB)), "b": probe(answer("b", 6 * GIB))}
    huge = mp("huge", "huge")
    learnt = {"huge": LearntSize(8 * GIB, spec_key(huge))}
    state = fleet(
        [nr("a"), nr("b")], probes, [huge], failures={"huge": room_failure()}, sizes=learnt
    )
    planned = plan_fleet(state, NOW)
    assert planned.plan.actions == ()
    scheduled = placement_status(huge, state, planned, NOW).condition("Scheduled")
    assert scheduled is not None and scheduled.reason == "Unschedulable"
    assert scheduled.message == (
        "0 of 1 replicas placed: needs 8.0 GiB, more than any neuron it may use holds (6.0 GiB)"
    )


def test_the_largest_home_is_of_the_neurons_the_placement_may_use() -> None:
    views = [
        NeuronView("a", 4 * GIB, 4 * GIB, labels={"gpu": "t4"}),
        NeuronView("b", 16 * GIB, 16 * GIB, labels={"gpu": "a100"}),
        NeuronView("c", 32 * GIB, 32 * GIB, healthy=False),
        NeuronView("d", 64 * GIB, 64 * GIB, cordoned=True),
    ]
    assert largest_home(views, mp("m", "m")) == 16 * GIB
    picky = mp("m", "m", neuronSelector={"matchLabels": {"gpu": "t4"}})
    assert largest_home(views, picky) == 4 * GIB
    assert largest_home([], picky) == 0


def test_a_learnt_size_calls_for_a_new_plan() -> None:
    probes = {"a": probe(answer("a"))}
    big = mp("big", "big")
    before = fleet([nr("a")], probes, [big], failures={"big": room_failure()})
    after = fleet(
        [nr("a")], probes, [big], failures={"big": room_failure()},
        sizes={"big": LearntSize(2 * GIB, spec_key(big))},
    )  # fmt: skip
    assert plan_key(before, NOW) != plan_key(after, NOW)
