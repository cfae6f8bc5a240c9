"""Choosing the next token of each sequence from its logits, with its own parameters and generator.

Sampled rows are filtered and drawn together: temperature, then top-k, then top-p (the smallest
set of best tokens whose probability reaches top_p; the best token always stays), then one draw
from what is left, renormalised. Top-p works on a partial top-k of `CANDIDATES` tokens per row
instead of sorting the whole vocabulary, as vLLM and llama.cpp do; a row whose candidates hold less
than top_p of its probability is redone with more of them (up to the whole vocabulary), so the cap
never changes which tokens are kept. The one difference from filtering the whole sorted
vocabulary: top-k keeps exactly k tokens, where a token tied exactly with the k-th best logit was
kept too (exact float ties among the best logits; which of them stays is topk's choice).

Each sequence's own torch.Generator gives one uniform number per step, which picks the token by
inverse CDF over its row alone: a seeded request gives the same tokens whichever batch it shares.
Greedy rows take one batched argmax.

A repetition penalty (>1) first divides the positive logits and multiplies the negative ones of
the tokens among a row's last REPETITION_WINDOW, as Hugging Face's and llama.cpp's do. Only an
explicit penalty (request, catalogue, generation_config) reaches greedy rows: temperature 0 keeps
meaning the model's most likely continuation.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cortex.neuron.generation import (
    FALLBACK_MAX_TOKENS,
    FALLBACK_REPETITION_PENALTY,
    FALLBACK_TEMPERATURE,
    FALLBACK_TOP_K,
    FALLBACK_TOP_P,
    REPETITION_WINDOW,
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
    repetition_penalty: float = 1.0

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

        temperature = float(pick("temperature", FALLBACK_TEMPERATURE))
        top_k = int(pick("top_k", FALLBACK_TOP_K))
        greedy = temperature <= 0.0 or top_k == 1
        penalty = pick("repetition_penalty", 1.0 if greedy else FALLBACK_REPETITION_PENALTY)
        return cls(
            temperature=temperature,
            top_p=float(pick("top_p", FALLBACK_TOP_P)),
            top_k=top_k,
            max_tokens=int(pick("max_tokens", FALLBACK_MAX_TOKENS)),
            seed=params.seed if params.seed is not None else secrets.randbits(63),
            repetition_penalty=float(penalty),
        )

    def generator(self, device: torch.device) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(self.seed)


# Candidates per row before top-p: the tokens holding top_p of the mass are usually far fewer, and
# rows where they are not are widened by WIDEN until they are.
CANDIDATES = 64
WIDEN = 8


def sample(
    logits: torch.Tensor,
    samplers: list[Sampler],
    generators: list[torch.Generator],
    recent: Sequence[Sequence[int]] = (),
) -> list[int]:
    """Next token per row of logits [rows, vocab], which it may change; one host copy for the
    whole batch. `recent[row]` (see `recent_tokens`) is read by rows with a repetition penalty."""
    if recent:
        _penalise(logits, samplers, recent)
    rows = [row for row, sampler in enumerate(samplers) if not sampler.greedy]
    if not rows:
        return torch.argmax(logits, dim=-1).tolist()
    uniforms = torch.stack([_uniform(generators[row]) for row in rows]).to(logits.device)
    picked = [samplers[row] for row in rows]
    if len(rows) == len(samplers):  # no greedy row: spare the copy and the argmax
        return _draw(logits.float(), picked, uniforms).tolist()
    chosen = torch.argmax(logits, dim=-1)
    index = torch.tensor(rows, device=logits.device)
    chosen[index] = _draw(logits[index].float(), picked, uniforms)
    return chosen.tolist()


def recent_tokens(prompt: list[int], output: list[int]) -> list[int]:
    """A sequence's last REPETITION_WINDOW tokens, prompt included (llama.cpp's repeat_last_n)."""
    tail = output[-REPETITION_WINDOW:]
    missing = REPETITION_WINDOW - len(tail)
    return (prompt[-missing:] + tail) if missing and prompt else tail


def _penalise(
    logits: torch.Tensor, samplers: list[Sampler], recent: Sequence[Sequence[int]]
) -> None:
    """Penalise, in place, each penalised row's recent tokens (a history is never empty: the
    prompt has a token). Short histories are padded with their own first token: no-op repeats."""
    rows = [r for r, s in enumerate(samplers) if s.repetition_penalty != 1.0 and recent[r]]
    if not rows:
        return
    device = logits.device
    width = max(len(recent[r]) for r in rows)
    ids = torch.tensor(
        [[*recent[r], *[recent[r][0]] * (width - len(recent[r]))] for r in rows], device=device
    )
    penalty = torch.tensor([[samplers[r].repetition_penalty] for r in rows], device=device)
    at = torch.tensor(rows, device=device)
    picked = logits[at]
    scores = picked.gather(1, ids).float()
    scores = torch.where(scores > 0, scores / penalty, scores * penalty)
    logits[at] = picked.scatter_(1, ids, scores.to(picked.dtype))


def _uniform(generator: torch.Generator) -> torch.Tensor:
    """The sequence's one random number this step, in [0, 1)."""
    return torch.rand((), generator=generator, device=generator.device)


