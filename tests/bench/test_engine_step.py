"""bench.engine_step at minimal sizes: every part of a decode step timed, greedy and sampled.
No timing is asserted (docs/benchmarks.md: numbers come from the benchmarks, not from tests)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import engine_step
from cortex.neuron import engine, sampling


def test_engine_step_splits_greedy_and_sampled_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CORTEX_BENCH_OUT", str(tmp_path))
    argv = ["--rows", "2", "--max-tokens", "4", "--alternations", "1", "--threads", "1"]
    assert engine_step.main(argv) == 0
    medians = json.loads((tmp_path / "engine-step.json").read_text())["medians"]
    # Every row decodes all its tokens (no end of sequence), so both modes take the same steps.
    assert medians["greedy"]["steps"] == medians["sampled"]["steps"] >= 2
    for mode in ("greedy", "sampled"):
        assert all(medians[mode][part] > 0 for part in ("forward", "sample", "accept", "step"))
        assert medians[mode]["forward"] < medians[mode]["step"]
    assert engine.sample is sampling.sample  # the timing wrapper is gone
