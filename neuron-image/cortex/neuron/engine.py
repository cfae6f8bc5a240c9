"""The generation engine: continuous batching of one model's sequences on its device thread.

Design (measured on CPU with SmolLM2-135M, see tests/neuron/test_engine.py): a decode step costs
about the same for 1 sequence as for 16, so every step runs ONE forward for all decoding sequences.
Their KV lives in one BatchKVCache, a row per sequence; each row keeps its own length, and the
attention mask plus explicit position_ids let rows of different lengths share the forward. Joining
costs nothing (the new row is prefilled in place), leaving moves the last row into the hole: no
per-step stacking or re-padding of KV, which would copy every sequence's cache on every token.
Prompts are prefilled in chunks of at most `prefill_chunk` tokens per step, so a long prompt
delays the running streams by one chunk per step instead of stalling them for the whole prompt.
Needs an attention implementation that honours a 4D mask (sdpa or eager, not flash-attention).
"""

from __future__ import annotations

import inspect
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cortex.neuron.detokenizer import Detokenizer, StopMatcher
from cortex.neuron.generation import Finished, GenerationEvent, SamplingParams, TextDelta
from cortex.neuron.kv_cache import BatchKVCache
from cortex.neuron.sampling import Sampler, sample

DEFAULT_PREFILL_CHUNK = 256
_MASKED_ATTENTION = {"sdpa", "eager"}


class Sequence:
    """One request inside the engine."""

    def __init__(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        emit: Callable[[GenerationEvent], None],
    ) -> None:
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.emit = emit
        self.output_ids: list[int] = []
        self.cached_tokens = 0
        self.finished = False
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Thread-safe: the engine drops the sequence at its next step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


@dataclass
class _Active:
    """Engine-side state of an admitted sequence."""

    seq: Sequence
    sampler: Sampler
    generator: torch.Generator
    detokenizer: Detokenizer
    stops: StopMatcher
    kv_length: int = 0  # this sequence's tokens in the cache
    pending: int = field(default=-1)  # last sampled token, fed at the next decode step


