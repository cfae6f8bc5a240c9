"""Choosing the next token of each sequence from its logits, with its own parameters and generator.

Each sampled row is filtered and drawn on its own with the sequence's own torch.Generator, so a
seeded request gives the same tokens whichever batch it shares; greedy rows take one batched argmax.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch

from cortex.neuron.generation import (
    FALLBACK_MAX_TOKENS,
    FALLBACK_TEMPERATURE,
    FALLBACK_TOP_K,
    FALLBACK_TOP_P,
    SamplingParams,
)


@dataclass(frozen=True)
class Sampler:
    """A sequence's resolved sampling: request, then model defaults, then the fallbacks."""

    temperature: float
    top_p: float
    top_k: int
    max_tokens: int
    seed: int

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0 or self.top_k == 1

    @classmethod
    def resolve(cls, params: SamplingParams, defaults: SamplingParams) -> Sampler:
        def pick(name: str, fallback: float | int) -> float | int:
            for source in (params, defaults):
                value = getattr(source, name)
                if value is not None:
                    return value
            return fallback

        seed = params.seed if params.seed is not None else secrets.randbits(63)
        return cls(
            temperature=float(pick("temperature", FALLBACK_TEMPERATURE)),
            top_p=float(pick("top_p", FALLBACK_TOP_P)),
            top_k=int(pick("top_k", FALLBACK_TOP_K)),
            max_tokens=int(pick("max_tokens", FALLBACK_MAX_TOKENS)),
            seed=seed,
        )

    def generator(self, device: torch.device) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(self.seed)


def sample(
    logits: torch.Tensor, samplers: list[Sampler], generators: list[torch.Generator]
) -> list[int]:
    """Next token per row of logits [rows, vocab]; one host copy for the whole batch."""
    chosen = torch.argmax(logits, dim=-1)
    for row, sampler in enumerate(samplers):
        if not sampler.greedy:
            chosen[row] = _draw(logits[row], sampler, generators[row])
    return chosen.tolist()


def _draw(logits: torch.Tensor, sampler: Sampler, generator: torch.Generator) -> torch.Tensor:
    """One token from temperature-scaled, top-k and top-p filtered logits [vocab]."""
    scores = logits.float() / sampler.temperature
    if 0 < sampler.top_k < scores.shape[-1]:
        kth = torch.topk(scores, sampler.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampler.top_p < 1.0:
        ordered, order = torch.sort(scores, descending=True)
        probs = torch.softmax(ordered, dim=-1)
        # Drop tokens once the mass before them already reaches top_p; the best token always stays.
        drop = probs.cumsum(dim=-1) - probs >= sampler.top_p
        scores = scores.scatter(0, order, ordered.masked_fill(drop, float("-inf")))
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[0]
