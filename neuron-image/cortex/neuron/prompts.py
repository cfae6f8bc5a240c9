"""Prompt preparation: chat rendering and tokenization, off the event loop and bounded, so that one
huge prompt never stalls the streams beside it (docs/architecture.md, "Bad input").

Three bounds, cheapest first:
- size: a prompt of more characters than `context × MAX_CHARS_PER_TOKEN` cannot fit and is refused
  before any work;
- place: rendering and tokenizing run on this pool's threads, never on the event loop and never on
  a device worker (its thread is for forward passes);
- time: a request whose preparation runs past `prompt_timeout` is answered with a 400 (the thread
  finishes its work unobserved; the size bound keeps that work short).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from cortex.core.errors import ContextLengthExceeded, InvalidRequest, NeuronUnavailable

T = TypeVar("T")

# Far more characters than any token of the served tokenizers covers (byte-level BPE pieces are a
# few bytes on average, the longest a few dozen): text past context × 32 cannot fit the context.
MAX_CHARS_PER_TOKEN = 32
PROMPT_THREADS = 4


class PromptPool:
    """The threads prompts are prepared on, and the size and time bounds every request keeps."""

    def __init__(self, timeout: float, threads: int = PROMPT_THREADS) -> None:
        self.timeout = timeout
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="prompt")

    @staticmethod
    def check_size(chars: int, context: int, param: str) -> None:
        """Refuse at once a prompt too long to fit the context whatever its tokenization."""
        limit = context * MAX_CHARS_PER_TOKEN
        if chars > limit:
            raise ContextLengthExceeded(
                f"The prompt has {chars} characters; this model's context of {context} tokens "
                f"cannot hold more than {limit} ({MAX_CHARS_PER_TOKEN} per token). Please reduce "
                "the length of the prompt.",
                param=param,
            )

    async def run(self, prepare: Callable[[], T], param: str) -> T:
        """`prepare()` on a pool thread, awaited for at most `timeout` seconds."""
        try:
            future = self._pool.submit(prepare)
        except RuntimeError:  # the pool is closed: the neuron is shutting down
            raise NeuronUnavailable("the neuron is shutting down", retry_after=1.0) from None
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.timeout)
        except TimeoutError:
            if future.cancelled():  # it never started: other prompts hold every thread
                raise NeuronUnavailable(
                    "busy preparing other prompts", retry_after=max(1.0, self.timeout / 2)
                ) from None
            raise InvalidRequest(
                f"preparing the prompt took longer than {self.timeout:g}s; send a shorter prompt",
                param=param,
            ) from None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def require_unicode(text: str, param: str | None = None) -> None:
    """Tokenizers reject lone surrogates (a TypeError deep inside): refuse them as a 400 first."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(
            "the text contains a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape); "
            "it is not valid Unicode",
            param=param,
        ) from None
