"""Grammar-constrained decoding with llguidance: compiled grammars, per-sequence matchers, bitmasks.

A grammar is compiled once per (tokenizer, grammar) and kept in an LRU; every sequence gets a copy
of the compiled matcher. At each step the engine asks for the allowed tokens of its constrained
rows only and sets the others' logits to -inf (apply_bitmask); free rows cost nothing. Why
llguidance and not xgrammar: docs/architecture.md ("Structured outputs").
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import llguidance
import llguidance.hf
import torch

DEFAULT_CACHE_SIZE = 256
# Compact JSON, as json.dumps writes it: free whitespace lets a sampling model pad forever.
JSON_STYLE = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}
# Byte value -> the 8 logit offsets it stands for (bit j set: token allowed, 0; else -inf). The
# bitmask's int32 words are little-endian, so its bytes, unpacked bit by bit, follow token order.
_BYTE_OFFSETS = torch.tensor(
    [[0.0 if (byte >> bit) & 1 else float("-inf") for bit in range(8)] for byte in range(256)]
)
_OFFSETS_ON: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


class GrammarError(ValueError):
    """A grammar (or JSON schema) llguidance cannot enforce; the message names the problem."""


@dataclass(frozen=True)
class GrammarSpec:
    """What to enforce, as text: a JSON schema, or a Lark grammar (which may embed %json{...})."""

    kind: Literal["json_schema", "lark"]
    source: str

    @classmethod
    def json_schema(cls, schema: dict[str, Any]) -> GrammarSpec:
        # The schema's own key order: JSON output follows its properties in order (reasoning first).
        return cls("json_schema", json.dumps(schema, separators=(",", ":")))

    def grammar(self) -> str:
        """The llguidance grammar text (a JSON schema gets the compact JSON style)."""
        if self.kind == "lark":
            return llguidance.LLMatcher.grammar_from_lark(self.source)
        schema = json.loads(self.source)
        if isinstance(schema, dict):
            schema = {**schema, "x-guidance": {**JSON_STYLE, **schema.get("x-guidance", {})}}
        return llguidance.LLMatcher.grammar_from_json_schema(schema)


class Matcher:
    """One sequence's place in its grammar, advanced with each accepted token."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self._matcher = matcher

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into row `row` of a CPU bitmask [rows, words]."""
        if self._matcher.is_error():
            raise GrammarError(f"grammar matcher failed: {self._matcher.get_error()}")
        words = bitmask[row]
        if (
            bitmask.device.type != "cpu"
            or bitmask.dtype != torch.int32
            or not words.is_contiguous()
        ):
            raise ValueError("a bitmask row is contiguous int32 words in CPU memory")
        # What llguidance.torch.fill_next_token_bitmask does, without importing that module: it
        # declares a torch.compile kernel at import, which pulls in torch._dynamo and inductor
        # for a function cortex never calls (docs/benchmarks.md, P3: time to ready).
        self._matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * 4)

    def advance(self, token: int) -> str | None:
        """Accept a sampled token; the error if the grammar refuses it."""
        if self._matcher.consume_token(token):
            return None
        return self._matcher.get_error() or f"token {token} is not allowed by the grammar"

    @property
    def done(self) -> bool:
        """The grammar is complete and allows no further token (EOS included)."""
        return bool(self._matcher.is_stopped())


class CompiledGrammar:
    """A grammar compiled for one tokenizer: hands out fresh matchers cheaply."""

    def __init__(self, template: llguidance.LLMatcher) -> None:
        self._template = template

    def matcher(self) -> Matcher:
        return Matcher(self._template.deep_copy())


class GrammarCache:
    """LRU of compiled grammars keyed by (tokenizer, grammar); safe across threads."""

    def __init__(self, size: int = DEFAULT_CACHE_SIZE) -> None:
        self._size = size
        self._entries: OrderedDict[tuple[str, GrammarSpec], CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()

    def get(
        self, key: tuple[str, GrammarSpec], compile_: Callable[[], CompiledGrammar]
    ) -> tuple[CompiledGrammar, bool]:
        """The cached grammar, or a new one compiled (outside the lock); True when it was a hit."""
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None:
                self._entries.move_to_end(key)
                return hit, True
        compiled = compile_()
        with self._lock:
            self._entries[key] = compiled
            self._entries.move_to_end(key)
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)
        return compiled, False


_CACHE = GrammarCache()


class GrammarCompiler:
    """Compiles grammars for one model's tokenizer, through the process-wide cache."""

    def __init__(self, tokenizer: Any, vocab_size: int, key: str) -> None:
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
        self._key = key

    def compile(self, spec: GrammarSpec) -> tuple[CompiledGrammar, float | None]:
        """The compiled grammar and its compile seconds (None on a cache hit); GrammarError if bad."""
        started = time.perf_counter()
        compiled, hit = _CACHE.get((self._key, spec), lambda: self._compile(spec))
        return compiled, None if hit else time.perf_counter() - started

    def _compile(self, spec: GrammarSpec) -> CompiledGrammar:
        try:
            grammar = spec.grammar()
        except ValueError as exc:  # llguidance refuses some schemas before validation
            raise GrammarError(str(exc)) from exc
        problem = _problem(grammar, self._tokenizer)
        if problem is not None:
            raise GrammarError(problem)
        template = llguidance.LLMatcher(self._tokenizer, grammar)
        if template.is_error():
            raise GrammarError(template.get_error())
        return CompiledGrammar(template)


def _problem(grammar: str, tokenizer: Any) -> str | None:
    """llguidance's own check, which names what it cannot enforce; None for a sound grammar."""
    failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
    if failed or messages:  # warnings too: a keyword it would ignore is not enforced
        return "; ".join(messages) or "invalid grammar"
    return None


def apply_bitmask(logits: torch.Tensor, matchers: Sequence[Matcher | None]) -> None:
    """Set disallowed tokens' logits to -inf, in place, for the rows that have a matcher."""
    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return
    vocab = logits.shape[-1]
    bitmask = torch.zeros((len(rows), (vocab + 31) // 32), dtype=torch.int32)
    for slot, row in enumerate(rows):
        matcher = matchers[row]
        assert matcher is not None
        matcher.fill(bitmask, slot)
    key = (logits.device, logits.dtype)
    table = _OFFSETS_ON.get(key)
    if table is None:
        table = _OFFSETS_ON[key] = _BYTE_OFFSETS.to(device=logits.device, dtype=logits.dtype)
    byte_values = bitmask.view(torch.uint8).to(logits.device, non_blocking=True).long()
    offsets = table[byte_values].flatten(1)[:, :vocab]
    if len(rows) == logits.shape[0]:
        logits.add_(offsets)
    else:
        index = torch.tensor(rows, device=logits.device)
        logits.index_add_(0, index, offsets)
