"""The soak benchmark at its smallest: servers up, every dialect answered, memory sampled, files
written. No memory figure is asserted (numbers come from the benchmark run, docs/benchmarks.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import soak


def test_soak_small_samples_both_processes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORTEX_BENCH_OUT", str(tmp_path))
    assert soak.main(["--small"]) == 0
    document = json.loads((tmp_path / "soak.json").read_text())
    assert (tmp_path / "soak.png").stat().st_size > 0
    assert document["errors"] == 0
    samples = document["samples"]
    assert [s["requests"] for s in samples] == list(range(0, 241, 30))
    assert all(s["gateway_rss"] > 0 and s["neuron_rss"] > 0 for s in samples)
    assert any(note.startswith("target gateway RSS growth") for note in document["notes"])


def test_the_mix_covers_every_dialect_streamed_and_not() -> None:
    mix = soak.calls("http://gw")
    paths = {(c.url, json.loads(c.body)["stream"]) for c in mix}
    assert paths == {
        (f"http://gw{path}", stream)
        for path in ("/v1/chat/completions", "/v1/messages", "/v1/responses")
        for stream in (False, True)
    }
