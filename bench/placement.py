"""P4 placement: cold loads of the planner's `lru`, `priority` and `cost` strategies vs Belady.

Two synthetic traces (fixed seed), each of models requested with Zipf popularity on a fleet
smaller than the working set (every model the trace asks for): `zipf`, models of 1-8 GiB; and
`mixed`, the footprints of 135M- to 8B-parameter chat models in bf16 (0.3-16 GiB). Every strategy
is simulated with the real pure planner (`cortex.core.placement.planner.plan`): a request for a
model without a ready replica is a cold load, planned, then applied with `apply_plan`. Requests
are served one at a time (nothing in flight). A load takes `load_seconds(size)`, which the
simulation feeds back to the planner as the gateway's placer does with measured loads.

Belady is the offline furthest-in-future rule (FiF): on a miss, evict the replicas whose next
request is furthest away. It runs through the same planner (`priority` strategy, each model's
priority set at every miss to minus the index of its next request), so placement, neuron choice and
victim trimming are identical and only the eviction order differs. With varied sizes FiF is a
size-oblivious heuristic, not a proven optimum (variable-size offline caching is NP-hard); it is
the usual reference, and on these traces a strong one. `oracle` is the `cost` strategy told each
model's true popularity: the best an online policy ranking by popularity could know.
"""

from __future__ import annotations

import argparse
import bisect
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

from bench.placement_static import best_static_set, replay_static
from bench.report import Report, publish
from cortex.core.catalogue import ModelSpec
from cortex.core.placement.model import (
    USAGE_HALF_LIFE,
    Demand,
    Load,
    NeuronView,
    Policy,
    Unload,
    Usage,
)
from cortex.core.placement.planner import apply_plan, plan

if TYPE_CHECKING:
    from matplotlib.figure import Figure

GIB = 2**30
TRACES: dict[str, tuple[float, ...]] = {
    "zipf": (1, 2, 3, 4, 6, 8),  # quantized 1B..14B chat models
    # bf16 footprints: SmolLM2-135M, -360M, Qwen2.5-0.5B, Llama-3.2-1B, SmolLM2-1.7B,
    # Llama-3.2-3B, Qwen2.5-7B, Llama-3.1-8B.
    "mixed": (0.27, 0.72, 1.0, 2.5, 3.4, 6.4, 15.2, 16.0),
}
NEURON_SHARES = (16, 12, 8)  # three GPUs of different sizes, in proportion
CAPACITIES = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)  # fleet memory as a share of the working set
# Cached cold start (docs/benchmarks.md, P3): ~3 s of process-side setup for 0.5 GiB, then the
# weights at about 1 GiB/s from the neuron's cache.
LOAD_SETUP_S, LOAD_GIB_PER_S = 3.0, 1.0

TRACES["shifting"] = TRACES["zipf"]
# Requests between two reshuffles of which models are popular (only `shifting` reshuffles).
SHIFT_EVERY = {"shifting": 1000}

StrategyName = Literal["lru", "priority", "cost", "oracle", "static", "belady"]
STRATEGIES: tuple[StrategyName, ...] = ("lru", "priority", "cost", "oracle", "static", "belady")
COMPARED: tuple[StrategyName, ...] = ("lru", "priority", "cost", "oracle", "static")


@dataclass(frozen=True)
class Workload:
    """The catalogue and the request trace (one model id per request, one request per second)."""

    catalogue: dict[str, ModelSpec]
    trace: tuple[str, ...]
    popularity: dict[str, float]  # of the first phase
    shifts: tuple[tuple[int, dict[str, float]], ...] = ()  # later phases: first request, popularity

    def phases(self) -> list[tuple[int, dict[str, float]]]:
        """Each phase's first request and the popularity it draws from."""
        return [(0, self.popularity), *self.shifts]

    def working_set(self) -> int:
        """Bytes of every model the trace requests."""
        return sum(self.catalogue[m].memory or 0 for m in set(self.trace))


@dataclass
class Outcome:
    """What one strategy cost on one fleet."""

    strategy: StrategyName
    cold_loads: int = 0  # every load planned: one per miss, plus each replica moved to make room
    moves: int = 0  # of those, loads that moved a resident replica (defrag), not a miss's model
    gib_loaded: float = 0.0
    load_seconds: float = 0.0
    evictions: int = 0
    curve: list[int] = field(default_factory=list)  # cumulative cold loads after each request


