"""P5 end to end at its smallest size: the planner sweep, then the real kopf operator against the
emulator and fake neurons over HTTP, until every placement is Ready. No timing is asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import operator_scale
from bench.planner_scale import split_free, synthetic
from cortex.core.placement.model import Load, Unload


def test_synthetic_snapshots_are_fixed_and_give_the_planner_work() -> None:
    first, again = synthetic(30, 200), synthetic(30, 200)
    assert first == again  # same seed, same snapshot
    planned = first.run()
    assert planned.actions and planned == again.run()
    assert first.neurons == 30 and 190 <= first.replicas <= 200


def test_split_free_memory_makes_every_demanded_load_a_move() -> None:
    actions = split_free(30).run().actions
    assert sum(isinstance(a, Load) for a in actions) == 20  # 10 demanded, each after one move
    assert all(a.reason == "defrag" for a in actions if isinstance(a, Unload))


def test_small_run_brings_every_placement_ready(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CORTEX_BENCH_OUT", str(tmp_path))
    assert operator_scale.main(["--small"]) == 0
    document = json.loads((tmp_path / "operator-scale.json").read_text())
    assert (tmp_path / "operator-scale.png").stat().st_size > 0
    assert [row["neurons"] for row in document["planner"]] == [10, 30, 100]
    assert document["growth_exponent"] > 0 and document["nlogn_exponent"] > 1
    run = document["operator"]
    assert run["all_ready_s"] is not None and run["ready"] == 20
    assert run["phases"] == {"Ready": 20}
    assert run["loads"] == 20  # one load per replica: nothing loaded twice
    assert "Replacing" not in run["event_reasons"]  # no spec was edited: nothing rolls
    assert run["ramp_reconciles"] > 0 and run["rss_after_mib"] > 0
    assert run["plan_profile"]  # the first plan over every placement was profiled
    assert 0 < run["ramp_plans"] < run["ramp_reconciles"]  # a plan per change, not per event
