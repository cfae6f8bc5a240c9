"""One bad sequence never takes its batch down: a failing forward or sampling step is isolated.

Faults are injected into a real (tiny, random-weight) Llama with a forward hook on its token
embedding, so the engine meets a real exception from inside a real batched forward.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from test_engine import Recorder, drain
from tiny_models import MINILM, tiny_llama_config
from transformers import AutoTokenizer, LlamaForCausalLM

from cortex.neuron.engine import Engine
from cortex.neuron.generation import SamplingParams

CPU = torch.device("cpu")
POISON = 7  # [unused]-style id of the borrowed tokenizer: no prompt below contains it
PROMPTS = {
    "a": [101, 2023, 2003, 1037, 3231, 102],
    "b": [101, 2178, 2028, 1010, 2007, 2062, 2616, 102],
    "c": [101, 2460, 102],
}
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def tiny() -> tuple:
    tokenizer = AutoTokenizer.from_pretrained(MINILM)
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(tokenizer.vocab_size)).eval()
    return model, tokenizer


def engine_for(tiny: tuple) -> Engine:
    model, tokenizer = tiny
    return Engine(
        model,
        tokenizer,
        device=CPU,
        max_running=8,
        defaults=SamplingParams(temperature=0.0),
        eos_token_ids=set(),
        context_length=256,
    )


def recorders(*names: str) -> dict[str, Recorder]:
    return {n: Recorder(PROMPTS[n], max_tokens=MAX_TOKENS) for n in names}


def fail_when(model: LlamaForCausalLM, condition: Callable[[torch.Tensor], bool]):
    """Make the embedding raise IndexError (as an id past the vocabulary would) on a condition."""

    def hook(_module, args):
        if condition(args[0]):
            raise IndexError("index out of range in self (injected)")

    return model.get_input_embeddings().register_forward_pre_hook(hook)


@pytest.fixture(scope="module")
def reference(tiny: tuple) -> dict[str, list[int]]:
    """What a, b and c generate together, with no bad sequence beside them."""
    engine = engine_for(tiny)
    seqs = recorders("a", "b", "c")
    for r in seqs.values():
        engine.add(r.seq)
    drain(engine)
    outputs = {n: r.seq.output_ids for n, r in seqs.items()}
    assert all(POISON not in ids for ids in outputs.values())
    return outputs


def test_a_failing_prefill_fails_only_its_sequence(tiny: tuple, reference) -> None:
    model, _ = tiny
    engine = engine_for(tiny)
    seqs = recorders("a", "b")
    for r in seqs.values():
        engine.add(r.seq)
    engine.step()  # a and b prefilled, decoding
    late = recorders("c")["c"]
    bad = Recorder([101, POISON, 102], max_tokens=MAX_TOKENS)
    engine.add(bad.seq)
    engine.add(late.seq)  # packed into the same prefill forward as the bad one
    handle = fail_when(model, lambda ids: bool((ids == POISON).any()))
    try:
        drain(engine)
    finally:
        handle.remove()
    assert bad.finished.reason == "error" and "IndexError" in (bad.finished.error or "")
    assert late.finished.reason == "length" and late.seq.output_ids == reference["c"]
    for name, r in seqs.items():
        assert r.finished.reason == "length", r.finished
        assert r.seq.output_ids == reference[name]


def test_a_failing_decode_row_fails_only_its_sequence(tiny: tuple, reference) -> None:
    model, _ = tiny
    engine = engine_for(tiny)
    seqs = recorders("a", "b", "c")
    victim = Recorder([101, 2009, 2001, 102], max_tokens=MAX_TOKENS)
    for r in [*seqs.values(), victim]:
        engine.add(r.seq)
    engine.step()  # every prompt prefilled; each holds a pending token for the next decode
    trigger, produced = victim.seq.output_ids[-1], len(victim.seq.output_ids)
    assert all(r.seq.output_ids[-1] != trigger for r in seqs.values())
    handle = fail_when(model, lambda ids: not victim.seq.finished and bool((ids == trigger).any()))
    try:
        drain(engine)
    finally:
        handle.remove()
    assert victim.finished.reason == "error"
    assert len(victim.seq.output_ids) == produced
    for name, r in seqs.items():
        assert r.finished.reason == "length", r.finished
        assert r.seq.output_ids == reference[name]


def test_token_ids_past_the_vocabulary_are_refused_at_admission(tiny: tuple, reference) -> None:
    _, tokenizer = tiny
    engine = engine_for(tiny)
    seqs = recorders("a", "b")
    for r in seqs.values():
        engine.add(r.seq)
    engine.step()
    past = Recorder([101, tokenizer.vocab_size, 102], max_tokens=4)
    negative = Recorder([-1, 101], max_tokens=4)
    engine.add(past.seq)
    engine.add(negative.seq)
    drain(engine)
    for r in (past, negative):
        assert r.finished.reason == "error"
        assert "token ids must lie in [0, 30522)" in (r.finished.error or "")
    for name, r in seqs.items():
        assert r.seq.output_ids == reference[name]
