"""`plan()` time as the fleet grows: synthetic snapshots of N neurons holding R replicas, timed.

The snapshot is what the operator hands the planner at every reconcile: one catalogue entry and one
minimum per placement, most of them already met, plus a little work, so every pass of the planner
runs. Fixed seed, so a size always gives the same snapshot and the same plan.

Per size: 1% of the models are new (no replica yet), a handful of min-0 models are demanded, a
tenth of the replicas are idle past their model's idleTimeout, a tenth of the models are pinned
and a twentieth carry a neuron selector. Neurons are ~85% full, so some placements must evict.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from dataclasses import dataclass

from cortex.core.catalogue import ModelSpec
from cortex.core.fleet import ModelState
from cortex.core.placement.model import Demand, Load, NeuronView, Plan, Policy, ReplicaView, Unload
from cortex.core.placement.planner import plan

GIB = 2**30
NEURON_GIB = (24, 48, 80)  # a mixed fleet of GPU sizes
ZONES = ("a", "b", "c")
POLICY = Policy(strategy="priority")  # the operator's
NOW = 1_000_000.0

# (neurons, replicas): 10 -> 1,000 neurons and 100 -> 5,000 replicas (issue 9, P5).
SIZES: tuple[tuple[int, int], ...] = (
    (10, 100),
    (30, 200),
    (100, 500),
    (200, 1000),
    (500, 2500),
    (1000, 5000),
)


@dataclass(frozen=True)
class Snapshot:
    """Everything `plan()` takes, for one fleet size."""

    neurons: int
    replicas: int
    fleet: tuple[NeuronView, ...]
    catalogue: dict[str, ModelSpec]
    minimums: dict[str, int]
    demand: tuple[Demand, ...]
    selectors: dict[str, dict[str, str]]
    policy: Policy = POLICY

    @property
    def size(self) -> int:
        """The input size n the growth is measured against: neurons + replicas + models."""
        return self.neurons + self.replicas + len(self.catalogue)

    def run(self) -> Plan:
        return plan(
            self.fleet,
            self.catalogue,
            self.demand,
            self.policy,
            NOW,
            min_replicas=self.minimums,
            selectors=self.selectors,
        )


def synthetic(neurons: int, replicas: int, seed: int = 11) -> Snapshot:
    """A fleet of `neurons` holding `replicas` replicas of replicas/2 models (two each)."""
    rng = random.Random(seed * 1_000_003 + neurons * 7919 + replicas)
    totals = [NEURON_GIB[i % len(NEURON_GIB)] * GIB for i in range(neurons)]
    names = [f"neuron-{i:04d}" for i in range(neurons)]
    free = dict(zip(names, totals, strict=True))
    held: dict[str, list[ReplicaView]] = {name: [] for name in names}
    models = max(replicas // 2, 1)
    catalogue: dict[str, ModelSpec] = {}
    minimums: dict[str, int] = {}
    selectors: dict[str, dict[str, str]] = {}
    # Sizes chosen so the fleet ends ~85% full: average replica = 0.85 * capacity / replicas.
    mean = 0.85 * sum(totals) / replicas
    placed = 0
    for index in range(models):
        model = f"model-{index:05d}"
        memory = int(mean * rng.uniform(0.5, 1.5))
        new = index % 100 == 99  # 1%: just created, nothing loaded yet
        pinned_on: list[str] = []
        homes = [] if new else _homes(rng, names, free, memory, 2)
        if index % 10 == 3 and homes:
            pinned_on = list(homes)  # the operator pins a pinned placement where it is live
        if index % 20 == 7:
            selectors[model] = {"zone": ZONES[index % len(ZONES)]}
        catalogue[model] = ModelSpec(
            id=model,
            source=f"file:/models/{model}",
            memory=memory,
            pinned_on=pinned_on,
            priority=index % 3,
            idle_ttl=600.0,
        )
        minimums[model] = 0 if index % 50 == 11 else 2 if index % 5 == 0 else 1
        for home in homes:
            idle = rng.random() < 0.1
            used = NOW - (rng.uniform(700, 3600) if idle else rng.uniform(0, 500))
            busy = 0 if idle or rng.random() < 0.7 else rng.randint(1, 4)
            held[home].append(ReplicaView(model, ModelState.READY, memory, busy, used, used - 60.0))
            free[home] -= memory
            placed += 1
    fleet = tuple(
        NeuronView(
            name=name,
            memory_total=total,
            memory_free=free[name],
            replicas=tuple(held[name]),
            labels={"zone": ZONES[i % len(ZONES)]},
        )
        for i, (name, total) in enumerate(zip(names, totals, strict=True))
    )
    demanded = [m for i, m in enumerate(catalogue) if i % 50 == 11][:20]
    demand = tuple(Demand(model, 1 + i % 4) for i, model in enumerate(demanded))
    return Snapshot(neurons, placed, fleet, catalogue, minimums, demand, selectors)


def split_free(neurons: int, demanded: int = 10) -> Snapshot:
    """The defrag's worst case, under `cost` (which defragments on every plan): every neuron has
    2 GiB free and a 2 GiB replica beside a 12 GiB one, and each demanded model needs 4 GiB, so
    each load is a move into free memory elsewhere, with every neuron a candidate."""
    fleet = tuple(
        NeuronView(
            f"neuron-{i:04d}",
            16 * GIB,
            2 * GIB,
            (
                ReplicaView(f"large-{i:04d}", ModelState.READY, 12 * GIB, last_used=NOW - 60),
                ReplicaView(f"small-{i:04d}", ModelState.READY, 2 * GIB, last_used=NOW - 30),
            ),
        )
        for i in range(neurons)
    )
    sizes = {r.model: r.memory for view in fleet for r in view.replicas}
    sizes.update({f"new-{j:02d}": 4 * GIB for j in range(demanded)})
    catalogue = {m: ModelSpec(id=m, source=f"file:/models/{m}", memory=b) for m, b in sizes.items()}
    demand = tuple(Demand(f"new-{j:02d}") for j in range(demanded))
    return Snapshot(neurons, 2 * neurons, fleet, catalogue, {}, demand, {}, Policy("cost"))


def _homes(
    rng: random.Random, names: list[str], free: dict[str, int], memory: int, count: int
) -> list[str]:
    """Up to `count` distinct neurons with room, tried at random (the fleet fills unevenly)."""
    homes: list[str] = []
    for _ in range(20):
        name = rng.choice(names)
        if name not in homes and free[name] >= memory:
            homes.append(name)
            if len(homes) == count:
                break
    return homes


@dataclass(frozen=True)
class Timing:
    """One size: the plan's work and how long it took (wall, and this process's CPU)."""

    neurons: int
    replicas: int
    models: int
    n: int
    loads: int
    unloads: int
    unplaceable: int
    median_ms: float
    cpu_median_ms: float
    best_ms: float
    runs_ms: tuple[float, ...]


def time_plan(snapshot: Snapshot, repeats: int) -> Timing:
    """Median and best of `repeats` plans (one unmeasured first run warms caches). CPU time is
    kept beside wall time: on a shared machine a plan also waits for a core."""
    planned = snapshot.run()
    walls, cpus = [], []
    for _ in range(repeats):
        cpu, started = time.process_time(), time.perf_counter()
        snapshot.run()
        walls.append((time.perf_counter() - started) * 1000)
        cpus.append((time.process_time() - cpu) * 1000)
    return Timing(
        neurons=snapshot.neurons,
        replicas=snapshot.replicas,
        models=len(snapshot.catalogue),
        n=snapshot.size,
        loads=sum(isinstance(a, Load) for a in planned.actions),
        unloads=sum(isinstance(a, Unload) for a in planned.actions),
        unplaceable=len(planned.unplaceable),
        median_ms=round(statistics.median(walls), 3),
        cpu_median_ms=round(statistics.median(cpus), 3),
        best_ms=round(min(walls), 3),
        runs_ms=tuple(round(r, 3) for r in walls),
    )


def _slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )


def growth_exponent(timings: list[Timing], *, cpu: bool = False) -> float:
    """k of time ~ n^k, fitted on log-log (median wall time, or median CPU time)."""
    times = [t.cpu_median_ms if cpu else t.median_ms for t in timings]
    return _slope([math.log(t.n) for t in timings], [math.log(max(v, 1e-6)) for v in times])


def nlogn_exponent(timings: list[Timing]) -> float:
    """The same fit for n·log n itself over the same sizes: the exponent growth must not exceed."""
    xs = [math.log(t.n) for t in timings]
    return _slope(xs, [math.log(t.n * math.log(t.n)) for t in timings])


def per_nlogn(timing: Timing) -> float:
    """CPU microseconds per n·log n unit: flat (or falling) when growth is n·log n or slower."""
    return timing.cpu_median_ms * 1000 / (timing.n * math.log(timing.n))
