"""Pure placement planner: fleet snapshot + catalogue + demand + policy + now -> actions.

Shared by the gateway's local placer, the operator and the simulator; its inputs and actions are
in model.py, the snapshot that feeds it in snapshot.py. It never does I/O, never reads
clocks and never sleeps: time is the `now` argument. Same input, same plan (ties break by name).

Rules, in the order they run:
- idle: a ready replica unused (last_used, else loaded_at) for longer than its model's idle_ttl is
  unloaded unless it is in flight, pinned there, demanded, or needed for a minimum replica count;
- pins: a model pinned on a healthy, uncordoned neuron and not there is loaded there;
- minimums: replicas are added on distinct neurons up to `min_replicas`, highest priority first;
- demand: a demanded model with no ready or loading replica is loaded, most waiting clients first
  (under `priority`, minimums and demand are taken together, highest priority first).
Placement is worst fit (most memory left after the load) on healthy, uncordoned neurons whose
labels match the model's selector. When nothing fits, defrag (on its cycles; under `cost`, on
every plan) moves the smallest idle replicas off one neuron into free memory elsewhere (a load
this plan made is simply sent elsewhere); otherwise replicas are evicted from one neuron
(eviction.py): under `lru` and `priority` the fewest, coldest first; under `cost` the set, on
whichever neuron, whose summed request rate (from each replica's `usage`: the cold loads per
second the eviction will cause) is least, ties going to the set that loses the fewest load
seconds per second (rate times the measured `load_seconds` of the model on that neuron, else
elsewhere). A model in `room_only` (the operator's: one whose last load failed) is placed only
into free memory: nothing is evicted or moved for it. Never evicted: pinned-there, in-flight, loading/unloading replicas,
replicas of demanded models, replicas loaded by this plan, and the last ones a minimum needs
(under the `priority` strategy a minimum holds only against models of equal or lower priority: a
higher-priority model may take a lower one below its minimum). A requirement that cannot be met
is reported in `Plan.unplaceable` with a reason; in `Plan.blocked` too when only replicas that will
settle (in flight, loading, unloading, demanded, or loaded by this plan) keep it out.
"""

from __future__ import annotations

import bisect
import itertools
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial

from cortex.core.catalogue import ModelSpec, readable_bytes
from cortex.core.fleet import ModelState
from cortex.core.placement.eviction import (
    EvictionKey,
    cheapest_victims,
    choose_victims,
    eviction_key,
    reload_worth,
    request_rate,
)
from cortex.core.placement.model import (
    Action,
    Demand,
    Load,
    NeuronView,
    Plan,
    Policy,
    ReplicaView,
    Unload,
    UnloadReason,
)


def plan(
    fleet: Sequence[NeuronView],
    catalogue: Mapping[str, ModelSpec],
    demand: Sequence[Demand],
    policy: Policy,
    now: float,
    *,
    min_replicas: Mapping[str, int] | None = None,
    cycle: int = 0,
    selectors: Mapping[str, Mapping[str, str]] | None = None,
    estimates: Mapping[str, int] | None = None,
    load_seconds: Mapping[tuple[str, str], float] | None = None,
    room_only: Collection[str] = (),
) -> Plan:
    """Decide what to load and unload so demanded, pinned and minimum replicas are placed.

    Order: idle unloads, then pins, then minimum replica counts, then demand (most waiting first;
    under `priority` minimums and demand interleave by priority).
    `load_seconds`: measured load time by (neuron, model), read by the `cost` strategy.
    `room_only`: models placed only into free memory, never evicted or moved for.
    """
    work = _Work(fleet, catalogue, demand, policy, now, cycle, min_replicas, selectors, estimates)
    work.load_seconds = load_seconds or {}
    work.room_only = frozenset(room_only)
    work.unload_idle()
    # A requirement met late (an eviction for a higher-priority pin, say) can free room one that
    # failed earlier now fits in: the passes run again until they add nothing, so the next plan
    # has nothing left to do. Each round that adds actions places a requirement for good (loads
    # of this plan are never evicted), so the rounds are at most the requirements.
    while True:
        done = len(work.actions)
        work.reasons.clear()  # the last round's failures are the plan's reasons
        work.blocked.clear()
        work.place_pins()
        work.place_requirements()
        if len(work.actions) == done:
            break
    return work.result()


