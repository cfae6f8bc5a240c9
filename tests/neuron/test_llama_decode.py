"""The lean Llama decode step against transformers' forward: the same logits and KV, bit for bit,
on tiny random Llamas of several shapes, through the runner's bands and masks; other models and
configurations keep transformers' forward."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from cortex.neuron import llama_decode
from cortex.neuron.llama_decode import unsupported
from cortex.neuron.model_runner import ModelRunner

CPU = torch.device("cpu")
STEPS = 3

CONFIGS: dict[str, dict[str, Any]] = {
    "grouped-query": {},
    "multi-head, biases, tied embeddings": {
        "num_key_value_heads": 4,
        "attention_bias": True,
        "mlp_bias": True,
        "tie_word_embeddings": True,
    },
    "head_dim apart from hidden / heads": {"num_key_value_heads": 1, "head_dim": 32},
    "linear rope": {
        "rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}
    },
    "llama3 rope": {
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 128,
        }
    },
}

# Segments as the engine passes them: (band, first row, tokens, positions); band 1 holds 256-511.
SEGMENTS: dict[str, list[tuple[int, int, list[int], list[int]]]] = {
    "one row": [(0, 0, [5], [40])],
    "rows of one length (no mask)": [(0, 0, [5, 6, 7], [40, 40, 40])],
    "rows of several lengths (masked)": [(0, 0, [5, 6, 7, 8], [10, 40, 77, 200])],
    "sixteen rows": [(0, 0, list(range(16)), [20 + 9 * i for i in range(16)])],
    "two bands": [(0, 0, [5, 6], [30, 100]), (1, 0, [7, 8, 9], [300, 260, 500])],
}


def tiny_llama(**overrides: Any) -> LlamaForCausalLM:
    torch.manual_seed(0)
    sizes = {
        "vocab_size": 300,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "initializer_range": 0.1,
    }
    return LlamaForCausalLM(LlamaConfig(**(sizes | overrides))).eval()


def runner(model: torch.nn.Module) -> ModelRunner:
    return ModelRunner(model, device=CPU, max_rows=16, max_length=1024)


def fill(runner: ModelRunner, segments: list, seed: int) -> None:
    """Random KV in every row the segments read, the same for every runner given `seed`."""
    generator = torch.Generator().manual_seed(seed)
    for band, first, tokens, starts in segments:
        cache = runner.band(band)
        cache.reserve(first + len(tokens), max(starts) + STEPS)
        for row, length in enumerate(starts, start=first):
            shape = (2, cache.kv_heads, length, cache.head_dim)
            kv = [torch.randn(shape, generator=generator) for _ in cache.devices]
            cache.write_row(row, kv, length)


def advance(segments: list, logits: torch.Tensor) -> list:
    """The next step's segments: each row feeds its greedy token one position on."""
    tokens, nxt, offset = logits.argmax(-1).tolist(), [], 0
    for band, first, fed, starts in segments:
        nxt.append((band, first, tokens[offset : offset + len(fed)], [s + 1 for s in starts]))
        offset += len(fed)
    return nxt


@functools.cache
def configured(config: str) -> LlamaForCausalLM:
    """One model per configuration: the runner measures its linear kernels once per model."""
    return tiny_llama(**CONFIGS[config])


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("case", SEGMENTS)
def test_lean_decode_equals_the_hf_forward(config: str, case: str) -> None:
    model = configured(config)
    lean, stock = runner(model), runner(model)
    assert lean.lean is not None
    stock.lean = None
    segments = SEGMENTS[case]
    fill(lean, segments, seed=1)
    fill(stock, segments, seed=1)
    with torch.inference_mode():
        for _ in range(STEPS):
            logits = lean.decode(segments)
            expected = stock.decode(segments)
            assert logits.shape == (sum(len(t) for _, _, t, _ in segments), 300)
            assert torch.equal(logits, expected)
            segments = advance(segments, expected)
    for band, first, tokens, starts in segments:  # the new tokens' KV went where HF put it
        for row in range(first, first + len(tokens)):
            length = starts[row - first]
            saved = zip(
                lean.band(band).read_row(row, length),
                stock.band(band).read_row(row, length),
                strict=True,
            )
            assert all(torch.equal(a, b) for a, b in saved)