def load_seconds(memory: int) -> float:
    """Simulated time to load a replica of `memory` bytes from the neuron's cache."""
    return LOAD_SETUP_S + memory / GIB / LOAD_GIB_PER_S


def workload(
    seed: int,
    models: int,
    requests: int,
    zipf: float,
    noise: float,
    sizes_gib: Sequence[float] = TRACES["zipf"],
    shift_every: int = 0,
) -> Workload:
    """Zipf popularity over `models`; priority follows popularity tiers, misjudged with `noise`.
    With `shift_every`, the ranks are reshuffled every that many requests (priorities stay)."""
    rng = random.Random(seed)
    names = [f"model-{i:02d}" for i in range(models)]
    rng.shuffle(names)  # names[rank]: popularity independent of the name's sort order
    weights = [1 / (rank + 1) ** zipf for rank in range(models)]
    total = sum(weights)
    catalogue: dict[str, ModelSpec] = {}
    for rank, name in enumerate(names):
        # The operator marks the models they care about: top quarter 2, next quarter 1, rest 0.
        tier = 2 if rank < models / 4 else 1 if rank < models / 2 else 0
        if rng.random() < noise:
            tier = rng.choice((0, 1, 2))
        size = int(rng.choice(sizes_gib) * GIB)
        catalogue[name] = ModelSpec(
            id=name, source=f"file:/models/{name}.gguf", memory=size, priority=tier
        )
    phases: list[tuple[int, dict[str, float]]] = []
    trace: list[str] = []
    step = shift_every or requests
    for start in range(0, requests, step):
        if start:
            rng.shuffle(names)
        phases.append((start, {name: weights[rank] / total for rank, name in enumerate(names)}))
        trace += rng.choices(names, weights, k=min(step, requests - start))
    return Workload(catalogue, tuple(trace), phases[0][1], tuple(phases[1:]))


def simulate(work: Workload, neurons_gib: Sequence[float], strategy: StrategyName) -> Outcome:
    """Replay the trace through the planner; count the loads it had to make."""
    if strategy == "static":
        return _simulate_static(work, neurons_gib)
    fleet = [
        NeuronView(f"neuron-{i}", int(gib * GIB), int(gib * GIB))
        for i, gib in enumerate(neurons_gib)
    ]
    policy = Policy({"belady": "priority", "oracle": "cost"}.get(strategy, strategy))
    # What the gateway records: how long each load took, and the requests for each model.
    measured: dict[tuple[str, str], float] = {}
    usage: dict[str, Usage] = {}
    positions: dict[str, list[int]] = {}
    for index, model in enumerate(work.trace):
        positions.setdefault(model, []).append(index)
    outcome = Outcome(strategy)
    for index, model in enumerate(work.trace):
        now = float(index)
        if not any(r.model == model for view in fleet for r in view.replicas):
            catalogue = work.catalogue
            if strategy == "belady":
                catalogue = _future_priorities(work, positions, index)
            result = plan(fleet, catalogue, [Demand(model)], policy, now, load_seconds=measured)
            if result.unplaceable:
                raise RuntimeError(f"request {index}: {result.unplaceable}")
            fleet = list(apply_plan(fleet, result, now))
            for load in (a for a in result.actions if isinstance(a, Load)):
                measured[load.neuron, load.model] = load_seconds(load.memory)
                outcome.load_seconds += load_seconds(load.memory)
                outcome.gib_loaded += load.memory / GIB
                outcome.cold_loads += 1
                outcome.moves += load.model != model
            outcome.evictions += sum(
                isinstance(a, Unload) and a.reason == "evict" for a in result.actions
            )
        usage[model] = usage.get(model, Usage()).add(now)
        if strategy == "oracle":  # the true popularity, as requests per second
            usage = {
                m: Usage(p * USAGE_HALF_LIFE / math.log(2), now)
                for m, p in _popularity_at(work, index).items()
            }
        fleet = [_touch(view, model, now, usage) for view in fleet]
        outcome.curve.append(outcome.cold_loads)
    return outcome


