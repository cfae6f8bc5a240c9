"""What the HTTP layer asks of the engine, and what the engine streams back.

The seam between the neuron's API (server.py) and its runtime (runtime.py, engine, device workers):
the API turns requests into a prompt (token ids) plus SamplingParams, and reads a stream of
GenerationEvents. Stop strings are applied by the engine, so stopped text never leaves it; so is a
grammar, compiled by the API (a refusal is a 400 before admission) and enforced at every step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from cortex.neuron.grammar import CompiledGrammar

# Used when neither the request, the catalogue's defaults nor the model's generation_config sets
# a value: a temperature that keeps small models coherent, not 1.0, and (for sampled rows only) a
# mild penalty on the last REPETITION_WINDOW tokens, as llama.cpp and Ollama ship.
FALLBACK_TEMPERATURE = 0.7
FALLBACK_TOP_P = 1.0
FALLBACK_TOP_K = 0  # 0 = off
FALLBACK_MIN_P = 0.0  # 0 = off
FALLBACK_REPETITION_PENALTY = 1.1
FALLBACK_MAX_TOKENS = 512
REPETITION_WINDOW = 64


@dataclass(frozen=True)
class SamplingParams:
    """Per-sequence sampling; None means: the model's defaults, then the fallback."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    # vLLM's: keep the tokens at least min_p times as likely as the best one (after temperature).
    min_p: float | None = None
    repetition_penalty: float | None = None
    # OpenAI's: subtracted from a token's logit once it is in the output (presence), or per time
    # it is (frequency); and token id -> a bias added to its logit. The request's own only.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    # Report each output token's log-probability and this many of the most likely alternatives
    # (0-20); None: report none.
    logprobs: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # vLLM's: end-of-sequence and stop_token_ids end nothing before min_tokens; ignore_eos: EOS
    # never ends; stop_token_ids end as EOS does; include_stop: the matched stop string is kept.
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    include_stop: bool = False
    # The output must follow this grammar (structured output, forced tool calls): grammar.py.
    grammar: CompiledGrammar | None = None


@dataclass(frozen=True)
class TokenLogprob:
    """An output token's log-probability under the model (its raw distribution: before the
    temperature, penalties, bias and any grammar), with the most likely alternatives."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token, logprob), most likely first
    offset: int = 0  # where its text starts in the output text, in characters


@dataclass(frozen=True)
class TextDelta:
    """New text for the client (already cleared of stop strings and partial UTF-8)."""

    text: str
    completion_tokens: int  # total so far
    cached_tokens: int = 0  # prompt tokens served from the prefix cache (known from the first)
    # Of the tokens whose text this delta completes, when the request asked for them. Tokens
    # that never show (end of sequence, a stop string) have none.
    logprobs: tuple[TokenLogprob, ...] = ()
    choice: int = 0  # which of the request's `n` choices it belongs to


@dataclass(frozen=True)
class Finished:
    """The last event of every generation."""

    reason: Literal["stop", "length", "cancelled", "error"]
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    error: str | None = None
    stop_sequence: str | None = None  # which request stop string ended it (reason "stop")
    choice: int = 0  # which of the request's `n` choices ended


GenerationEvent = TextDelta | Finished

# A seed is taken modulo 2**64, as torch's generators take it.
SEED_SPACE = 2**64


def choice_params(params: SamplingParams, choice: int) -> SamplingParams:
    """The sampling of a request's `choice`-th choice: with a seed, choice i draws from its own
    generator seeded `seed + i`, so the choices differ and the whole answer repeats (choice 0 is
    what the same request with n=1 gives); without one, each draws its own random seed."""
    if params.seed is None or choice == 0:
        return params
    return dataclasses.replace(params, seed=(params.seed + choice) % SEED_SPACE)
