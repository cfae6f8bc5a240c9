"""bench.decode_step at minimal sizes, and the stock `generate()` reference of `bench engine`.
No timing is asserted (docs/benchmarks.md: numbers come from the benchmarks, not from tests)."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from bench import decode_step
from bench.hf_generate import load_reference
from cortex.neuron import cpu_linear


def test_decode_step_compares_both_kernel_choices(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CORTEX_BENCH_OUT", str(tmp_path))
    assert decode_step.main(["--rows", "2", "--blocks", "2", "--steps", "1", "--threads", "1"]) == 0
    document = json.loads((tmp_path / "decode-step.json").read_text())
    result = document["results"]["2"]
    assert (
        len(result["block medians ms"]["stock"]) == len(result["block medians ms"]["engine"]) == 2
    )
    assert len(result["block medians ms"]["unpadded"]) == 2  # left8 without its padding
    assert cpu_linear.LEFT_TILE == 8  # ... put back: the model serves padded after the bench
    assert result["same tokens"] is True
    assert set(result["linear layers alone ms"]) >= {"F.linear", "weight_left"}
    assert document["kernel choice"]  # per weight shape


def test_the_generate_reference_runs_stock_kernels() -> None:
    model = load_reference(None, stock=True).model
    assert not [m for m in model.modules() if type(m) is nn.Linear and "forward" in vars(m)]
    assert cpu_linear.packed_bytes(model) == 0
