"""The pure snapshot: neuron /status answers plus a caller's reservations, as planner views."""

from __future__ import annotations

from cortex.core.catalogue import ModelSpec
from cortex.core.fleet import DeviceStatus, LoadedModel, ModelState, NeuronStatus
from cortex.core.placement.model import Demand, Load, Policy, ReplicaView, Unload, Usage
from cortex.core.placement.planner import plan
from cortex.core.placement.snapshot import NeuronReport, Reservations, snapshot

GIB = 2**30


def device(index: int, total: int, free: int, healthy: bool = True) -> DeviceStatus:
    return DeviceStatus(
        id=f"cuda-dev-{index}",
        index=index,
        kind="cuda",
        name="gpu",
        memory_total=total * GIB,
        memory_free=free * GIB,
        memory_used=(total - free) * GIB,
        healthy=healthy,
    )


def loaded(model: str, gib: int, **fields: object) -> LoadedModel:
    return LoadedModel(
        id=model,
        source=f"file:/models/{model}",
        state=fields.pop("state", ModelState.READY),
        memory_bytes=gib * GIB,
        **fields,
    )


def status(*models: LoadedModel, devices: list[DeviceStatus] | None = None) -> NeuronStatus:
    return NeuronStatus(
        node="n", version="test", devices=devices or [device(0, 16, 10)], models=list(models)
    )


def test_reported_replicas_become_views_with_the_callers_own_counts() -> None:
    report = NeuronReport(
        "n1",
        status(loaded("a", 4, in_flight=1, queued=1, last_used=50.0, loaded_at=10.0)),
        labels={"zone": "x"},
        in_flight={"a": 5},  # requests sent since the poll
        last_used={"a": 70.0},
        usage={"a": Usage(3.0, 70.0), "gone": Usage(1.0, 20.0)},
    )
    [view] = snapshot([report])
    assert view.name == "n1" and view.labels == {"zone": "x"}
    assert (view.memory_total, view.memory_free) == (16 * GIB, 10 * GIB)
    expected = ReplicaView("a", ModelState.READY, 4 * GIB, 5, 70.0, 10.0, Usage(3.0, 70.0))
    assert view.replicas == (expected,)
    quiet = NeuronReport("n1", report.status, in_flight={"a": 0})
    assert snapshot([quiet])[0].replicas[0].in_flight == 2  # reported in flight plus queued


def test_an_arriving_load_holds_its_memory_until_the_neuron_reports_it() -> None:
    reserved = Reservations().reserve([Load("b", "n1", 3 * GIB)])
    [view] = snapshot([NeuronReport("n1", status())], reserved)
    assert view.replicas == (ReplicaView("b", ModelState.LOADING, 3 * GIB),)
    assert view.memory_free == 7 * GIB
    # Once reported, the neuron's own free memory already counts it: never twice.
    reported = status(loaded("b", 3, state=ModelState.LOADING), devices=[device(0, 16, 7)])
    [view] = snapshot([NeuronReport("n1", reported)], reserved)
    assert [r.model for r in view.replicas] == ["b"] and view.memory_free == 7 * GIB


def test_a_leaving_replica_shows_as_unloading_only_on_its_neuron() -> None:
    reserved = Reservations().reserve([Unload("a", "n1", "evict")])
    reports = [NeuronReport(name, status(loaded("a", 4))) for name in ("n1", "n2")]
    views = snapshot(reports, reserved)
    assert [v.replicas[0].state for v in views] == [ModelState.UNLOADING, ModelState.READY]


def test_unanswered_neurons_are_left_out_and_health_takes_both_verdicts() -> None:
    sick = NeuronStatus(node="n", version="t", healthy=False, devices=[device(0, 8, 8)])
    half = status(devices=[device(0, 8, 8), device(1, 8, 8, healthy=False)])
    reports = [
        NeuronReport("silent", None),
        NeuronReport("sick", sick),
        NeuronReport("failing", half, healthy=False, cordoned=True),
        NeuronReport("half", half),
    ]
    views = snapshot(reports)
    assert [v.name for v in views] == ["sick", "failing", "half"]
    assert [v.healthy for v in views] == [False, False, True]
    assert views[1].cordoned
    assert (views[2].memory_total, views[2].memory_free) == (16 * GIB, 8 * GIB)


def test_reservations_are_values() -> None:
    empty = Reservations()
    one = empty.reserve([Load("a", "n1", GIB), Unload("b", "n2", "idle")])
    assert empty == Reservations() and one.arriving_on("n1") == {"a": GIB}
    assert one.is_leaving("n2", "b") and not one.is_leaving("n1", "b")
    assert one.release("n1", "a").release("n2", "b") == empty
    assert one.release("n9", "a") is one


def test_a_plan_on_the_snapshot_does_not_double_book_a_reserved_load() -> None:
    catalogue = {m: ModelSpec(id=m, source=f"file:/{m}", memory=6 * GIB) for m in ("a", "b")}
    reports = [NeuronReport(n, status(devices=[device(0, 8, 8)])) for n in ("n1", "n2")]
    first = plan(snapshot(reports), catalogue, [Demand("a")], Policy(), 0.0)
    assert first.actions == (Load("a", "n1", 6 * GIB),)
    reserved = Reservations().reserve(first.actions)
    second = plan(snapshot(reports, reserved), catalogue, [Demand("b")], Policy(), 0.0)
    assert second.actions == (Load("b", "n2", 6 * GIB),)
    again = plan(snapshot(reports, reserved), catalogue, [Demand("a")], Policy(), 0.0)
    assert again.actions == ()  # the arriving replica counts: no second copy