class Engine:
    """Runs one model's sequences in a shared batch, one step at a time, on the worker thread."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        device: torch.device,
        max_running: int,
        defaults: SamplingParams,
        eos_token_ids: set[int],
        context_length: int,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    ) -> None:
        attention = getattr(model.config, "_attn_implementation", "eager")
        if attention not in _MASKED_ATTENTION:
            raise ValueError(f"engine needs sdpa or eager attention, model uses {attention!r}")
        self._model, self._tokenizer, self._device = model, tokenizer, device
        self._max_running, self._defaults = max_running, defaults
        self._eos, self._context_length = set(eos_token_ids), context_length
        self._prefill_chunk = max(1, prefill_chunk)
        self._cache = BatchKVCache.for_model(
            model, max_rows=max_running, max_length=context_length, device=device
        )
        # transformers 5 renamed the forward's `past_key_values` to `cache`.
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._waiting: deque[Sequence] = deque()
        self._decoding: list[_Active] = []  # row i of the cache holds _decoding[i]
        self._prefilling: _Active | None = None  # row len(_decoding), part way through its prompt

    # -- the worker's interface --------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        """Queue a sequence; it is admitted and prefilled at a step boundary."""
        self._waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self._waiting or self._decoding or self._prefilling)

    @property
    def running(self) -> int:
        return len(self._decoding) + (self._prefilling is not None)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def kv_bytes_per_token(self) -> int:
        return self._cache.bytes_per_token

    def kv_bytes(self) -> int:
        """Device memory the KV cache holds now (allocated, including room to grow)."""
        return self._cache.allocated_bytes

    @torch.inference_mode()
    def step(self) -> None:
        """Drop cancelled sequences, prefill (one chunk budget), then one decode for all running."""
        self._drop_cancelled()
        self._prefill()
        if self._decoding:
            self._decode()
        live = [*self._decoding, *([self._prefilling] if self._prefilling else [])]
        self._cache.shrink(len(live), max((a.kv_length + 1 for a in live), default=0))

    def fail_all(self, message: str) -> None:
        """Finish every sequence with an error (after a failed step, or on unload)."""
        live = [*self._decoding, *([self._prefilling] if self._prefilling else [])]
        self._decoding, self._prefilling = [], None
        for active in live:
            self._emit_finished(active.seq, "error", error=message)
        while self._waiting:
            self._emit_finished(self._waiting.popleft(), "error", error=message)
        self._cache.shrink(0, 0)

    # -- steps -------------------------------------------------------------------------------

    def _drop_cancelled(self) -> None:
        for seq in [s for s in self._waiting if s.cancelled]:
            self._waiting.remove(seq)
            self._emit_finished(seq, "cancelled")
        live = [*self._decoding, *([self._prefilling] if self._prefilling else [])]
        for active in live:
            if active.seq.cancelled:
                self._finish(active, "cancelled")

    def _prefill(self) -> None:
        """Spend up to one chunk of prompt tokens on the admitted, then the waiting, sequences."""
        budget = self._prefill_chunk
        while budget > 0:
            active = self._prefilling or self._admit()
            if active is None:
                return
            prompt, start = active.seq.prompt_ids, active.kv_length
            chunk = prompt[start : start + budget]
            row = len(self._decoding)
            logits = self._forward(slice(row, row + 1), [chunk], [start])
            active.kv_length += len(chunk)
            budget -= len(chunk)
            if active.kv_length == len(prompt):
                # Its row is len(_decoding): appending makes it a decoding sequence in place.
                self._prefilling = None
                self._decoding.append(active)
                token = sample(logits, [active.sampler], [active.generator])[0]
                self._accept(active, token)

    def _admit(self) -> _Active | None:
        """Take the next valid waiting sequence into the batch, if a row is free."""
        while self._waiting and self.running < self._max_running:
            seq = self._waiting.popleft()
            sampler = Sampler.resolve(seq.params, self._defaults)
            problem = self._refuse(seq, sampler)
            if problem is not None:
                self._emit_finished(seq, "error", error=problem)
                continue
            self._prefilling = _Active(
                seq=seq,
                sampler=sampler,
                generator=sampler.generator(self._device),
                detokenizer=Detokenizer(self._tokenizer, seq.prompt_ids),
                stops=StopMatcher(seq.params.stop),
            )
            return self._prefilling
        return None

    def _refuse(self, seq: Sequence, sampler: Sampler) -> str | None:
        """Why a sequence cannot run at all (the runtime should have refused it already)."""
        if not seq.prompt_ids:
            return "empty prompt"
        if len(seq.prompt_ids) >= self._context_length:
            return (
                f"prompt of {len(seq.prompt_ids)} tokens leaves no room in the context length "
                f"of {self._context_length}"
            )
        if sampler.max_tokens < 1:
            return "max_tokens must be at least 1"
        return None

    def _decode(self) -> None:
        """One batched forward: every decoding sequence feeds its pending token."""
        batch = list(self._decoding)
        logits = self._forward(
            slice(0, len(batch)), [[a.pending] for a in batch], [a.kv_length for a in batch]
        )
        for active in batch:
            active.kv_length += 1
        tokens = sample(logits, [a.sampler for a in batch], [a.generator for a in batch])
        for active, token in zip(batch, tokens, strict=True):
            self._accept(active, token)

    def _forward(self, rows: slice, tokens: list[list[int]], starts: list[int]) -> torch.Tensor:
        """Run the model on equal-length token lists for `rows`; logits of each row's last token."""
        ids = torch.tensor(tokens, dtype=torch.long, device=self._device)
        offsets = torch.arange(ids.shape[1], device=self._device)
        positions = torch.tensor(starts, device=self._device).unsqueeze(1) + offsets
        kv_length = max(starts) + ids.shape[1]
        self._cache.reserve(rows.stop, kv_length)
        self._cache.bind(rows, positions, kv_length)
        # Row i, query j may see keys up to its own position: causal within, and blind to the
        # stale tail of shorter rows.
        visible = torch.arange(kv_length, device=self._device) <= positions.unsqueeze(-1)
        dtype = self._model.dtype
        mask = torch.zeros(visible.shape, dtype=dtype, device=self._device)
        mask = mask.masked_fill(~visible, torch.finfo(dtype).min).unsqueeze(1)
        out = self._model(
            input_ids=ids,
            position_ids=positions,
            attention_mask=mask,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_arg: self._cache},
        )
        return out.logits[:, -1, :]

    # -- tokens, text and endings ------------------------------------------------------------

    def _accept(self, active: _Active, token: int) -> None:
        """Record a sampled token, emit the text it completes, finish the sequence if it ends."""
        seq = active.seq
        seq.output_ids.append(token)
        active.pending = token
        count = len(seq.output_ids)
        reason: Literal["stop", "length"] | None = None
        text = ""
        if token in self._eos:
            reason = "stop"
        else:
            text = active.stops.feed(active.detokenizer.add(token))
            if active.stops.matched is not None:
                reason = "stop"
        if reason is None and (
            count >= active.sampler.max_tokens
            or len(seq.prompt_ids) + count >= self._context_length
        ):
            reason = "length"
        if reason is not None and active.stops.matched is None:
            text += active.stops.feed(active.detokenizer.flush())
            text += active.stops.flush()
            if active.stops.matched is not None:
                reason = "stop"
        if text:
            seq.emit(TextDelta(text=text, completion_tokens=count))
        if reason is not None:
            self._finish(active, reason)

    def _finish(self, active: _Active, reason: Literal["stop", "length", "cancelled"]) -> None:
        self._release(active)
        self._emit_finished(active.seq, reason, stop_sequence=active.stops.matched)

    def _release(self, active: _Active) -> None:
        """Free the sequence's row, keeping decoding rows contiguous from row 0."""
        if active is self._prefilling:
            self._prefilling = None
            return
        row = self._decoding.index(active)
        last = self._decoding.pop()
        if last is not active:
            self._cache.move_row(len(self._decoding), row, last.kv_length)
            self._decoding[row] = last
        if self._prefilling is not None and self._prefilling.kv_length > 0:
            new_row = len(self._decoding)
            self._cache.move_row(new_row + 1, new_row, self._prefilling.kv_length)

    def _emit_finished(
        self,
        seq: Sequence,
        reason: Literal["stop", "length", "cancelled", "error"],
        error: str | None = None,
        stop_sequence: str | None = None,
    ) -> None:
        if seq.finished:
            return
        seq.finished = True
        seq.emit(
            Finished(
                reason=reason,
                prompt_tokens=len(seq.prompt_ids),
                completion_tokens=len(seq.output_ids),
                cached_tokens=seq.cached_tokens,
                error=error,
                stop_sequence=stop_sequence,
            )
        )
