"""The generation engine on the real SmolLM2-135M: continuous batching, sampling, stops, endings."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch
from tiny_models import MINILM, tiny_llama_config
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from cortex.neuron import kv_budget
from cortex.neuron.engine import Engine, EngineLoad, Sequence
from cortex.neuron.generation import Finished, GenerationEvent, SamplingParams, TextDelta
from cortex.neuron.grammar import GrammarCompiler, GrammarSpec
from cortex.neuron.kv_bands import BAND_BASE, band_of

CPU = torch.device("cpu")
EOS = 2  # <|im_end|>


@pytest.fixture(scope="module")
def smollm2(smollm2_dir: Path) -> tuple:
    """The tokenizer and the plain transformers model, from the converted GGUF (conftest.py)."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    return tokenizer, AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()


@pytest.fixture(scope="module")
def tokenizer(smollm2: tuple):
    return smollm2[0]


@pytest.fixture(scope="module")
def model(smollm2: tuple):
    return smollm2[1]


def chat(tokenizer, text: str) -> list[int]:
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True
    )
    return list(rendered["input_ids"])


def make_engine(model, tokenizer, **overrides) -> Engine:
    options = {
        "device": CPU,
        "max_running": 16,
        "defaults": SamplingParams(),
        "eos_token_ids": {EOS},
        "context_length": 8192,
    } | overrides
    return Engine(model, tokenizer, **options)


class Recorder:
    """A sequence plus every event it emitted."""

    def __init__(self, prompt: list[int], **params) -> None:
        self.events: list[GenerationEvent] = []
        self.seq = Sequence(prompt, SamplingParams(**params), self.events.append)

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events if isinstance(e, TextDelta))

    @property
    def finished(self) -> Finished:
        ends = [e for e in self.events if isinstance(e, Finished)]
        assert len(ends) == 1 and self.events[-1] is ends[0], self.events
        return ends[0]


def drain(engine: Engine, max_steps: int = 2000) -> int:
    steps = 0
    while engine.has_work():
        engine.step()
        steps += 1
        assert steps < max_steps
    return steps


def generate(engine: Engine, *recorders: Recorder) -> None:
    for r in recorders:
        engine.add(r.seq)
    drain(engine)


def assert_consistent(tokenizer, r: Recorder) -> None:
    """Deltas are clean and add up to the decoded completion."""
    ids = [t for t in r.seq.output_ids if t != EOS]
    decoded = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert all("\ufffd" not in e.text for e in r.events if isinstance(e, TextDelta))
    assert r.finished.completion_tokens == len(r.seq.output_ids)
    assert r.finished.prompt_tokens == len(r.seq.prompt_ids)
    if r.finished.reason != "stop" or r.seq.output_ids[-1] == EOS:
        assert r.text == decoded


@pytest.fixture(scope="module")
def prompts(tokenizer) -> dict[str, list[int]]:
    return {
        "france": chat(tokenizer, "What is the capital of France? Answer in detail."),
        "sea": chat(tokenizer, "Write a long poem about the sea."),
        "gravity": chat(tokenizer, "Explain gravity to a child."),
        "colors": chat(tokenizer, "List ten colors, one per line."),
        "story": chat(tokenizer, "Tell me a story about a robot who learns to paint."),
    }


@pytest.fixture(scope="module")
def greedy_alone(model, tokenizer, prompts) -> dict[str, Recorder]:
    """Each prompt alone in an engine, greedy, 40 tokens: the reference for batched runs."""
    out = {}
    for name, prompt in prompts.items():
        r = Recorder(prompt, max_tokens=40, temperature=0)
        generate(make_engine(model, tokenizer), r)
        assert_consistent(tokenizer, r)
        out[name] = r
    return out


def test_greedy_matches_hf_generate(model, prompts, greedy_alone) -> None:
    prompt = prompts["sea"]
    with torch.inference_mode():
        reference = model.generate(
            torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=EOS
        )[0, len(prompt) :].tolist()
    assert greedy_alone["sea"].seq.output_ids[:24] == reference


