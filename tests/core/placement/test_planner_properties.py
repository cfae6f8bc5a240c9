"""Properties of the planner over random fleets: safety, memory, targets, idempotence."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from cortex.core.catalogue import ModelSpec
from cortex.core.fleet import ModelState
from cortex.core.placement.model import Demand, Load, NeuronView, Plan, Policy, ReplicaView, Unload
from cortex.core.placement.planner import _Work, apply_plan, plan

MODELS = [f"m{i}" for i in range(6)]
NEURONS = ["n0", "n1", "n2", "n3"]
NOW = 1_000.0
LIVE = {ModelState.READY, ModelState.LOADING}


@dataclass(frozen=True)
class Scenario:
    fleet: tuple[NeuronView, ...]
    catalogue: dict[str, ModelSpec]
    demand: tuple[Demand, ...]
    policy: Policy
    cycle: int
    minimums: dict[str, int]
    selectors: dict[str, dict[str, str]]

    def plan(self, fleet: tuple[NeuronView, ...] | None = None) -> Plan:
        return plan(
            self.fleet if fleet is None else fleet,
            self.catalogue,
            self.demand,
            self.policy,
            NOW,
            min_replicas=self.minimums,
            cycle=self.cycle,
            selectors=self.selectors,
        )


# The strategies are built once, here: built inside the composites below, each example paid for
# their construction and validation again (most of these tests' time). The draws are the same.
MEMORY, PRIORITY = st.integers(1, 6), st.integers(-2, 2)
IDLE_TTL = st.sampled_from([None, None, None, 10.0, 500.0])
PINNED_ON = st.lists(st.sampled_from(NEURONS), max_size=2, unique=True)
TOTAL, HOW_MANY, ORDER = st.integers(3, 10), st.integers(0, 6), st.permutations(MODELS)
TIMES = st.none() | st.floats(0, NOW)
STATES = st.sampled_from([ModelState.READY] * 5 + list(ModelState))
IN_FLIGHT = st.sampled_from([0, 0, 0, 1, 2])
HEALTHY, CORDONED = (
    st.sampled_from([True, True, True, False]),
    st.sampled_from([False] * 3 + [True]),
)
ZONE = st.sampled_from("ab")
NAMES = st.lists(st.sampled_from(NEURONS), min_size=1, unique=True)
WANTED = st.lists(st.sampled_from([*MODELS, *MODELS, "ghost"]), unique=True, max_size=4)
COUNT, POLICIES = st.integers(1, 3), st.sampled_from(["lru", "priority", "cost"])
HEADROOM, CYCLE = st.integers(0, 3), st.integers(0, 6)
MINIMUMS = st.dictionaries(st.sampled_from(MODELS), st.integers(0, 3), max_size=3)
SELECTORS = st.dictionaries(
    st.sampled_from(MODELS), st.fixed_dictionaries({"zone": ZONE}), max_size=2
)


@st.composite
def specs(draw: st.DrawFn, model: str, plain: bool) -> ModelSpec:
    return ModelSpec(
        id=model,
        source=f"file:/models/{model}",
        memory=draw(MEMORY),
        priority=draw(PRIORITY),
        idle_ttl=draw(IDLE_TTL),
        pinned_on=[] if plain else draw(PINNED_ON),
    )


@st.composite
def neurons(draw: st.DrawFn, name: str, catalogue: dict[str, ModelSpec], plain: bool) -> NeuronView:
    total = draw(TOTAL)
    replicas: list[ReplicaView] = []
    for model in draw(ORDER)[: draw(HOW_MANY)]:
        size = catalogue[model].memory or 0
        if sum(r.memory for r in replicas) + size > total:
            continue
        state = draw(STATES)
        in_flight = draw(IN_FLIGHT)
        if plain:
            state, in_flight = ModelState.READY, 0
        replicas.append(ReplicaView(model, state, size, in_flight, draw(TIMES), draw(TIMES)))
    used = sum(r.memory for r in replicas)
    overhead = draw(
        st.integers(0, total - used) | st.just(0)
    )  # memory the neuron uses beyond its replicas
    return NeuronView(
        name,
        total,
        total - used - overhead,
        tuple(replicas),
        healthy=plain or draw(HEALTHY),
        cordoned=not plain and draw(CORDONED),
        labels={"zone": draw(ZONE)},
    )


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    # Plain scenarios (no pins, all settled and idle, all healthy) put the eviction paths under
    # pressure; the others mix in every state.
    plain = draw(st.booleans())
    catalogue = {model: draw(specs(model, plain)) for model in MODELS}
    names = draw(NAMES)
    wanted = draw(WANTED)
    return Scenario(
        fleet=tuple(draw(neurons(name, catalogue, plain)) for name in names),
        catalogue=catalogue,
        demand=tuple(Demand(model, draw(COUNT)) for model in wanted),
        policy=Policy(draw(POLICIES), draw(HEADROOM)),
        cycle=draw(CYCLE),
        minimums=draw(MINIMUMS),
        selectors=draw(SELECTORS),
    )


def steps(s: Scenario, result: Plan) -> list[tuple[Load | Unload, tuple[NeuronView, ...]]]:
    """Each action with the fleet as it stands just before it."""
    out = []
    for i, action in enumerate(result.actions):
        out.append((action, apply_plan(s.fleet, Plan(result.actions[:i], {}), NOW)))
    return out


def replica(fleet: tuple[NeuronView, ...], neuron: str, model: str) -> ReplicaView | None:
    view = next(v for v in fleet if v.name == neuron)
    return next((r for r in view.replicas if r.model == model), None)


SETTINGS = settings(max_examples=300, deadline=None)


@SETTINGS
@given(scenarios())
def test_never_unloads_pinned_busy_unsettled_or_demanded_replicas(s: Scenario) -> None:
    demanded = {d.model for d in s.demand}
    for action, before in steps(s, s.plan()):
        if isinstance(action, Unload):
            gone = replica(before, action.neuron, action.model)
            assert gone is not None and gone.state == ModelState.READY and gone.in_flight == 0
            assert action.neuron not in s.catalogue[action.model].pinned_on
            assert action.model not in demanded


@SETTINGS
@given(scenarios())
def test_never_plans_a_neuron_beyond_its_memory(s: Scenario) -> None:
    result = s.plan()
    for i in range(len(result.actions) + 1):
        for view in apply_plan(s.fleet, Plan(result.actions[:i], {}), NOW):
            assert view.memory_free >= 0
            assert sum(r.memory for r in view.replicas) <= view.memory_total


@SETTINGS
@given(scenarios())
def test_loads_target_healthy_uncordoned_neurons_without_the_model(s: Scenario) -> None:
    for action, before in steps(s, s.plan()):
        if isinstance(action, Load):
            view = next(v for v in before if v.name == action.neuron)
            assert view.healthy and not view.cordoned
            present = replica(before, action.neuron, action.model)
            assert present is None or present.state == ModelState.FAILED
            pinned_here = action.neuron in s.catalogue[action.model].pinned_on
            selector = s.selectors.get(action.model, {})
            assert pinned_here or all(view.labels.get(k) == v for k, v in selector.items())


@SETTINGS
@given(scenarios())
def test_plan_is_deterministic_and_applying_it_leaves_nothing_to_do(s: Scenario) -> None:
    """Applying a plan leaves nothing to do, but for make-before-break: a replica kept for a
    minimum while this plan loads another (a pinned one, say) may go idle in the next plan, once
    the load has landed; that second plan is only such unloads, and then nothing is left."""
    first = s.plan()
    assert s.plan() == first
    after = apply_plan(s.fleet, first, NOW)
    second = s.plan(after).actions
    loaded = {a.model for a in first.actions if isinstance(a, Load)}
    for action in second:
        assert isinstance(action, Unload) and action.reason == "idle", second
        assert action.model in loaded and s.minimums.get(action.model, 0) > 0, second
    assert s.plan(apply_plan(after, Plan(second, {}), NOW)).actions == ()


@SETTINGS
@given(scenarios())
def test_every_demanded_model_is_served_or_explained(s: Scenario) -> None:
    result = s.plan()
    after = apply_plan(s.fleet, result, NOW)
    for d in s.demand:
        live = any(
            v.healthy and r.model == d.model and r.state in LIVE for v in after for r in v.replicas
        )
        assert live or result.unplaceable.get(d.model)


@SETTINGS
@given(scenarios(), st.data())
def test_defrag_finds_the_best_fit_home_a_scan_of_the_fleet_would(
    s: Scenario, data: st.DataObject
) -> None:
    """The home search walks `roomiest` from the tightest fit; a scan of every neuron (what it
    replaced) must agree, ties by name and bytes already promised to a neuron included."""
    work = _Work(s.fleet, s.catalogue, s.demand, s.policy, NOW, 0, None, s.selectors, None)
    source = data.draw(st.sampled_from(work.slots))
    moved = ReplicaView(
        data.draw(st.sampled_from(MODELS)), ModelState.READY, data.draw(st.integers(1, 6))
    )
    names = [slot.name for slot in work.slots]
    taken = data.draw(st.dictionaries(st.sampled_from(names), st.integers(1, 4), max_size=2))
    homes = [
        (slot.free - taken.get(slot.name, 0), slot.name)
        for slot in work.slots
        if slot.free - taken.get(slot.name, 0) >= moved.memory
        and slot is not source
        and work.usable(slot, moved.model)
        and not slot.hosts(moved.model)
    ]
    found = work.best_fit_home(moved, source, taken)
    assert (found.name if found else None) == (min(homes)[1] if homes else None)
