"""Output tokens' logprobs in the OpenAI API's two shapes: chat's list of entries, and the legacy
completions' parallel lists. The engine measures them (sampling.raw_logprobs); this names each
token by its text."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from cortex.core.protocol.openai import (
    ChoiceLogprobs,
    CompletionLogprobs,
    ContentLogprob,
    TopLogprob,
)
from cortex.neuron.generation import TokenLogprob


class Tokens(Protocol):
    """How a served model names its tokens (ServedModel)."""

    def token_text(self, token: int) -> str: ...
    def token_bytes(self, token: int) -> bytes: ...


def chat_logprobs(tokens: Tokens, logprobs: Sequence[TokenLogprob]) -> ChoiceLogprobs:
    def entry(token: int, logprob: float) -> TopLogprob:
        text, raw = tokens.token_text(token), tokens.token_bytes(token)
        return TopLogprob(token=text, logprob=logprob, bytes=list(raw))

    content = [
        ContentLogprob(
            **entry(lp.token, lp.logprob).model_dump(),
            top_logprobs=[entry(token, value) for token, value in lp.top],
        )
        for lp in logprobs
    ]
    return ChoiceLogprobs(content=content)


def completion_logprobs(
    tokens: Tokens, logprobs: Sequence[TokenLogprob], offset: int, alternatives: int
) -> CompletionLogprobs:
    """`offset`: where the first token's text starts in the choice's text (after any echo)."""
    texts = [tokens.token_text(lp.token) for lp in logprobs]
    starts = []
    for text in texts:
        starts.append(offset)
        offset += len(text)
    top = [{tokens.token_text(token): value for token, value in lp.top} for lp in logprobs]
    return CompletionLogprobs(
        tokens=texts,
        token_logprobs=[lp.logprob for lp in logprobs],
        top_logprobs=top if alternatives else None,
        text_offset=starts,
    )
