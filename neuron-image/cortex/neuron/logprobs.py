"""Output tokens' logprobs in the OpenAI API's two shapes: chat's list of entries, and the legacy
completions' parallel lists. The engine measures them (sampling.raw_logprobs); this names each
token by its text."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from cortex.core.protocol.openai import (
    ChoiceLogprobs,
    CompletionLogprobs,
    ContentLogprob,
    TopLogprob,
)
from cortex.neuron.generation import TokenLogprob

TextOf = Callable[[int], str]


def chat_logprobs(text_of: TextOf, logprobs: Sequence[TokenLogprob]) -> ChoiceLogprobs:
    def entry(token: int, logprob: float) -> TopLogprob:
        text = text_of(token)
        return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))

    content = [
        ContentLogprob(
            **entry(lp.token, lp.logprob).model_dump(),
            top_logprobs=[entry(token, value) for token, value in lp.top],
        )
        for lp in logprobs
    ]
    return ChoiceLogprobs(content=content)


def completion_logprobs(
    text_of: TextOf, logprobs: Sequence[TokenLogprob], offset: int, alternatives: int
) -> CompletionLogprobs:
    """`offset`: where the first token's text starts in the choice's text (after any echo)."""
    tokens = [text_of(lp.token) for lp in logprobs]
    starts = []
    for text in tokens:
        starts.append(offset)
        offset += len(text)
    top = [{text_of(token): value for token, value in lp.top} for lp in logprobs]
    return CompletionLogprobs(
        tokens=tokens,
        token_logprobs=[lp.logprob for lp in logprobs],
        top_logprobs=top if alternatives else None,
        text_offset=starts,
    )