def _draw(logits: torch.Tensor, samplers: list[Sampler], uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row of float logits [rows, vocab], each row with its own sampler."""
    vocab, device = logits.shape[-1], logits.device
    temperature = torch.tensor([[s.temperature] for s in samplers], device=device)
    top_k = torch.tensor([s.top_k if 0 < s.top_k < vocab else vocab for s in samplers])
    top_p = torch.tensor([s.top_p for s in samplers])
    tokens = torch.empty(len(samplers), dtype=torch.long, device=device)
    whole = (top_k == vocab) & (top_p >= 1.0)  # nothing filtered: no sorting needed
    if whole.any():
        at = whole.nonzero().flatten().to(device)
        cumulative = torch.softmax(logits[at] / temperature[at], dim=-1).cumsum(dim=-1)
        tokens[at] = _inverse_cdf(cumulative, uniforms[at], None)
    pending = (~whole).nonzero().flatten()
    width = max([CANDIDATES, *(s.top_k for s in samplers if 0 < s.top_k < vocab)])
    while len(pending):
        width = min(width, vocab)
        every = len(pending) == len(samplers)
        at = pending.to(device)
        decided, picked = _draw_candidates(
            logits if every else logits[at],
            temperature[at],
            top_k[pending].to(device),
            top_p[pending].to(device),
            uniforms[at],
            width,
        )
        tokens[at[decided]] = picked[decided]
        pending = pending[~decided.cpu()]
        width *= WIDEN
    return tokens


def _mass(
    logits: torch.Tensor, best: torch.Tensor, temperature: torch.Tensor, unlimited: torch.Tensor
) -> torch.Tensor:
    """Per row, the whole vocabulary's weight relative to its best logit `best` [rows, 1]: what
    top-p without top-k renormalises over. 1 for the other rows, which never read it."""
    mass = torch.ones(len(logits), device=logits.device)
    if unlimited.any():
        at = unlimited.nonzero().flatten()
        rows = logits if len(at) == len(logits) else logits[at]
        mass[at] = (rows - best[at]).div_(temperature[at]).exp_().sum(dim=-1)
    return mass


def _draw_candidates(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    uniforms: torch.Tensor,
    width: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k, top-p and the draw over each row's `width` best tokens.

    Returns which rows were decided (their kept tokens all lie among the candidates) and the token
    of each decided row. Sums run left to right over the best-first candidates, so a row's result
    does not depend on `width` once it is decided, nor on the other rows.
    """
    vocab = logits.shape[-1]
    best, ids = torch.topk(logits, width, dim=-1)  # sorted, best first (temperature keeps order)
    in_top_k = torch.arange(width, device=logits.device) < top_k.unsqueeze(1)
    weights = (best - best[:, :1]).div_(temperature).exp_().masked_fill_(~in_top_k, 0.0)
    cumulative = weights.cumsum(dim=-1)
    limited = top_k < vocab
    # Top-k renormalises over the k best (all candidates); otherwise over the whole row.
    total = torch.where(
        limited, cumulative[:, -1], _mass(logits, best[:, :1], temperature, ~limited)
    )
    # A token stays while the mass before it is below top_p (the best token always stays).
    kept = (cumulative - weights < top_p.unsqueeze(1) * total.unsqueeze(1)) & in_top_k
    decided = limited | (width == vocab) | ~kept[:, -1]
    column = _inverse_cdf(cumulative, uniforms, kept)
    return decided, ids.gather(1, column.unsqueeze(1)).squeeze(1)


def _inverse_cdf(
    cumulative: torch.Tensor, uniforms: torch.Tensor, kept: torch.Tensor | None
) -> torch.Tensor:
    """Column per row where the kept prefix's cumulative weight first exceeds uniform * its total."""
    if kept is None:
        total = cumulative[:, -1]
        last = torch.full_like(uniforms, cumulative.shape[-1] - 1, dtype=torch.long)
    else:
        last = kept.sum(dim=-1) - 1
        total = cumulative.gather(1, last.unsqueeze(1)).squeeze(1)
    target = (uniforms * total).unsqueeze(1)
    column = torch.searchsorted(cumulative, target, right=True).squeeze(1)
    return torch.minimum(column, last)
