"""P4 simulation and the shared benchmark output (no timings: only counts and files)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.__main__ import main as bench_main
from bench.placement import (
    GIB,
    SHIFT_EVERY,
    TRACES,
    Workload,
    fleet_for,
    main,
    simulate,
    workload,
)
from bench.placement_static import StaticSet, best_static_set, replay_static
from bench.report import Report, publish, table
from cortex.core.catalogue import ModelSpec


def tiny(trace: str, gib: int = 1) -> Workload:
    models = sorted(set(trace))
    catalogue = {m: ModelSpec(id=m, source=f"file:/{m}", memory=gib * GIB) for m in models}
    return Workload(catalogue, tuple(trace), {m: 1 / len(models) for m in models})


def test_workload_is_seeded_and_zipf() -> None:
    work = workload(seed=3, models=10, requests=2000, zipf=1.0, noise=0.0)
    assert work == workload(seed=3, models=10, requests=2000, zipf=1.0, noise=0.0)
    assert work.trace != workload(seed=4, models=10, requests=2000, zipf=1.0, noise=0.0).trace
    top = max(work.popularity, key=work.popularity.__getitem__)
    counts = {m: work.trace.count(m) for m in work.catalogue}
    assert max(counts, key=counts.__getitem__) == top
    assert work.catalogue[top].priority == 2  # no noise: the most popular is in the top tier


def test_belady_beats_lru_on_a_cyclic_trace() -> None:
    work = tiny("abcabcabc")
    assert simulate(work, [2], "lru").cold_loads == 9  # LRU always evicts the next one needed
    assert simulate(work, [2], "belady").cold_loads == 6


def test_mixed_trace_spans_small_to_8b_footprints_and_fleets_scale_with_it() -> None:
    work = workload(seed=7, models=20, requests=500, zipf=1.0, noise=0.2, sizes_gib=TRACES["mixed"])
    sizes = {(s.memory or 0) / GIB for s in work.catalogue.values()}
    assert min(sizes) < 0.5 and max(sizes) >= 15
    neurons = fleet_for(work, 0.5)
    assert abs(sum(neurons) * GIB - work.working_set() / 2) < 1e-3 * GIB


def test_a_fleet_holding_everything_only_pays_the_first_loads() -> None:
    work = workload(seed=1, models=6, requests=300, zipf=1.0, noise=0.2)
    for strategy in ("lru", "priority", "cost", "oracle", "static", "belady"):
        outcome = simulate(work, [100], strategy)
        assert outcome.cold_loads == len(set(work.trace))
        assert outcome.evictions == 0
        assert outcome.curve[-1] == outcome.cold_loads and len(outcome.curve) == 300


def test_a_replica_moved_to_join_free_memory_counts_as_a_cold_load() -> None:
    # a and b land on one 2 GiB neuron each (worst fit), 1 GiB free on both; c (2 GiB) fits only
    # once cost moves a next to b. Three misses and one move: four loads, no eviction.
    sizes = {"a": GIB, "b": GIB, "c": 2 * GIB}
    catalogue = {m: ModelSpec(id=m, source=f"file:/{m}", memory=size) for m, size in sizes.items()}
    work = Workload(catalogue, tuple("abc"), {m: 1 / 3 for m in sizes})
    outcome = simulate(work, [2, 2], "cost")
    assert (outcome.cold_loads, outcome.moves, outcome.evictions) == (4, 1, 0)
    assert outcome.gib_loaded == 5.0
    lru = simulate(work, [2, 2], "lru")
    assert (lru.cold_loads, lru.moves, lru.evictions) == (3, 0, 1)


def test_static_set_packs_the_neurons_and_keeps_room_for_the_rest() -> None:
    sizes = {"big": 2 * GIB, "s1": GIB, "s2": GIB, "s3": GIB}
    popularity = {"big": 0.5, "s1": 0.2, "s2": 0.2, "s3": 0.1}
    static = best_static_set(sizes, popularity, [3 * GIB, GIB])
    # 4 GiB of neurons, 1 GiB kept free for the rest: big + one small (0.7), never s1 + s2 + s3.
    assert static.room == GIB and set(static.homes) in ({"big", "s1"}, {"big", "s2"})
    assert abs(static.kept_popularity - 0.7) < 1e-9
    # Kept models load once; the others share the room, one at a time.
    loads = replay_static(
        list("bbxyxxb"), {"b": GIB, "x": GIB, "y": GIB}, [2 * GIB], [(0, _keep("b"))]
    )
    assert loads == ["b", None, "x", "y", "x", None, None]


def _keep(model: str) -> StaticSet:
    """Keep `model` on neuron 0; every other model uses the room left there."""
    return StaticSet({model: 0}, spare=0, room=GIB, kept_popularity=1.0)


def test_shifting_trace_reshuffles_the_popular_models() -> None:
    work = workload(7, 10, 2000, 1.0, 0.0, TRACES["shifting"], shift_every=500)
    phases = work.phases()
    assert [start for start, _ in phases] == [0, 500, 1000, 1500] and SHIFT_EVERY["shifting"]
    tops = [max(p, key=p.__getitem__) for _, p in phases]
    assert len(set(tops)) > 1
    for (start, _), top in zip(phases, tops, strict=True):
        window = work.trace[start : start + 500]
        assert max(set(window), key=window.count) == top


def test_static_set_beats_lru_on_independent_requests() -> None:
    work = workload(seed=5, models=12, requests=1500, zipf=1.0, noise=0.2)
    neurons = fleet_for(work, 0.7)
    static = simulate(work, neurons, "static")
    assert static.cold_loads < simulate(work, neurons, "lru").cold_loads
    assert static.curve[-1] == static.cold_loads and len(static.curve) == 1500


def test_placement_benchmark_writes_table_json_and_plot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CORTEX_BENCH_OUT", str(tmp_path))
    assert main(["--requests", "400", "--models", "8", "--capacities", "0.7,0.95"]) == 0
    assert "| lru" in capsys.readouterr().out
    document = json.loads((tmp_path / "placement.json").read_text())
    assert {r["strategy"] for r in document["runs"]} == {
        "lru",
        "priority",
        "cost",
        "oracle",
        "static",
        "belady",
    }
    assert {r["trace"] for r in document["runs"]} == {"zipf", "mixed", "shifting"}
    assert len(document["table"]["rows"]) == 6  # three traces at two capacities
    assert (tmp_path / "placement.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_without_a_plot_and_table_format(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CORTEX_BENCH_OUT", str(tmp_path / "out"))
    written = publish(Report("demo", "Demo", ["a", "b"], [[1234, 0.5]], {"x": 1}))
    assert [p.name for p in written] == ["demo.json"]
    assert json.loads(written[0].read_text())["x"] == 1
    assert table(["a", "b"], [[1234, 0.5]]).splitlines()[2] == "| 1,234 | 0.50 |"


def test_bench_entry_point_lists_and_rejects_unknown_names() -> None:
    assert bench_main(["--list"]) == 0
    assert bench_main(["nope"]) == 2
    assert bench_main(["all", "--seed", "1"]) == 2