def apply_plan(fleet: Sequence[NeuronView], planned: Plan, now: float) -> tuple[NeuronView, ...]:
    """The snapshot as it will be once every action has succeeded (simulation, tests)."""
    views = {view.name: view for view in fleet}
    for action in planned.actions:
        view = views[action.neuron]
        kept = tuple(r for r in view.replicas if r.model != action.model)
        if isinstance(action, Load):
            arrived = ReplicaView(action.model, ModelState.READY, action.memory, loaded_at=now)
            view = replace(
                view, replicas=(*kept, arrived), memory_free=view.memory_free - action.memory
            )
        else:
            gone = sum(r.memory for r in view.replicas if r.model == action.model)
            view = replace(view, replicas=kept, memory_free=view.memory_free + gone)
        views[action.neuron] = view
    return tuple(views[view.name] for view in fleet)


_LIVE = frozenset({ModelState.READY, ModelState.LOADING})
Coldness = tuple[EvictionKey, str]  # eviction key, then the model id for a stable order
_NONE: Coldness = ((), "")  # the coldness of no victim at all


# Requests per second lost, load seconds per second lost, victims, the hottest victim, neuron.
_VictimCost = tuple[float, float, int, Coldness, str]


@dataclass
class _Slot:
    """Working state of one neuron while a plan is built."""

    view: NeuronView
    free: int
    replicas: dict[str, ReplicaView]
    # Loaded by this plan and never undone in it (replicas moved by defrag are not: they are as
    # idle after the move as before, and as the next snapshot will show them).
    planned: set[str] = field(default_factory=set)

    @property
    def name(self) -> str:
        return self.view.name

    def hosts(self, model: str) -> bool:
        """The model is live here, or arriving, or leaving (a second copy would collide)."""
        replica = self.replicas.get(model)
        return replica is not None and replica.state != ModelState.FAILED


