"""Output tokens' logprobs in the OpenAI API's two shapes: chat's list of entries, and the legacy
completions' parallel lists. The engine measures them (sampling.raw_logprobs); this names each
token by its text."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import Any, Protocol

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
    def named(token: int) -> dict[str, Any]:
        return {"token": tokens.token_text(token), "bytes": list(tokens.token_bytes(token))}

    content = [
        ContentLogprob(
            **named(lp.token),
            logprob=lp.logprob,
            top_logprobs=[TopLogprob(**named(token), logprob=value) for token, value in lp.top],
        )
        for lp in logprobs
    ]
    return ChoiceLogprobs(content=content)


def completion_logprobs(
    tokens: Tokens, logprobs: Sequence[TokenLogprob], offset: int, alternatives: int
) -> CompletionLogprobs:
    """`offset`: where the output starts in the choice's text (after any echo). A token's own
    offset is where its text starts in the output as released, not a sum of token texts: part
    of a character is named U+FFFD, but only the whole character is in the text."""
    texts = [tokens.token_text(lp.token) for lp in logprobs]
    starts = [offset + lp.offset for lp in logprobs]
    top = [{tokens.token_text(token): value for token, value in lp.top} for lp in logprobs]
    return CompletionLogprobs(
        tokens=texts,
        token_logprobs=[lp.logprob for lp in logprobs],
        top_logprobs=top if alternatives else None,
        text_offset=starts,
    )


def token_bytes(tokenizer: Any, token: int, text: str) -> bytes:
    """The bytes a token stands for, `text` being its decoded text. Byte-level BPE (GPT-2,
    SmolLM2, Llama 3, Qwen) spells each byte as one printable character; SentencePiece spells
    a byte it has no piece for as <0xNN> and a space as U+2581. Other tokens: their text."""
    piece = tokenizer.convert_ids_to_tokens(token)
    if not isinstance(piece, str):
        return text.encode()
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            return bytes([int(piece[3:5], 16)])
        except ValueError:
            pass
    byte_of = _byte_level()
    if "\ufffd" in text and all(c in byte_of for c in piece):
        return bytes(byte_of[c] for c in piece)
    return text.encode()


@cache
def _byte_level() -> dict[str, int]:
    """Byte-level BPE's character for each byte, reversed (transformers' own table)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {char: byte for byte, char in bytes_to_unicode().items()}