def test_the_norm_without_torch_rms_norm_equals_it_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where torch's fused rms_norm would differ, the lean step spells out transformers' ops."""
    monkeypatch.setattr(llama_decode, "_fused_rms_equal", lambda weight, eps: False)
    model = configured("grouped-query")
    lean, stock = runner(model), runner(model)
    assert lean.lean is not None and lean.lean._rms is llama_decode._rms
    stock.lean = None
    segments = SEGMENTS["rows of several lengths (masked)"]
    fill(lean, segments, seed=3)
    fill(stock, segments, seed=3)
    with torch.inference_mode():
        assert torch.equal(lean.decode(segments), stock.decode(segments))


def test_a_forward_swapped_in_after_load_runs_instead() -> None:
    """A model whose forward is replaced later (a wrapper, a test's simulated fault) runs it."""
    model = tiny_llama()
    decoding = runner(model)
    assert decoding.lean is not None
    segments = SEGMENTS["one row"]
    fill(decoding, segments, seed=4)

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the swapped-in forward ran")

    model.forward = broken
    with torch.inference_mode(), pytest.raises(RuntimeError, match="swapped-in forward ran"):
        decoding.decode(segments)


def test_a_hook_added_after_load_runs() -> None:
    """A hook added to a layer later (tests inject faults so) runs: the HF forward takes over."""
    model = tiny_llama()
    decoding = runner(model)
    segments = SEGMENTS["one row"]
    fill(decoding, segments, seed=5)

    def broken(*args: object) -> None:
        raise RuntimeError("the hook ran")

    model.get_input_embeddings().register_forward_pre_hook(broken)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="the hook ran"):
        decoding.decode(segments)


def _hooked(model: torch.nn.Module) -> None:
    model.model.layers[1].mlp.register_forward_hook(lambda *_: None)


def _kernel_swapped(model: torch.nn.Module) -> None:
    norm = model.model.layers[0].input_layernorm
    norm.forward = norm.forward  # an instance-level forward, as a hub kernel installs


UNSUPPORTED: dict[str, tuple[Callable[[], torch.nn.Module], str]] = {
    "another family": (
        lambda: MistralForCausalLM(
            MistralConfig(
                vocab_size=300,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
            )
        ).eval(),
        "not LlamaForCausalLM",
    ),
    "dynamic rope": (
        lambda: tiny_llama(rope_parameters={"rope_type": "dynamic", "factor": 2.0}),
        "rope type 'dynamic'",
    ),
    "eager attention": (lambda: tiny_llama(attn_implementation="eager"), "attention 'eager'"),
    "bfloat16": (lambda: tiny_llama().to(torch.bfloat16), "float32"),
    "a forward hook": (lambda: _with(tiny_llama(), _hooked), "hooks"),
    "a swapped-in kernel": (lambda: _with(tiny_llama(), _kernel_swapped), "input norm"),
}


def _with(model: torch.nn.Module, change: Callable[[torch.nn.Module], None]) -> torch.nn.Module:
    change(model)
    return model


@pytest.mark.parametrize("case", UNSUPPORTED)
def test_other_models_keep_the_hf_forward(case: str) -> None:
    build, reason = UNSUPPORTED[case]
    model = build()
    decoding = runner(model)
    assert decoding.lean is None
    assert reason in (unsupported(model) or "")
    segments = SEGMENTS["rows of several lengths (masked)"]
    fill(decoding, segments, seed=2)
    with torch.inference_mode():
        assert decoding.decode(segments).shape == (4, 300)