class _Work:
    """A plan under construction over a mutable copy of the snapshot."""

    def __init__(
        self,
        fleet: Sequence[NeuronView],
        catalogue: Mapping[str, ModelSpec],
        demand: Sequence[Demand],
        policy: Policy,
        now: float,
        cycle: int,
        min_replicas: Mapping[str, int] | None,
        selectors: Mapping[str, Mapping[str, str]] | None,
        estimates: Mapping[str, int] | None,
    ) -> None:
        self.slots = [
            _Slot(view, view.memory_free, {r.model: r for r in view.replicas})
            for view in sorted(fleet, key=lambda v: v.name)
        ]
        self.by_name = {slot.name: slot for slot in self.slots}
        # Slots roomiest first, kept in order as loads and unloads change their free memory: worst
        # fit then takes the first usable one instead of scanning the fleet for every load.
        self.roomiest = sorted(self.slots, key=_roominess)
        self.catalogue, self.policy, self.now = catalogue, policy, now
        self.demand = sorted(_merge(demand).items(), key=lambda item: (-item[1], item[0]))
        self.demanded = frozenset(model for model, _ in self.demand)
        self.minimums = dict(min_replicas or {})
        self.selectors = selectors or {}
        self.estimates = estimates or {}
        self.load_seconds: Mapping[tuple[str, str], float] = {}  # plan() sets it; `cost` reads it
        self.room_only: frozenset[str] = frozenset()  # plan() sets it
        # Under `cost` a move (a load now) beats an eviction whenever one will do: with the free
        # memory split over neurons, each large model evicts a popular one to fit and is evicted
        # back by it, load after load (docs/benchmarks.md, "P4 placement", `mixed` at 90-95%).
        self.defrag = policy.strategy == "cost" or (
            policy.defrag_after_cycles > 0 and cycle % policy.defrag_after_cycles == 0
        )
        self.actions: list[Action] = []
        self.reasons: dict[str, str] = {}
        self.blocked: set[str] = set()
        self.live = Counter(
            replica.model
            for slot in self.slots
            if slot.view.healthy
            for replica in slot.replicas.values()
            if replica.state in _LIVE
        )

    # -- what the snapshot says, as changed by the actions so far

    def slot(self, name: str) -> _Slot | None:
        return self.by_name.get(name)

    def live_count(self, model: str) -> int:
        """Healthy neurons where the model is ready, loading, or loaded by this plan."""
        return self.live[model]

    def size(self, model: str) -> int | None:
        """Bytes a replica needs: the catalogue's budget, the caller's estimate, or what one uses."""
        spec = self.catalogue.get(model)
        if spec is not None and spec.memory is not None:
            return spec.memory
        if model in self.estimates:
            return self.estimates[model]
        seen = [s.replicas[model].memory for s in self.slots if model in s.replicas]
        return max(seen) if seen and max(seen) > 0 else None

    def usable(self, slot: _Slot, model: str) -> bool:
        """The neuron may receive a load of this model (selector, health, cordon)."""
        selector = self.selectors.get(model, {})
        labels = slot.view.labels
        return (
            slot.view.healthy
            and not slot.view.cordoned
            and all(labels.get(key) == value for key, value in selector.items())
        )

    def eligible(self, model: str) -> list[_Slot]:
        return [slot for slot in self.slots if self.usable(slot, model) and not slot.hosts(model)]

    def pinned_here(self, model: str, slot: _Slot) -> bool:
        spec = self.catalogue.get(model)
        return spec is not None and slot.name in spec.pinned_on

    def movable(self, slot: _Slot, replica: ReplicaView) -> bool:
        """Idle, settled, unpinned here, not demanded and not placed by this plan."""
        return (
            replica.state == ModelState.READY
            and replica.in_flight == 0
            and replica.model not in slot.planned
            and replica.model not in self.demanded
            and not self.pinned_here(replica.model, slot)
        )

    def relocatable(self, slot: _Slot, replica: ReplicaView) -> bool:
        """What defrag may move: a movable replica, or a load this plan made (not yet done, so it
        can go elsewhere for nothing; left in place, the next plan would move it: not a fixed
        point)."""
        if replica.model in slot.planned:
            return replica.model not in self.demanded and not self.pinned_here(replica.model, slot)
        return self.movable(slot, replica)

    def evictable(self, slot: _Slot, replica: ReplicaView, for_model: str | None = None) -> bool:
        """Movable, and removing it keeps the model's minimum replica count; under `priority`,
        a minimum does not hold against `for_model` of a higher priority."""
        return self.movable(slot, replica) and not self.kept_for_minimum(replica, for_model)

    def kept_for_minimum(self, replica: ReplicaView, for_model: str | None = None) -> bool:
        """Removing the replica would take its model below its minimum replica count (under
        `priority`, a minimum does not hold against `for_model` of a higher priority)."""
        if self.live_count(replica.model) > self.minimums.get(replica.model, 0):
            return False
        return not (
            for_model is not None
            and self.policy.strategy == "priority"
            and self.priority(replica.model) < self.priority(for_model)
        )

    def room_once_settled(self, model: str, size: int, slots: list[_Slot]) -> bool:
        """The model would fit on one of `slots` once every replica there that is only busy for
        now (in flight, loading, unloading, demanded, loaded by this plan) could be evicted."""
        return any(
            slot.free
            + sum(
                r.memory
                for r in slot.replicas.values()
                if r.state != ModelState.FAILED
                and not self.pinned_here(r.model, slot)
                and not self.kept_for_minimum(r, model)
            )
            >= size
            for slot in slots
        )

    def priority(self, model: str) -> int:
        spec = self.catalogue.get(model)
        return spec.priority if spec is not None else 0

    # -- actions

    def set_free(self, slot: _Slot, free: int) -> None:
        """Change a slot's free memory, keeping `roomiest` in order."""
        del self.roomiest[bisect.bisect_left(self.roomiest, _roominess(slot), key=_roominess)]
        slot.free = free
        bisect.insort(self.roomiest, slot, key=_roominess)

    def load(self, slot: _Slot, model: str, size: int, *, protect: bool = True) -> None:
        self.set_free(slot, slot.free - size)
        # Exactly what the next snapshot will show once the load is done, so plans are idempotent.
        slot.replicas[model] = ReplicaView(model, ModelState.READY, size, loaded_at=self.now)
        self.live[model] += 1  # loads only go to healthy neurons
        if protect:
            slot.planned.add(model)
        self.actions.append(Load(model, slot.name, size))

    def unload(self, slot: _Slot, replica: ReplicaView, reason: UnloadReason) -> None:
        self.set_free(slot, slot.free + replica.memory)
        del slot.replicas[replica.model]
        self.live[replica.model] -= 1  # only ready replicas on healthy neurons are unloaded
        self.actions.append(Unload(replica.model, slot.name, reason))

    # -- the four passes

    def unload_idle(self) -> None:
        """Unload replicas unused for longer than their model's idle_ttl."""
        for slot in self.slots:
            if not slot.view.healthy:
                continue
            for replica in sorted(slot.replicas.values(), key=lambda r: r.model):
                spec = self.catalogue.get(replica.model)
                touched = replica.last_used if replica.last_used is not None else replica.loaded_at
                if spec is None or spec.idle_ttl is None or touched is None:
                    continue
                if touched < self.now - spec.idle_ttl and self.evictable(slot, replica):
                    self.unload(slot, replica, "idle")

    def place_pins(self) -> None:
        """Load each pinned model on its pinned neurons (selectors do not apply to pins)."""
        for model, spec in sorted(self.catalogue.items()):
            for name in sorted(set(spec.pinned_on)):
                slot = self.slot(name)
                if slot is None or not slot.view.healthy or slot.view.cordoned or slot.hosts(model):
                    continue
                reason = self.place(model, [slot])
                if reason is not None:
                    self.reasons[model] = f"pinned on {name}: {reason}"

    def place_requirements(self) -> None:
        """Minimums, then demand (most waiting first). Under `priority` the two are interleaved
        by priority, minimums first among equals: a replica this plan loads is never evicted in
        it, so a lower-priority minimum placed first would keep a higher-priority demand out, and
        the next plan would evict it for that demand (a plan must be a fixed point)."""
        minimums = sorted(self.minimums.items(), key=lambda i: (-self.priority(i[0]), i[0]))
        work: list[tuple[str, int | None]] = [*minimums, *((m, None) for m, _ in self.demand)]
        if self.policy.strategy == "priority":
            work.sort(key=lambda item: -self.priority(item[0]))  # stable: keeps the orders above
        for model, wanted in work:
            if wanted is None:
                self.place_demanded(model)
            else:
                self.place_minimum(model, wanted)

    def place_minimum(self, model: str, wanted: int) -> None:
        """Add replicas on distinct neurons until the model has its minimum."""
        while (have := self.live_count(model)) < wanted:
            reason = self.place(model)
            if reason is not None:
                self.reasons[model] = f"{have} of {wanted} replicas placed: {reason}"
                break

    def place_demanded(self, model: str) -> None:
        """Load a demanded model that has no ready or loading replica."""
        if self.live_count(model) > 0:
            return
        reason = self.place(model)
        if reason is not None:
            self.reasons[model] = reason

    # -- placing one replica

    def place(self, model: str, slots: list[_Slot] | None = None) -> str | None:
        """Load one replica on one of `slots` (default: every eligible neuron); None when done,
        else why it cannot be."""
        if model not in self.catalogue:
            return "not in the catalogue"
        size = self.size(model)
        if slots is None:
            # The usual case, without a scan of the fleet: the roomiest eligible neuron where the
            # model never failed is where worst fit would put it, if it fits there.
            roomiest = self.roomiest_for(model)
            if roomiest is not None and roomiest.free >= (size or 0):
                self.load(roomiest, model, size or 0)
                return None
            slots = self.eligible(model)
        if not slots:
            return self.no_neuron(model)
        # A neuron where this model's last load failed is tried only when no other one will do.
        failed = [slot for slot in slots if model in slot.replicas]
        for tier in ([slot for slot in slots if model not in slot.replicas], failed):
            if tier and self.place_in(model, size, tier):
                return None
        if model in self.room_only and size is not None:
            return f"needs {readable_bytes(size)} free and evicts nothing now: no neuron it may use has it"
        if size is not None and self.room_once_settled(model, size, slots):
            self.blocked.add(model)
            return (
                f"needs {readable_bytes(size)}: the replicas that would make room are in flight, loading,"
                " unloading or wanted by other waiting clients"
            )
        return self.too_big(size, slots)

    def place_in(self, model: str, size: int | None, slots: list[_Slot]) -> bool:
        # Worst fit: the neuron with the most memory left after the load. It spreads replicas
        # (and so compute) over the fleet, and in the P4 benchmark it costs fewer cold loads than
        # best fit. A model of unknown size is never evicted for on a guess: the neuron refuses
        # what does not fit, saying what it needs. The caller's `estimates` give the size of any
        # model it has seen ready, even loaded nowhere now, or was told by such a refusal (the
        # gateway's registry keeps them), so its next plan evicts for the real size.
        fitting = [slot for slot in slots if slot.free >= (size or 0)]
        if fitting or size is None:
            self.load(min(fitting or slots, key=lambda s: (-s.free, s.name)), model, size or 0)
            return True
        if model in self.room_only:
            return False
        if self.defrag and self.defragment(model, size, slots):
            return True
        return self.evict_for(model, size, slots)

    def roomiest_for(self, model: str) -> _Slot | None:
        """The eligible slot with the most free memory where the model has no replica at all."""
        return next(
            (s for s in self.roomiest if model not in s.replicas and self.usable(s, model)), None
        )

    def evict_for(self, model: str, size: int, slots: list[_Slot]) -> bool:
        """Evict on one neuron: under `cost` the victim set asked for least (summed over the set,
        on whichever neuron; then the fewest load seconds lost); otherwise the fewest replicas,
        where the hottest victim is coldest."""
        best: tuple[_VictimCost, _Slot, tuple[ReplicaView, ...]] | None = None
        for slot in slots:
            coldness = partial(self.coldness, slot)
            ordered = sorted(
                (r for r in slot.replicas.values() if self.evictable(slot, r, for_model=model)),
                key=coldness,
            )
            if self.policy.strategy == "cost":
                victims = cheapest_victims(ordered, size - slot.free, self.rate)
            else:
                victims = choose_victims(ordered, size - slot.free)
            if victims is None:
                continue
            cost = (
                *self.loss(slot, victims),
                len(victims),
                max(map(coldness, victims), default=_NONE),
                slot.name,
            )
            if best is None or cost < best[0]:
                best = (cost, slot, victims)
        if best is None:
            return False
        _, slot, victims = best
        for victim in victims:
            self.unload(slot, victim, "evict")
        self.load(slot, model, size)
        return True

    def rate(self, replica: ReplicaView) -> float:
        """Requests per second that will miss if the replica leaves (`cost` strategy)."""
        return request_rate(replica, self.now)

    def loss(self, slot: _Slot, victims: Sequence[ReplicaView]) -> tuple[float, float]:
        """What evicting `victims` from `slot` costs under `cost`: requests per second that will
        miss, then load seconds per second spent reloading them. Nothing under `lru`, `priority`."""
        if self.policy.strategy != "cost":
            return (0.0, 0.0)
        seconds = sum(
            reload_worth(r, self.now, self.load_cost(slot.name, r.model)) for r in victims
        )
        return (sum(map(self.rate, victims)), seconds)

    def coldness(self, slot: _Slot, replica: ReplicaView) -> Coldness:
        key = eviction_key(
            replica,
            self.catalogue,
            self.policy.strategy,
            now=self.now,
            load_seconds=self.load_cost(slot.name, replica.model),
        )
        return key, replica.model

    def load_cost(self, neuron: str, model: str) -> float | None:
        """Measured seconds to load `model` on `neuron`, else its mean on other neurons."""
        if (neuron, model) in self.load_seconds:
            return self.load_seconds[neuron, model]
        elsewhere = [s for (_, m), s in self.load_seconds.items() if m == model]
        return sum(elsewhere) / len(elsewhere) if elsewhere else None

    # -- defragmentation

    def defragment(self, model: str, size: int, slots: list[_Slot]) -> bool:
        """Make room by moving the smallest idle replicas off one neuron instead of evicting.

        Only tried when the fleet's free memory could hold the model; a move is a Load elsewhere
        followed by Unload(reason="defrag"), so the moved model stays served throughout.
        """
        free = sum(max(s.free, 0) for s in self.slots if s.view.healthy and not s.view.cordoned)
        if free < size:
            return False
        best: tuple[tuple[int, int, str], _Slot, list[tuple[ReplicaView, _Slot]]] | None = None
        for target in slots:
            moves = self.moves_off(target, size - target.free)
            if moves is None:
                continue
            cost = (len(moves), sum(replica.memory for replica, _ in moves), target.name)
            if best is None or cost < best[0]:
                best = (cost, target, moves)
        if best is None:
            return False
        _, target, moves = best
        for replica, destination in moves:
            if replica.model in target.planned:
                self.retarget(target, destination, replica)
            else:
                self.load(destination, replica.model, replica.memory, protect=False)
                self.unload(target, replica, "defrag")
        self.load(target, model, size)
        return True

    def retarget(self, source: _Slot, destination: _Slot, replica: ReplicaView) -> None:
        """Send a load this plan made to another neuron instead: no unload, nothing happened."""
        self.actions.remove(Load(replica.model, source.name, replica.memory))
        self.set_free(source, source.free + replica.memory)
        del source.replicas[replica.model]
        source.planned.discard(replica.model)
        self.live[replica.model] -= 1
        self.load(destination, replica.model, replica.memory)

    def moves_off(self, target: _Slot, shortfall: int) -> list[tuple[ReplicaView, _Slot]] | None:
        """Smallest movable replicas on `target` freeing `shortfall`, each with a best-fit home."""
        movable = sorted(
            (r for r in target.replicas.values() if self.relocatable(target, r)),
            key=lambda r: (r.memory, r.model),
        )
        chosen = choose_victims(movable, shortfall)
        if not chosen:
            return None
        taken: dict[str, int] = {}  # bytes this set of moves already sends to a neuron
        moves: list[tuple[ReplicaView, _Slot]] = []
        for replica in sorted(chosen, key=lambda r: (-r.memory, r.model)):  # big first packs better
            home = self.best_fit_home(replica, target, taken)
            if home is None:
                return None
            taken[home.name] = taken.get(home.name, 0) + replica.memory
            moves.append((replica, home))
        return moves

    def best_fit_home(
        self, replica: ReplicaView, source: _Slot, taken: Mapping[str, int]
    ) -> _Slot | None:
        """The neuron other than `source` left with the least room once it takes the replica (ties
        by name), `taken` bytes already promised away. `roomiest` is in order of free memory and
        then name, so the search walks up from the tightest fit one group of equal free memory at a
        time and stops at the first home: `cost` defragments on every plan, on fleets of any size."""

        def fits(slot: _Slot, room: int) -> bool:
            return (
                room >= replica.memory
                and slot is not source
                and self.usable(slot, replica.model)
                and not slot.hosts(replica.model)
            )

        promised = (self.by_name[name] for name in taken)
        best = min(
            ((s.free - taken[s.name], s.name) for s in promised if fits(s, s.free - taken[s.name])),
            default=None,
        )
        # Every slot before `end` has at least the replica's size free.
        end = bisect.bisect_left(self.roomiest, (1 - replica.memory, ""), key=_roominess)
        while end > 0 and (best is None or self.roomiest[end - 1].free <= best[0]):
            free = self.roomiest[end - 1].free
            start = bisect.bisect_left(self.roomiest, (-free, ""), key=_roominess)
            home = next(
                (
                    (slot.free, slot.name)
                    for slot in itertools.islice(self.roomiest, start, end)
                    if slot.name not in taken and fits(slot, slot.free)
                ),
                None,
            )
            if home is not None:
                best = home if best is None else min(best, home)
                break
            end = start
        return None if best is None else self.by_name[best[1]]

    # -- explaining failures

    def no_neuron(self, model: str) -> str:
        selector = self.selectors.get(model)
        if any(self.usable(slot, model) for slot in self.slots):
            return "already on every neuron that may hold it"
        if not any(slot.view.healthy for slot in self.slots):
            return "no healthy neuron"
        if selector:
            wanted = ", ".join(f"{key}={value}" for key, value in sorted(selector.items()))
            return f"no healthy, uncordoned neuron matches the selector {wanted}"
        return "no healthy, uncordoned neuron"

    @staticmethod
    def too_big(size: int | None, slots: list[_Slot]) -> str:
        largest = max(slot.view.memory_total for slot in slots)
        if size is not None and size > largest:
            return f"needs {readable_bytes(size)}, more than any neuron it may use holds ({readable_bytes(largest)})"
        return (
            f"needs {readable_bytes(size or 0)} and no neuron it may use can free that much: the rest is"
            " pinned or kept for a minimum replica count"
        )

    def result(self) -> Plan:
        """The actions, and the unmet requirements of models that end up without enough replicas."""
        unplaceable = {
            model: reason
            for model, reason in sorted(self.reasons.items())
            if self.live_count(model) < max(1, self.minimums.get(model, 0))
        }
        return Plan(tuple(self.actions), unplaceable, frozenset(self.blocked & set(unplaceable)))


def _roominess(slot: _Slot) -> tuple[int, str]:
    """Most free memory first, ties by name (the order worst fit chooses in)."""
    return (-slot.free, slot.name)


def _merge(demand: Sequence[Demand]) -> dict[str, int]:
    """Waiting clients per model (one model may appear more than once)."""
    waiting: dict[str, int] = {}
    for item in demand:
        waiting[item.model] = waiting.get(item.model, 0) + item.waiting
    return waiting
