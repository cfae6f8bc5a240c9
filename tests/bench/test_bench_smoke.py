"""P1-P3 (and P2's long-prompt run) end to end at minimal sizes: each starts its servers, measures, stops them and writes its
JSON and plot. No timing is asserted (docs/benchmarks.md: numbers come from the benchmarks, not from tests)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench import coldstart, engine, engine_results, gateway, overload, prefill
from bench.loadgen import percentile
from bench.processes import free_port
from bench.stub_backend import chat_completion, chat_stream, neuron_status
from cortex.core.fleet import ModelState
from cortex.core.protocol.openai import ChatCompletion, ChatCompletionChunk


@pytest.fixture
def out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CORTEX_BENCH_OUT", str(tmp_path / "out"))
    return tmp_path / "out"


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One converted-weights cache: the cold-start run fills it, the engine run reads it."""
    return tmp_path_factory.mktemp("cache") / "cortex"


def written(out: Path, name: str) -> dict[str, Any]:
    assert (out / f"{name}.png").stat().st_size > 0
    document: dict[str, Any] = json.loads((out / f"{name}.json").read_text())
    assert document["benchmark"] == name and document["table"]["rows"]
    return document


def test_stub_answers_parse_as_the_wire_models() -> None:
    answer = ChatCompletion.model_validate_json(chat_completion("m"))
    assert answer.model == "m" and answer.choices[0].message.content == "Hello from the stub."
    events = chat_stream("m", include_usage=True)
    assert events[-1] == b"data: [DONE]\n\n"
    chunks = [
        ChatCompletionChunk.model_validate_json(e.removeprefix(b"data: ")) for e in events[:-1]
    ]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from the stub."
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
    assert [m.state for m in neuron_status("m").models] == [ModelState.READY]


def test_a_server_process_starts_once_and_stops_for_good() -> None:
    stub = gateway.stub_server(free_port())
    with stub:
        with pytest.raises(RuntimeError, match="already running"):
            stub.start()
        assert httpx.get(stub.base_url + "/health").status_code == 200
    with pytest.raises(httpx.ConnectError):
        httpx.get(stub.base_url + "/health")


def test_percentile_interpolates() -> None:
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([0.0, 10.0], 99) == pytest.approx(9.9)
    assert percentile([5.0], 99) == 5.0


def test_gateway_quick_compares_direct_and_cortex(out: Path) -> None:
    assert gateway.main(["--quick", "--no-litellm"]) == 0
    document = written(out, "gateway")
    measured = {(r["target"], r["scenario"]): r for r in document["results"]}
    assert set(measured) == {
        ("direct", "openai"),
        ("direct", "openai-stream"),
        ("cortex", "openai"),
        ("cortex", "openai-stream"),
        ("cortex", "anthropic"),
        ("cortex", "anthropic-stream"),
    }
    assert all(r["errors"] == 0 and r["requests_per_s"] > 0 for r in measured.values())
    assert set(measured["cortex", "anthropic"]["added"]) == {"p50_ms", "p99_ms"}
    notes = document["notes"]
    assert any(n.startswith("target added p50 <= 1 ms") for n in notes)
    cortex = measured["cortex", "openai"]
    assert cortex["half_load_p99_ms"] > 0 and cortex["server_cpu_ms_per_request"] > 0
    assert measured["direct", "openai"]["server_cpu_ms_per_request"] is None
    assert "LiteLLM not measured: skipped (--no-litellm)" in notes


def test_coldstart_quick_loads_twice_from_one_cache(out: Path, cache: Path) -> None:
    assert coldstart.main(["--quick", "--cache-dir", str(cache)]) == 0
    starts = written(out, "coldstart")["starts"]
    assert [s["label"] for s in starts] == [
        "first load (empty cache)",
        "cached load #1 (new process)",
    ]
    assert all(0 < s["cold_ttft_s"] <= s["cold_total_s"] for s in starts)
    assert any((cache / "converted").iterdir())  # the first start filled the cache


def test_coldstart_refuses_a_filled_cache(tmp_path: Path) -> None:
    (tmp_path / "converted").mkdir()
    with pytest.raises(SystemExit) as exit_:
        coldstart.main(["--quick", "--cache-dir", str(tmp_path)])
    assert exit_.value.code == 2


def test_engine_quick_runs_the_curve_then_paired_trials(out: Path, cache: Path) -> None:
    assert engine.main(["--quick", "--cache-dir", str(cache)]) == 0
    document = written(out, "engine")
    assert [level["concurrency"] for level in document["levels"]] == [1, 2]
    assert all(level["tokens"] > 0 for level in document["levels"])
    [trial] = document["trials"]
    assert trial["neuron_batched"]["concurrency"] == 2
    assert trial["neuron_sampled"]["concurrency"] == 2 and trial["neuron_sampled"]["tokens"] > 0
    assert trial["neuron_single"]["concurrency"] == 1
    assert trial["generate_batch"]["batch"] == 2 and trial["generate_single"]["tokens"] > 0
    assert set(trial["ratios"]) == set(engine_results.TARGETS)
    assert all(value > 0 for value in trial["ratios"].values())
    assert document["neuron_cpu_while_generating_s"] >= 0
    assert document["machine"]["torch_threads"] >= 1


def test_prefill_quick_measures_both_settings(out: Path, cache: Path) -> None:
    assert prefill.main(["--quick", "--cache-dir", str(cache)]) == 0
    document = written(out, "prefill")
    chunked, whole = document["results"]
    assert (chunked["prefill_chunk"], whole["prefill_chunk"]) == (64, prefill.WHOLE)
    for result in (chunked, whole):
        assert result["long_ttft_ms"] > 0
        assert all(len(times) > 1 for times in result["streams_content_times"])
        # The long prompt arrived while every stream was running (after their first tokens).
        assert all(
            times[0] <= result["long_prompt_started"] for times in result["streams_content_times"]
        )


def test_overload_quick_counts_answers_by_status(out: Path, tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).parents[1] / "neuron"))
    from tiny_models import make_tiny_llama

    tiny = make_tiny_llama(tmp_path / "tiny")
    assert overload.main(["--quick", "--model", "tiny", "--source", f"file:{tiny}"]) == 0
    document = written(out, "overload")
    levels = document["levels"]
    assert [level["clients"] for level in levels] == [2, 4, 12]
    assert all(level["statuses"].get("200", 0) > 0 for level in levels)
    assert sum(level["requests"] for level in levels) > sum(
        level["statuses"].get("200", 0) for level in levels
    )  # 12 clients against 2 running + 2 queued: some were refused
    assert any(note.startswith("target 0 wrong-reason 503s") for note in document["notes"])
