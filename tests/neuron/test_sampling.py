"""Sampling parameter resolution and token choice, on synthetic logits."""

from __future__ import annotations

import torch

from cortex.neuron.generation import FALLBACK_MAX_TOKENS, FALLBACK_TOP_P, SamplingParams
from cortex.neuron.sampling import Sampler, sample

CPU = torch.device("cpu")


def test_request_then_model_defaults_then_fallback() -> None:
    defaults = SamplingParams(temperature=0.6, top_p=0.9, top_k=50)
    sampler = Sampler.resolve(SamplingParams(temperature=0.2, seed=3), defaults)
    assert (sampler.temperature, sampler.top_p, sampler.top_k) == (0.2, 0.9, 50)
    assert sampler.max_tokens == FALLBACK_MAX_TOKENS and sampler.seed == 3
    fallback = Sampler.resolve(SamplingParams(max_tokens=5), SamplingParams())
    assert fallback.top_p == FALLBACK_TOP_P and fallback.max_tokens == 5


def test_zero_temperature_and_top_k_one_are_greedy() -> None:
    assert Sampler.resolve(SamplingParams(temperature=0), SamplingParams()).greedy
    assert Sampler.resolve(SamplingParams(top_k=1), SamplingParams()).greedy
    assert not Sampler.resolve(SamplingParams(temperature=0.7), SamplingParams()).greedy


def draws(sampler: Sampler, logits: torch.Tensor, n: int) -> list[int]:
    generator = sampler.generator(CPU)
    return [sample(logits, [sampler], [generator])[0] for _ in range(n)]


def test_top_k_and_top_p_cut_the_tail() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    top_k = Sampler.resolve(SamplingParams(temperature=1.0, top_k=2, seed=1), SamplingParams())
    assert set(draws(top_k, logits, 200)) == {0, 1}
    top_p = Sampler.resolve(SamplingParams(temperature=1.0, top_p=0.7, seed=1), SamplingParams())
    assert set(draws(top_p, logits, 200)) == {0, 1}  # 0.5 alone < 0.7; 0.5 + 0.3 reaches it
    everything = Sampler.resolve(SamplingParams(temperature=1.0, seed=1), SamplingParams())
    assert set(draws(everything, logits, 400)) == {0, 1, 2, 3}


def test_rows_sample_independently_with_their_own_generators() -> None:
    logits = torch.zeros(3, 100)
    logits[1, 42] = 5.0
    seeded = Sampler.resolve(SamplingParams(temperature=1.0, seed=9), SamplingParams())
    greedy = Sampler.resolve(SamplingParams(temperature=0), SamplingParams())
    batch = sample(logits, [seeded, greedy, seeded], [seeded.generator(CPU) for _ in range(3)])
    alone = sample(logits[:1], [seeded], [seeded.generator(CPU)])
    assert batch[1] == 42
    assert batch[0] == batch[2] == alone[0]