def test_batched_equals_alone_while_rows_leave(model, tokenizer, prompts, greedy_alone) -> None:
    # Different lengths make sequences leave mid-run, so the survivors change rows.
    lengths = {"france": 40, "sea": 5, "gravity": 40, "colors": 12, "story": 25}
    batch = {n: Recorder(prompts[n], max_tokens=k, temperature=0) for n, k in lengths.items()}
    generate(make_engine(model, tokenizer), *batch.values())
    for name, r in batch.items():
        assert_consistent(tokenizer, r)
        alone = greedy_alone[name].seq.output_ids
        assert r.seq.output_ids == alone[: lengths[name]], name


def test_rows_of_one_length_equal_alone(model, tokenizer, prompts, greedy_alone) -> None:
    """Rows of equal length decode without a mask: the same tokens as each alone."""
    twins = [Recorder(prompts["story"], max_tokens=40, temperature=0) for _ in range(3)]
    generate(make_engine(model, tokenizer), *twins)
    assert all(r.seq.output_ids == greedy_alone["story"].seq.output_ids for r in twins)


def test_sequence_joining_a_running_batch(model, tokenizer, prompts, greedy_alone) -> None:
    engine = make_engine(model, tokenizer)
    first = Recorder(prompts["story"], max_tokens=40, temperature=0)
    late = Recorder(prompts["gravity"], max_tokens=40, temperature=0)
    engine.add(first.seq)
    for _ in range(6):
        engine.step()
    before = len(first.seq.output_ids)
    assert engine.running == 1 and before >= 6
    engine.add(late.seq)
    engine.step()
    assert engine.running == 2 and len(late.seq.output_ids) >= 1
    assert len(first.seq.output_ids) == before + 1  # the running stream did not wait
    drain(engine)
    assert late.seq.output_ids == greedy_alone["gravity"].seq.output_ids
    assert first.seq.output_ids == greedy_alone["story"].seq.output_ids


def test_seed_gives_same_sample_alone_and_in_batch(model, tokenizer, prompts) -> None:
    def sampled(seed: int) -> Recorder:
        return Recorder(prompts["story"], max_tokens=30, temperature=1.3, top_p=0.95, seed=seed)

    alone = sampled(7)
    generate(make_engine(model, tokenizer), alone)
    again, other_seed = sampled(7), sampled(8)
    # Seeded too: an unseeded row may sample bytes that form no character, a U+FFFD that
    # assert_consistent would read as a broken delta (it did, once in many runs).
    neighbours = [
        Recorder(prompts[n], max_tokens=20, temperature=1.0, seed=seed)
        for n, seed in (("sea", 1), ("colors", 2))
    ]
    generate(make_engine(model, tokenizer), neighbours[0], again, other_seed, neighbours[1])
    assert again.seq.output_ids == alone.seq.output_ids
    assert other_seed.seq.output_ids != alone.seq.output_ids
    for r in (alone, again, other_seed, *neighbours):
        assert_consistent(tokenizer, r)


def test_a_min_p_sample_is_the_same_alone_and_in_batch(model, tokenizer, prompts) -> None:
    """A seeded row with vLLM's min_p gives the same tokens beside sampled and greedy rows
    without it as alone, and other tokens than the same seed without min_p."""

    def sampled(seed: int, **params) -> Recorder:
        return Recorder(prompts["story"], max_tokens=30, temperature=1.3, seed=seed, **params)

    alone = sampled(7, min_p=0.1)
    generate(make_engine(model, tokenizer), alone)
    again, unfiltered = sampled(7, min_p=0.1), sampled(7)
    neighbours = [
        Recorder(prompts["sea"], max_tokens=20, temperature=1.0),
        Recorder(prompts["colors"], max_tokens=20, temperature=0),
    ]
    generate(make_engine(model, tokenizer), neighbours[0], again, unfiltered, neighbours[1])
    assert again.seq.output_ids == alone.seq.output_ids
    assert unfiltered.seq.output_ids != alone.seq.output_ids
    for r in (alone, again, unfiltered, *neighbours):
        assert_consistent(tokenizer, r)


