"""KV reuse across requests: finished sequences leave their KV for prompts that start the same way.

A multi-turn chat re-sends the whole conversation and most prompts share a system prompt; the
longest stored prefix is copied into the new sequence's row and only the rest is prefilled.
Bounded by a token budget, least recently used first out.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from cortex.neuron.kv_cache import RowKV


@dataclass
class _Entry:
    tokens: torch.Tensor  # int64 on the CPU, for prefix comparison
    kv: RowKV  # per layer, on that layer's device


class PrefixCache:
    """Token sequences with their KV, looked up by longest common prefix."""

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max(0, max_tokens)
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._next_key = 0

    @property
    def tokens(self) -> int:
        return sum(len(e.tokens) for e in self._entries.values())

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for e in self._entries.values() for t in e.kv)

    def lookup(self, prompt: list[int]) -> tuple[RowKV, int] | None:
        """The stored KV sharing the longest prefix with `prompt`, and that prefix's length."""
        if not self._entries or not prompt:
            return None
        wanted = torch.tensor(prompt, dtype=torch.long)
        best_key, best = -1, 0
        for key, entry in self._entries.items():
            shared = _common_prefix(wanted, entry.tokens)
            if shared > best:
                best_key, best = key, shared
        if best == 0:
            return None
        self._entries.move_to_end(best_key)
        return self._entries[best_key].kv, best

    def store(self, tokens: list[int], read_kv: Callable[[int], RowKV]) -> None:
        """Keep `tokens` with their KV (read_kv(n) copies the first n tokens' KV) if worth it."""
        tokens = tokens[: self.max_tokens]
        if not tokens:
            return
        new = torch.tensor(tokens, dtype=torch.long)
        for key, entry in list(self._entries.items()):
            shared = _common_prefix(new, entry.tokens)
            if shared == len(new):  # already held by a longer (or equal) entry
                self._entries.move_to_end(key)
                return
            if shared == len(entry.tokens):  # the new one extends it
                del self._entries[key]
        self._entries[self._next_key] = _Entry(tokens=new, kv=read_kv(len(tokens)))
        self._next_key += 1
        while self.tokens > self.max_tokens:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()


def _common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(len(a), len(b))
    differ = (a[:n] != b[:n]).nonzero()
    return int(differ[0]) if len(differ) else n