def _popularity_at(work: Workload, index: int) -> dict[str, float]:
    return [p for start, p in work.phases() if start <= index][-1]


def _simulate_static(work: Workload, neurons_gib: Sequence[float]) -> Outcome:
    """The best static set of each phase (true popularities), replayed on the trace."""
    sizes = {m: spec.memory or 0 for m, spec in work.catalogue.items()}
    neurons = [int(gib * GIB) for gib in neurons_gib]
    phases = [(start, best_static_set(sizes, p, neurons)) for start, p in work.phases()]
    outcome = Outcome("static")
    for loaded in replay_static(work.trace, sizes, neurons, phases):
        if loaded is not None:
            outcome.cold_loads += 1
            outcome.gib_loaded += sizes[loaded] / GIB
            outcome.load_seconds += load_seconds(sizes[loaded])
        outcome.curve.append(outcome.cold_loads)
    return outcome


def _future_priorities(
    work: Workload, positions: dict[str, list[int]], index: int
) -> dict[str, ModelSpec]:
    """Priority = -(index of the next request): the planner then evicts furthest-next-use first."""
    never = len(work.trace) + 1
    out = {}
    for model, spec in work.catalogue.items():
        upcoming = positions.get(model, [])
        at = bisect.bisect_right(upcoming, index)
        nxt = upcoming[at] if at < len(upcoming) else never
        out[model] = spec.model_copy(update={"priority": -nxt})
    return out


def _touch(view: NeuronView, model: str, now: float, usage: dict[str, Usage]) -> NeuronView:
    """The request for `model` served here, if it is here; every replica shows its usage."""
    replicas = tuple(
        replace(
            r,
            last_used=now if r.model == model else r.last_used,
            usage=usage.get(r.model),
        )
        for r in view.replicas
    )
    return replace(view, replicas=replicas)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench placement", description=__doc__)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--models", type=int, default=20)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of popularity")
    parser.add_argument(
        "--noise", type=float, default=0.2, help="chance a model's priority is a random tier"
    )
    parser.add_argument(
        "--capacities",
        type=lambda s: tuple(float(x) for x in s.split(",")),
        default=CAPACITIES,
        help="fleet memory as shares of the working set (comma-separated)",
    )
    parser.add_argument(
        "--traces",
        type=lambda s: tuple(s.split(",")),
        default=tuple(TRACES),
        help=f"which traces to run: {', '.join(TRACES)}",
    )
    return parser


@dataclass(frozen=True)
class Sweep:
    """Every strategy on one trace and one fleet size."""

    trace: str
    capacity: float
    neurons_gib: tuple[float, ...]
    outcomes: dict[StrategyName, Outcome]

    def vs_belady(self, strategy: StrategyName) -> float:
        return self.outcomes[strategy].cold_loads / max(self.outcomes["belady"].cold_loads, 1)

    def beyond_online(self) -> float:
        """Share of cost's excess over Belady that even the best static set still pays."""
        cold = {s: o.cold_loads for s, o in self.outcomes.items()}
        gap = cold["cost"] - cold["belady"]
        return (cold["static"] - cold["belady"]) / gap if gap > 0 else math.nan


def fleet_for(work: Workload, capacity: float) -> tuple[float, ...]:
    """Neuron sizes in GiB (in NEURON_SHARES proportion) totalling `capacity` of the working set."""
    total = capacity * work.working_set() / GIB
    neurons = tuple(total * share / sum(NEURON_SHARES) for share in NEURON_SHARES)
    biggest = max(spec.memory or 0 for spec in work.catalogue.values()) / GIB
    if biggest > max(neurons):
        raise SystemExit(f"at {capacity:.0%} no neuron holds the biggest model ({biggest:g} GiB)")
    return neurons