def test_stop_string_is_never_emitted(model, tokenizer, prompts, greedy_alone) -> None:
    full = greedy_alone["gravity"].text
    stop = full[len(full) // 2 : len(full) // 2 + 6]  # likely spans tokens
    assert full.find(stop) > 0
    r = Recorder(prompts["gravity"], max_tokens=40, temperature=0, stop=("never-there", stop))
    generate(make_engine(model, tokenizer), r)
    assert r.finished.reason == "stop" and r.finished.stop_sequence == stop
    assert r.text == full[: full.index(stop)]
    assert r.finished.completion_tokens < greedy_alone["gravity"].finished.completion_tokens


def test_max_tokens_ends_with_length(model, tokenizer, prompts) -> None:
    r = Recorder(prompts["story"], max_tokens=7, temperature=0)
    generate(make_engine(model, tokenizer), r)
    assert r.finished.reason == "length"
    assert r.finished.completion_tokens == 7 == len(r.seq.output_ids)
    assert_consistent(tokenizer, r)


def test_eos_ends_with_stop(model, tokenizer, prompts, greedy_alone) -> None:
    r = greedy_alone["france"]  # "The capital of France is Paris." then <|im_end|>
    assert r.seq.output_ids[-1] == EOS and len(r.seq.output_ids) < 40
    assert r.finished.reason == "stop"
    assert "<|im_end|>" not in r.text
    assert_consistent(tokenizer, r)


def test_context_length_ends_with_length(model, tokenizer, prompts) -> None:
    prompt = prompts["story"]
    r = Recorder(prompt, max_tokens=100, temperature=0)
    generate(make_engine(model, tokenizer, context_length=len(prompt) + 5), r)
    assert r.finished.reason == "length"
    assert r.finished.completion_tokens == 5


def test_prompt_too_long_for_context_is_an_error(model, tokenizer, prompts) -> None:
    prompt = prompts["story"]
    r = Recorder(prompt, max_tokens=10)
    generate(make_engine(model, tokenizer, context_length=len(prompt)), r)
    assert r.finished.reason == "error" and "context length" in (r.finished.error or "")


def test_cancel_stops_within_one_step(model, tokenizer, prompts) -> None:
    engine = make_engine(model, tokenizer)
    victim = Recorder(prompts["sea"], max_tokens=200, temperature=0)
    other = Recorder(prompts["colors"], max_tokens=15, temperature=0)
    queued = Recorder(prompts["gravity"], max_tokens=5)
    engine.add(victim.seq)
    engine.add(other.seq)
    for _ in range(3):
        engine.step()
    victim.seq.cancel()
    engine.add(queued.seq)
    queued.seq.cancel()
    emitted = len(victim.seq.output_ids)
    engine.step()
    assert victim.finished.reason == "cancelled"
    assert victim.finished.completion_tokens == emitted
    assert queued.finished.reason == "cancelled" and queued.seq.output_ids == []
    assert engine.running == 1 and engine.waiting == 0
    drain(engine)
    assert other.finished.reason == "length" and other.finished.completion_tokens == 15


def test_cancel_during_prefill_keeps_the_prefilled_part(model, tokenizer, prompts) -> None:
    engine = make_engine(model, tokenizer, prefill_chunk=16)
    prompt = prompts["story"]
    first = Recorder(prompt, max_tokens=5, temperature=0)
    engine.add(first.seq)
    engine.step()
    engine.step()
    first.seq.cancel()
    engine.step()
    assert first.finished.reason == "cancelled" and first.finished.completion_tokens == 0
    assert engine.running == 0 and not engine.has_work()
    again = Recorder(prompt, max_tokens=5, temperature=0)
    generate(engine, again)
    assert again.finished.cached_tokens == 32  # two chunks of 16 were in the cache
    fresh = Recorder(prompt, max_tokens=5, temperature=0)
    generate(make_engine(model, tokenizer), fresh)
    assert again.seq.output_ids == fresh.seq.output_ids


def test_max_running_bounds_the_batch(model, tokenizer, prompts) -> None:
    engine = make_engine(model, tokenizer, max_running=2)
    rs = [Recorder(p, max_tokens=4, temperature=0) for p in prompts.values()]
    for r in rs:
        engine.add(r.seq)
    assert engine.waiting == 5
    seen = 0
    while engine.has_work():
        engine.step()
        assert engine.running <= 2
        seen = max(seen, engine.running)
    assert seen == 2
    assert all(r.finished.completion_tokens == 4 for r in rs)


def test_kv_budget_queues_what_does_not_fit(model, tokenizer, prompts) -> None:
    """Sequences whose prompts overrun the KV budget together wait for room."""
    lengths = [len(p) for p in prompts.values()]
    budget = 2 * (min(lengths) + 8) - 1  # no two sequences fit together
    assert_one_at_a_time(make_engine(model, tokenizer, kv_budget_tokens=budget), prompts.values())


def test_kv_budget_counts_real_tokens_not_padding_nor_max_tokens(model, tokenizer, prompts) -> None:
    """A short sequence beside a long one holds its own tokens, and max_tokens holds nothing."""
    short = prompts["colors"]
    long = chat(tokenizer, " ".join(f"Box {i} is blue." for i in range(20)) + " Count the boxes.")
    holding = [len(long) + 1, len(short) + 1]
    budget = kv_budget.held(holding) + 2 * kv_budget.KV_BLOCK  # both, with room to grow
    assert budget < kv_budget.padded(holding)  # rows padded to the longest would not fit
    engine = make_engine(model, tokenizer, kv_budget_tokens=budget)
    rs = [Recorder(p, max_tokens=8000, temperature=0) for p in (long, short)]
    for r in rs:
        engine.add(r.seq)
    engine.step()
    assert engine.running == 2 and engine.waiting == 0
    assert engine.kv_tokens_held == kv_budget.held(holding)
    for r in rs:
        r.seq.cancel()
    drain(engine)
    assert all(r.finished.reason == "cancelled" for r in rs)


def test_kv_reservation_grows_as_sequences_decode(model, tokenizer, prompts) -> None:
    engine = make_engine(model, tokenizer)
    r = Recorder(prompts["sea"], max_tokens=70, temperature=0, stop=("never",))
    engine.add(r.seq)
    seen = []
    while engine.has_work():
        engine.step()
        if engine.running:
            held = engine.kv_tokens_held
            assert held == kv_budget.held([len(r.seq.prompt_ids) + len(r.seq.output_ids)])
            seen.append(held)
    assert seen == sorted(seen) and seen[-1] >= seen[0] + 2 * kv_budget.KV_BLOCK


def test_preempted_sequences_resume_and_finish_as_alone(
    model, tokenizer, prompts, greedy_alone
) -> None:
    """All three fit when admitted, not once they grow: the newest give their KV back, wait,
    and resume where they were; no sequence fails and each says what it says alone."""
    names = [n for n, r in greedy_alone.items() if len(r.seq.output_ids) == 40][:3]
    assert len(names) == 3
    lengths = [len(prompts[n]) + 1 for n in names]
    budget = kv_budget.held(lengths) + 2 * kv_budget.KV_BLOCK
    engine = make_engine(model, tokenizer, kv_budget_tokens=budget, prefix_cache_tokens=0)
    rs = {n: Recorder(prompts[n], max_tokens=40, temperature=0) for n in names}
    for r in rs.values():
        engine.add(r.seq)
    engine.step()
    assert engine.running == 3
    preempted = 0
    while engine.has_work():
        engine.step()
        preempted = max(preempted, engine.waiting)
        if engine.running > 1:
            assert engine.kv_tokens_held <= budget + engine.running * kv_budget.KV_BLOCK
    assert preempted >= 1
    for name, r in rs.items():
        assert r.seq.output_ids == greedy_alone[name].seq.output_ids
        assert_consistent(tokenizer, r)


def test_rows_in_different_length_bands_decode_as_alone(
    model, tokenizer, prompts, greedy_alone
) -> None:
    """Short rows beside long ones, and a row crossing into the next band while it decodes."""
    filler = " ".join(f"Item {i} is a small blue box on shelf {i % 7}." for i in range(80))
    text = chat(tokenizer, filler + " How many items are there?")
    crossing, long = text[-(BAND_BASE - 10) :], text[-700:]
    assert band_of(len(long)) == 2 and band_of(len(crossing) + 30) == 1
    together = [Recorder(p, max_tokens=30, temperature=0) for p in (crossing, long)]
    together += [Recorder(prompts[n], max_tokens=40, temperature=0) for n in ("story", "colors")]
    engine = make_engine(model, tokenizer)
    for r in together:
        engine.add(r.seq)
    bands = set()
    while engine.has_work():
        engine.step()
        bands |= {a.band for a in engine._decoding}
    assert bands == {0, 1, 2}
    assert together[2].seq.output_ids == greedy_alone["story"].seq.output_ids
    assert together[3].seq.output_ids == greedy_alone["colors"].seq.output_ids
    for r in together[:2]:
        alone = Recorder(r.seq.prompt_ids, max_tokens=30, temperature=0)
        generate(make_engine(model, tokenizer), alone)
        assert r.seq.output_ids == alone.seq.output_ids


def assert_one_at_a_time(engine: Engine, prompts: Iterable[list[int]]) -> None:
    """Every prompt runs to its 8 tokens, never two in the engine at once."""
    rs = [Recorder(p, max_tokens=8, temperature=0) for p in prompts]
    for r in rs:
        engine.add(r.seq)
    while engine.has_work():
        engine.step()
        assert engine.running <= 1
    assert all(r.finished.completion_tokens == 8 for r in rs)


def test_long_prompt_is_prefilled_in_chunks_without_stalling(
    model, tokenizer, prompts, greedy_alone
) -> None:
    engine = make_engine(model, tokenizer, prefill_chunk=64)
    stream = Recorder(prompts["story"], max_tokens=40, temperature=0)
    engine.add(stream.seq)
    engine.step()
    filler = " ".join(f"Item {i} is a small blue box." for i in range(40))
    long_prompt = chat(tokenizer, filler + " How many items are there?")
    assert len(long_prompt) > 4 * 64
    long = Recorder(long_prompt, max_tokens=8, temperature=0)
    short = Recorder(prompts["colors"], max_tokens=10, temperature=0)
    engine.add(long.seq)
    steps = 0
    while not long.seq.output_ids:
        before = len(stream.seq.output_ids)
        engine.step()
        steps += 1
        assert len(stream.seq.output_ids) == before + 1  # one token per step all along
        if steps == 1:
            engine.add(short.seq)
        if steps == 2:  # the short prompt was not queued behind the long one
            assert short.seq.output_ids and not long.seq.output_ids
    drain(engine)
    assert stream.seq.output_ids == greedy_alone["story"].seq.output_ids
    assert short.seq.output_ids == greedy_alone["colors"].seq.output_ids[:10]
    alone = Recorder(long_prompt, max_tokens=8, temperature=0)
    generate(make_engine(model, tokenizer), alone)
    assert long.seq.output_ids == alone.seq.output_ids


def test_kv_memory_is_accounted_and_released(model, tokenizer, prompts) -> None:
    engine = make_engine(model, tokenizer, prefix_cache_tokens=0)
    config = model.config
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * 64 * 4
    assert engine.kv_bytes_per_token == per_token
    assert engine.kv_bytes() == 0
    rs = [Recorder(prompts[n], max_tokens=6, temperature=0) for n in ("sea", "story")]
    for r in rs:
        engine.add(r.seq)
    engine.step()
    longest = max(len(r.seq.prompt_ids) for r in rs) + 1
    assert engine.kv_bytes() >= 2 * longest * per_token
    drain(engine)
    assert engine.kv_bytes() == 0


def test_finished_sequences_leave_reusable_prefixes(
    model, tokenizer, prompts, greedy_alone
) -> None:
    engine = make_engine(model, tokenizer)
    first = Recorder(prompts["colors"], max_tokens=40, temperature=0)
    generate(engine, first)
    kept = len(first.seq.prompt_ids) + 39  # the last token was sampled, never fed back
    assert engine.kv_bytes() == kept * engine.kv_bytes_per_token
    # The next turn of the same chat re-sends the whole conversation.
    turns = [
        {"role": "user", "content": "List ten colors, one per line."},
        {"role": "assistant", "content": first.text},
        {"role": "user", "content": "Now the same in French."},
    ]
    follow_up = list(tokenizer.apply_chat_template(turns, add_generation_prompt=True)["input_ids"])
    second = Recorder(follow_up, max_tokens=20, temperature=0)
    other = Recorder(prompts["story"], max_tokens=40, temperature=0)
    generate(engine, second, other)
    assert second.finished.cached_tokens > len(first.seq.prompt_ids)
    assert 0 < other.finished.cached_tokens < len(other.seq.prompt_ids)  # the system prompt
    assert other.seq.output_ids == greedy_alone["story"].seq.output_ids
    fresh = Recorder(follow_up, max_tokens=20, temperature=0)
    generate(make_engine(model, tokenizer, prefix_cache_tokens=0), fresh)
    assert fresh.finished.cached_tokens == 0
    assert second.seq.output_ids == fresh.seq.output_ids


def test_fail_all_finishes_everything_once(model, tokenizer, prompts) -> None:
    engine = make_engine(model, tokenizer, max_running=2)
    rs = [Recorder(p, max_tokens=50, temperature=0) for p in prompts.values()]
    for r in rs:
        engine.add(r.seq)
    engine.step()
    engine.fail_all("device lost")
    for r in rs:
        assert r.finished.reason == "error" and r.finished.error == "device lost"
    assert not engine.has_work() and engine.running == 0 and engine.waiting == 0


def test_forward_error_propagates_and_engine_recovers(
    model, tokenizer, prompts, greedy_alone, monkeypatch
) -> None:
    engine = make_engine(model, tokenizer)
    rs = [Recorder(prompts[n], max_tokens=40, temperature=0) for n in ("sea", "france")]
    for r in rs:
        engine.add(r.seq)
    engine.step()

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with monkeypatch.context() as patch:
        patch.setattr(model, "forward", broken)
        with pytest.raises(RuntimeError, match="illegal memory access"):
            engine.step()
    engine.fail_all("step failed")
    assert [r.finished.reason for r in rs] == ["error", "error"]
    again = Recorder(prompts["gravity"], max_tokens=40, temperature=0)
    generate(engine, again)
    assert again.seq.output_ids == greedy_alone["gravity"].seq.output_ids


def test_sixteen_sequences_decode_together(model, tokenizer) -> None:
    """A full batch: the 16 rows run together, each to its end (tokens per second are
    the engine benchmark's, bench/engine.py, not a test's)."""
    topics = ["the sea", "a cat", "the moon", "coffee", "winter", "a robot", "music", "a city"]
    topics += ["trees", "a river", "friendship", "the sun", "rain", "a library", "hills", "trains"]
    prompts = [chat(tokenizer, f"Write a long story about {t}.") for t in topics]
    rs = [Recorder(p, max_tokens=24, temperature=0, stop=("never",)) for p in prompts]
    engine = make_engine(model, tokenizer)
    for r in rs:
        engine.add(r.seq)
    together = 0
    while engine.has_work():
        engine.step()
        together = max(together, engine.running)
    assert together == 16
    assert all(len(r.seq.output_ids) == 24 or r.seq.output_ids[-1] == EOS for r in rs)
    for r in rs:
        assert_consistent(tokenizer, r)


def tiny_model(kind: str):
    """A small random model of another family, to check masks and windows against HF generate."""
    common = {
        "vocab_size": 49152,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "initializer_range": 0.1,
        "sliding_window": 16,
    }
    torch.manual_seed(0)
    if kind == "mistral":
        return MistralForCausalLM(MistralConfig(**common)).eval()
    # Qwen2 with a full first layer and a sliding second one: one mask per layer type.
    config = Qwen2Config(**common, use_sliding_window=True, max_window_layers=1)
    assert config.layer_types == ["full_attention", "sliding_attention"]
    return Qwen2ForCausalLM(config).eval()


@pytest.mark.parametrize("kind", ["mistral", "qwen2"])
def test_sliding_window_models_match_hf_generate(tokenizer, prompts, kind: str) -> None:
    model = tiny_model(kind)
    prompt = prompts["gravity"][-20:]
    with torch.inference_mode():
        reference = model.generate(
            torch.tensor([prompt]), max_new_tokens=30, do_sample=False, eos_token_id=None
        )[0, len(prompt) :].tolist()
    alone = Recorder(prompt, max_tokens=30, temperature=0)
    generate(make_engine(model, tokenizer, eos_token_ids=set()), alone)
    assert alone.seq.output_ids == reference
    batched = [Recorder(prompt, max_tokens=30, temperature=0)]
    batched += [
        Recorder(prompts[n][-9:], max_tokens=n_tokens, temperature=0)
        for n, n_tokens in (("sea", 7), ("story", 30))
    ]
    generate(make_engine(model, tokenizer, eos_token_ids=set(), prefill_chunk=12), *batched)
    assert batched[0].seq.output_ids == reference


def test_a_closed_engine_finishes_what_it_holds_and_what_comes_later() -> None:
    torch.manual_seed(0)
    engine = make_engine(LlamaForCausalLM(tiny_llama_config(64)).eval(), None)
    held, late = Recorder([1, 2, 3], max_tokens=5), Recorder([1, 2], max_tokens=5)
    engine.add(held.seq)
    engine.close("model unloaded")
    engine.add(late.seq)  # a sequence queued before the close reached the worker
    assert held.finished.error == late.finished.error == "model unloaded"
    assert held.finished.reason == late.finished.reason == "cancelled"  # a 503, retried elsewhere
    assert not engine.has_work()


def _tiny_engine(**overrides) -> Engine:
    tokenizer = AutoTokenizer.from_pretrained(MINILM)
    torch.manual_seed(0)
    tiny = LlamaForCausalLM(tiny_llama_config(tokenizer.vocab_size)).eval()
    return make_engine(tiny, tokenizer, eos_token_ids=set(), context_length=256, **overrides)


def _choices(n: int, prompt: list[int], **params) -> list[Recorder]:
    """A request's `n` choices as the replica hands them over: choice 0 leads, the rest follow."""
    recorders = [Recorder(prompt, **params) for _ in range(n)]
    recorders[0].seq.followers = [r.seq for r in recorders[1:]]
    return recorders


def test_the_choices_of_one_prompt_share_its_prefill() -> None:
    """The followers of a request's first choice wait for its prompt's KV and take it from the
    prefix cache: one prefill of the prompt (but its last token) for all of them."""
    engine = _tiny_engine()
    prompt = list(range(1000, 1040))
    choices = _choices(3, prompt, max_tokens=8, temperature=0)
    engine.add(choices[0].seq)
    engine.step()
    assert engine.load == EngineLoad(running=1, waiting=2)
    drain(engine)
    assert [r.finished.cached_tokens for r in choices] == [0, len(prompt) - 1, len(prompt) - 1]
    assert all(r.seq.output_ids == choices[0].seq.output_ids for r in choices)  # greedy
    assert all(r.finished.reason == "length" for r in choices)
    alone = _choices(3, prompt, max_tokens=8, temperature=0)
    generate(_tiny_engine(prefix_cache_tokens=0), alone[0])  # no cache: each prefills it
    assert [r.finished.cached_tokens for r in alone] == [0, 0, 0]
    assert [r.seq.output_ids for r in alone] == [r.seq.output_ids for r in choices]


def test_followers_end_with_their_leader_when_it_never_prefills() -> None:
    cancelled = _choices(3, [1, 2, 3], max_tokens=5)
    for r in cancelled:  # the client left before the engine took the request
        r.seq.cancel()
    engine = _tiny_engine()
    engine.add(cancelled[0].seq)
    drain(engine)
    assert [r.finished.reason for r in cancelled] == ["cancelled"] * 3
    closed = _choices(2, [1, 2, 3], max_tokens=5)
    engine.close("model unloaded")
    engine.add(closed[0].seq)
    assert [r.finished.reason for r in closed] == ["cancelled"] * 2
    assert not engine.has_work()


def test_the_engine_publishes_its_batch_what_waits_for_kv_and_its_preemptions() -> None:
    """What the neuron's metrics read from the event loop: a picture the worker replaces."""
    tokenizer = AutoTokenizer.from_pretrained(MINILM)
    torch.manual_seed(0)
    tiny = LlamaForCausalLM(tiny_llama_config(tokenizer.vocab_size)).eval()
    # Three 10-token prompts fit beside each other (a block each, a block of room each); a
    # fourth does not, and once the three outgrow their first block the newest is preempted.
    budget = 3 * kv_budget.KV_BLOCK + 2 * kv_budget.KV_BLOCK
    engine = make_engine(
        tiny,
        tokenizer,
        kv_budget_tokens=budget,
        eos_token_ids=set(),
        context_length=256,
        prefix_cache_tokens=0,
    )
    rs = [Recorder(list(range(1000, 1010)), max_tokens=60) for _ in range(4)]
    for r in rs:
        engine.add(r.seq)
    assert engine.load == EngineLoad(running=0, waiting=4)
    engine.step()
    assert engine.load == EngineLoad(running=3, waiting=1)
    seen = []
    while engine.has_work():
        engine.step()
        seen.append(engine.load)
    assert max(load.preemptions for load in seen) >= 1
    assert engine.load == EngineLoad(running=0, waiting=0, preemptions=seen[-1].preemptions)


def test_stop_strings_do_not_cut_constrained_output(smollm2_dir: Path) -> None:
    """Stop strings are not matched in output a grammar constrains: the grammar ends it."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    torch.manual_seed(0)
    tiny = LlamaForCausalLM(tiny_llama_config(tokenizer.vocab_size)).eval()
    schema = {
        "type": "object",
        "properties": {"a": {"enum": ["x", "y"]}, "b": {"enum": [1, 2]}},
        "required": ["a", "b"],
        "additionalProperties": False,
    }
    compiler = GrammarCompiler(tokenizer, tokenizer.vocab_size, "engine-test")
    grammar, _ = compiler.compile(GrammarSpec.json_schema(schema))
    prompt = chat(tokenizer, "Answer in JSON.")
    r = Recorder(prompt, max_tokens=40, temperature=0, stop=(",", '"'), grammar=grammar)
    generate(make_engine(tiny, tokenizer, context_length=256), r)
    assert r.finished.reason == "stop" and r.finished.stop_sequence is None
    assert set(json.loads(r.text)) == {"a", "b"}
