"""Turning a sequence's new tokens into client text: incremental decoding, then stop strings.

Decoding re-reads only a short window of recent tokens, and holds text back while it ends in an
incomplete character; stop matching holds back any tail that could still grow into a stop string.
ShownTokens says which tokens' logprobs go with the text that stop matching lets out.
"""

from __future__ import annotations

import dataclasses
from collections import deque

from transformers import PreTrainedTokenizerBase

from cortex.neuron.generation import TokenLogprob

# Prompt tokens decoded ahead of the first new token, so tokenizers that drop a leading space
# at the start of a decode (SentencePiece) still give the first token its space.
_PROMPT_CONTEXT = 5
_INCOMPLETE = "\ufffd"


class Detokenizer:
    """Incremental decode: each call returns the text new tokens completed, never a broken char."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int]) -> None:
        self._tokenizer = tokenizer
        self._ids = list(prompt_ids[-_PROMPT_CONTEXT:])
        self._prefix = 0  # window start: tokens before it are settled
        self._read = len(self._ids)  # tokens up to here have been turned into text

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes ("" while a character is unfinished)."""
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """The text still held back (an incomplete character at the very end), for the last delta."""
        return self._advance(final=True)

    def _advance(self, *, final: bool) -> str:
        settled = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        if len(text) <= len(settled) or (text.endswith(_INCOMPLETE) and not final):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(settled) :]


class StopMatcher:
    """Cuts text at the first stop string; holds back a tail that may be a stop string's start."""

    def __init__(self, stops: tuple[str, ...], *, keep: bool = False) -> None:
        self._stops = tuple(s for s in stops if s)
        self._keep = keep  # the matched stop string is part of the text (vLLM's option)
        self._held = ""
        self.matched: str | None = None

    def feed(self, text: str) -> str:
        """Return the text that is safe to emit; after a match, `matched` is set and all else dropped."""
        if self.matched is not None:
            return ""
        pending = self._held + text
        hits = [(pending.find(s), s) for s in self._stops]
        hits = [(at, s) for at, s in hits if at >= 0]
        if hits:
            at, self.matched = min(hits)
            self._held = ""
            return pending[: at + len(self.matched) if self._keep else at]
        keep = self._partial_tail(pending)
        self._held = pending[len(pending) - keep :]
        return pending[: len(pending) - keep]

    def flush(self) -> str:
        """Release the held tail: the sequence ended without it becoming a stop string."""
        held, self._held = self._held, ""
        return held

    def _partial_tail(self, text: str) -> int:
        """Length of the longest end of `text` that some stop string starts with."""
        longest = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest


class ShownTokens:
    """Which tokens the text let out so far shows, so each token's logprob goes with the delta
    that shows its first character, and a token whose text begins at or after a stop string's
    cut, or shows nothing at all (end of sequence), has none (docs/architecture.md)."""

    def __init__(self) -> None:
        self._written = 0  # characters decoded, before stop matching
        self._shown = 0  # characters let out to the client
        self._pending: deque[tuple[int, TokenLogprob]] = deque()  # (where its text starts, it)

    def wrote(self, text: str, logprob: TokenLogprob | None = None) -> None:
        """The detokenizer gave `text` for a token (`logprob`), or at the end for none."""
        if logprob is not None:
            self._pending.append((self._written, logprob))
        self._written += len(text)

    def show(self, text: str) -> tuple[TokenLogprob, ...]:
        """`text` is let out: the logprobs of the tokens it begins to show, each with its
        `offset`, where its text starts in the output."""
        self._shown += len(text)
        shown = []
        while self._pending and self._pending[0][0] < self._shown:
            start, logprob = self._pending.popleft()
            shown.append(dataclasses.replace(logprob, offset=start))
        return tuple(shown)