def sweep(trace: str, work: Workload, capacities: Sequence[float]) -> list[Sweep]:
    sweeps = []
    for capacity in capacities:
        neurons = fleet_for(work, capacity)
        outcomes = {s: simulate(work, neurons, s) for s in STRATEGIES}
        sweeps.append(Sweep(trace, capacity, neurons, outcomes))
    return sweeps


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    unknown = set(args.traces) - set(TRACES)
    if unknown:
        raise SystemExit(f"unknown traces: {', '.join(sorted(unknown))}")
    works = {
        name: workload(
            args.seed,
            args.models,
            args.requests,
            args.zipf,
            args.noise,
            TRACES[name],
            SHIFT_EVERY.get(name, 0),
        )
        for name in args.traces
    }
    sweeps = [w for name, work in works.items() for w in sweep(name, work, args.capacities)]
    rows = [
        [
            w.trace,
            f"{sum(w.neurons_gib):.1f} GiB ({w.capacity:.0%})",
            *(w.outcomes[s].cold_loads for s in STRATEGIES),
            *(f"{w.vs_belady(s):.2f}x" for s in COMPARED),
            f"{w.beyond_online():.0%}",
            *(f"{w.outcomes[s].load_seconds / 60:,.0f}" for s in STRATEGIES),
        ]
        for w in sweeps
    ]
    columns = ["trace", "fleet (of working set)", *STRATEGIES]
    columns += [f"{s}/belady" for s in COMPARED]
    columns += ["cost's gap static pays too"]
    columns += [f"load min {s}" for s in STRATEGIES]
    notes = [
        f"{args.requests} requests over {args.models} models (Zipf s={args.zipf}, seed {args.seed});"
        f" neurons in proportion {NEURON_SHARES}; working sets "
        + ", ".join(f"{n} {work.working_set() / GIB:.0f} GiB" for n, work in works.items())
        + ".",
        f"A load takes {LOAD_SETUP_S:g} s + {1 / LOAD_GIB_PER_S:g} s/GiB ('load min': minutes).",
        "belady = furthest-in-future eviction through the same planner (size-oblivious FiF).",
        "oracle = cost, told each model's true popularity instead of counting requests.",
        "static = the best static set for the true popularities (per phase), packed on the"
        " neurons with room kept for the rest: about the best an online policy can do.",
        f"shifting = zipf sizes, popular models reshuffled every {SHIFT_EVERY['shifting']} requests.",
        "Target (issue): cost within 1.3x of belady's cold loads at every capacity, zipf and mixed.",
    ]
    data = {
        "parameters": {**vars(args), "neuron_shares": NEURON_SHARES, "traces_gib": TRACES},
        "catalogues": {
            name: {
                m: {
                    "memory_gib": round((s.memory or 0) / GIB, 2),
                    "priority": s.priority,
                    "popularity": round(work.popularity[m], 4),
                }
                for m, s in sorted(work.catalogue.items())
            }
            for name, work in works.items()
        },
        "runs": [
            {
                "trace": w.trace,
                "capacity": w.capacity,
                "neurons_gib": [round(g, 2) for g in w.neurons_gib],
                "strategy": o.strategy,
                "cold_loads": o.cold_loads,
                "moves": o.moves,
                "gib_loaded": round(o.gib_loaded, 1),
                "load_seconds": round(o.load_seconds, 1),
                "evictions": o.evictions,
                "vs_belady": round(w.vs_belady(o.strategy), 3),
                "load_vs_belady": round(
                    o.load_seconds / max(w.outcomes["belady"].load_seconds, 1e-9), 3
                ),
            }
            for w in sweeps
            for o in w.outcomes.values()
        ],
    }
    title = "P4 placement: cold loads, planner strategies vs Belady"
    publish(Report("placement", title, columns, rows, data, notes, lambda f: _draw(f, sweeps)))
    return 0


def _draw(figure: Figure, sweeps: list[Sweep]) -> None:
    traces = sorted({w.trace for w in sweeps}, key=list(TRACES).index)
    axes = figure.subplots(1, len(traces), squeeze=False)[0]
    for ax, trace in zip(axes, traces, strict=True):
        shown = [w for w in sweeps if w.trace == trace]
        for strategy in COMPARED:
            ax.plot(
                [w.capacity * 100 for w in shown],
                [w.vs_belady(strategy) for w in shown],
                marker="o",
                label=strategy,
            )
        ax.axhline(1.3, color="grey", linestyle="--", linewidth=0.8)
        ax.set(xlabel="fleet memory (% of working set)", ylabel="cold loads / belady", title=trace)
        ax.legend()
