"""The generation engine: continuous batching of one model's sequences on its device thread.

Design (measured on CPU with SmolLM2-135M, see tests/neuron/test_engine.py): a decode step costs
about the same for 1 sequence as for 16, so every step runs ONE forward for all decoding sequences.
Their KV sits in length bands (kv_bands.py, decode_rows.py): rows of similar length share a cache,
each row keeps its own length, and attention runs once per band, so a short row never attends
over a long one's padding. A leaving sequence's row is refilled by moving its band's last row
into it: no per-step stacking or re-padding of KV.
Prompts are prefilled apart (a staging cache each), at most `prefill_chunk` tokens per step, packed
into one unpadded forward, shortest first; a finished prompt's KV is copied into its band once.
KV admission counts what sequences really hold, prompt plus generated so far (kv_budget.py): new
work waits when the budget is full, and when growing sequences overrun it the newest are
preempted: their KV is dropped (kept as a prefix when it fits) and recomputed when they resume.
So a long prompt delays the running streams by one chunk per step instead of stalling them, and a
short prompt arriving meanwhile is not queued behind it. A finished sequence leaves its KV as a
prefix for later prompts that start the same way (prefix_cache.py). The tensor work (inputs,
masks, the forward itself) is model_runner.py's.
One sequence's failure is its own: when a batched forward or sampling raises, the step is run
again for each sequence alone, only the ones that still fail end with an error, and the others
go on (a device fault is different: it is re-raised for the worker to poison the device).
A sequence with a grammar gets its disallowed tokens masked out of its logits row before sampling
(grammar.py); it ends when the grammar is complete, and EOS is allowed only then.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cortex.neuron import kv_budget
from cortex.neuron.decode_rows import DecodeRows
from cortex.neuron.detokenizer import Detokenizer, ShownTokens, StopMatcher
from cortex.neuron.devices import is_device_fault
from cortex.neuron.generation import (
    Finished,
    GenerationEvent,
    SamplingParams,
    TextDelta,
    TokenLogprob,
)
from cortex.neuron.grammar import Matcher, apply_bitmask
from cortex.neuron.model_runner import ModelRunner
from cortex.neuron.prefix_cache import PrefixCache
from cortex.neuron.sampling import (
    Sampler,
    picked_logprobs,
    raw_logprobs,
    recent_tokens,
    sample,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_PREFILL_CHUNK = 256
DEFAULT_PREFIX_CACHE_TOKENS = 4096


class Sequence:
    """One request inside the engine."""

    def __init__(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        emit: Callable[[GenerationEvent], None],
        followers: list[Sequence] | None = None,
    ) -> None:
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.emit = emit
        # The other choices of one request (same prompt): queued once this one's prompt is in
        # the cache, so they take its KV from the prefix cache instead of prefilling it again.
        self.followers = list(followers or [])
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


@dataclass(eq=False)  # identity: rows are found by the object
class _Active:
    """Engine-side state of an admitted sequence."""

    seq: Sequence
    sampler: Sampler
    generator: torch.Generator
    detokenizer: Detokenizer
    stops: StopMatcher
    kv_length: int = 0  # this sequence's tokens in the cache
    row: int = -1  # staging row while prefilling (decoding: its row in its band)
    band: int = -1  # decoding: its length band
    pending: int = field(default=-1)  # last sampled token, fed at the next decode step
    order: int = 0  # admission order: the newest are preempted first
    matcher: Matcher | None = None  # its place in its grammar, if its output is constrained
    shown: ShownTokens = field(default_factory=ShownTokens)  # whose logprobs the text carries


@dataclass(frozen=True)
class EngineLoad:
    """What an engine holds, as the event loop may read it: the worker thread publishes a new
    one whenever its sequences change (a step, an add), never a half-changed picture."""

    running: int = 0  # sequences in the batch: prefilling or decoding
    waiting: int = 0  # added but held back (no KV room, or preempted), none running yet
    preemptions: int = 0  # sequences preempted for KV room since the engine began


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
        prefix_cache_tokens: int = DEFAULT_PREFIX_CACHE_TOKENS,
        kv_budget_tokens: int | None = None,
    ) -> None:
        self._runner = ModelRunner(
            model, device=device, max_rows=max_running, max_length=context_length
        )
        self._tokenizer, self._device = tokenizer, device
        self._max_running, self._defaults = max_running, defaults
        self._eos, self._context_length = set(eos_token_ids), context_length
        self._vocab = model.get_input_embeddings().num_embeddings
        self._prefill_chunk = max(1, prefill_chunk)
        self._prefixes = PrefixCache(prefix_cache_tokens)
        # KV tokens running sequences may hold together (prompt + generated so far, in blocks):
        # the KV memory the runtime reserved for this model.
        self._kv_budget = kv_budget_tokens
        self._waiting: deque[Sequence] = deque()
        self._preempted: list[_Active] = []  # KV dropped for room; resumed first, oldest first
        self._decoding: DecodeRows[_Active] = DecodeRows(self._runner)
        self._prefilling: list[_Active] = []  # admitted, prompt not all in the cache; oldest first
        self._admitted = 0
        self._closed: str | None = None  # why, once closed
        self._preemptions = 0
        self.load = EngineLoad()  # read from the event loop (metrics), replaced here

    # -- the worker's interface --------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        """Queue a sequence; it is admitted and prefilled at a step boundary. A closed engine
        finishes it at once: nothing steps it any more."""
        if self._closed is not None:
            self._emit_finished(seq, "cancelled", error=self._closed)
            while self._waiting:  # its followers
                self._emit_finished(self._waiting.popleft(), "cancelled", error=self._closed)
            return
        self._waiting.append(seq)
        self._publish()

    def has_work(self) -> bool:
        return bool(self._waiting or self._preempted or self._decoding or self._prefilling)

    @property
    def running(self) -> int:
        return len(self._decoding) + len(self._prefilling)

    @property
    def waiting(self) -> int:
        return len(self._waiting) + len(self._preempted)

    @property
    def kv_tokens_held(self) -> int:
        """KV tokens the running sequences hold against the budget (in whole blocks)."""
        return kv_budget.held([_holds(a) for a in self._live()])

    @property
    def kv_bytes_per_token(self) -> int:
        return self._runner.kv_bytes_per_token

    def kv_bytes(self) -> int:
        """Device memory held for KV now: running sequences (with room to grow) and kept prefixes."""
        return self._runner.kv_bytes + self._prefixes.bytes

    @torch.inference_mode()
    def step(self) -> None:
        """Drop cancelled sequences, prefill (one chunk budget), then one decode for all running."""
        try:
            self._drop_cancelled()
            self._prefill()
            if self._decoding:
                self._decode()
            self._decoding.shrink()
        finally:
            self._publish()

    def fail_all(self, message: str, reason: Literal["error", "cancelled"] = "error") -> None:
        """Finish every sequence: an error after a failed step, cancelled when the neuron drops
        them though they did nothing wrong (an unload: another replica may serve them)."""
        live = [*self._live(), *self._preempted]
        self._decoding.clear()
        self._prefilling, self._preempted = [], []
        for active in live:
            self._emit_finished(active.seq, reason, error=message)
        while self._waiting:
            self._emit_finished(self._waiting.popleft(), reason, error=message)
        self._prefixes.clear()
        self._publish()

    def close(self, message: str) -> None:
        """Finish every sequence, and every one added later (its model is being unloaded)."""
        self._closed = message
        self.fail_all(message, "cancelled")

    def _publish(self) -> None:
        self.load = EngineLoad(self.running, self.waiting, self._preemptions)

    # -- steps -------------------------------------------------------------------------------

    def _live(self) -> list[_Active]:
        return [*self._decoding, *self._prefilling]

    def _by_age(self) -> list[_Active]:
        return sorted(self._live(), key=lambda a: a.order)

    def _drop_cancelled(self) -> None:
        for seq in [s for s in self._waiting if s.cancelled]:
            self._waiting.remove(seq)
            self._emit_finished(seq, "cancelled")
        for active in [a for a in self._preempted if a.seq.cancelled]:
            self._preempted.remove(active)
            self._emit_finished(active.seq, "cancelled")
        for active in self._live():
            if active.seq.cancelled:
                self._finish(active, "cancelled")

    def _prefill(self) -> None:
        """Spend up to one chunk budget of prompt tokens in one packed forward."""
        admitted = 0
        while (self._waiting or self._preempted) and admitted < self._prefill_chunk:
            active = self._admit()
            if active is None:
                break
            admitted += _remaining(active)
        plan = self._plan_prefill()
        if not plan:
            return
        try:
            self._prefill_chunks(plan)
        except Exception as exc:
            if is_device_fault(exc):
                raise
            self._isolate(plan, self._prefill_chunks, exc)

    def _prefill_chunks(self, plan: list[tuple[_Active, int]]) -> None:
        """One packed forward over the plan's chunks; prompts it completes join the batch."""
        logits = self._runner.prefill(
            [(a.row, a.kv_length, _feed(a)[a.kv_length : a.kv_length + n]) for a, n in plan]
        )
        done = [a for a, n in plan if n == _remaining(a)]
        # A resumed sequence (preempted before) already sampled the token it feeds next.
        ends = [i for i, (a, n) in enumerate(plan) if n == _remaining(a) and not a.seq.output_ids]
        fresh = [plan[i][0] for i in ends]
        logits = logits[ends]
        samplers = [a.sampler for a in fresh]
        scores = raw_logprobs(logits, samplers)
        apply_bitmask(logits, [a.matcher for a in fresh])
        tokens = sample(
            logits, samplers, [a.generator for a in fresh], _recent(fresh), _outputs(fresh)
        )
        # State changes only once the forward and sampling went through, so a failed step can be
        # run again (each sequence alone, see _isolate) or abandoned (fail_all).
        for active, n in plan:
            active.kv_length += n
        for active in done:
            if active.seq.followers:
                self._keep_prefix(active)
                self._queue_followers(active.seq)
            self._prefilling.remove(active)
            self._decoding.join(active)
        picked = picked_logprobs(scores, samplers, tokens)
        for active, token, logprob in zip(fresh, tokens, picked, strict=True):
            self._accept(active, token, logprob)

    def _isolate(self, batch: list[T], run: Callable[[list[T]], None], exc: Exception) -> None:
        """A batched step failed: run it for each member alone and fail only those that fail.

        Members are a plan's (sequence, tokens) or decoding sequences; a device fault on the way
        is re-raised. The culprits leave after the others ran, so decoding rows stay in place.
        """
        members = [(m[0] if isinstance(m, tuple) else m, m) for m in batch]
        failed: list[tuple[_Active, Exception]] = []
        if len(members) == 1:
            failed.append((members[0][0], exc))  # nothing to tell apart
        else:
            log.warning("step of %d sequences failed (%r); running each alone", len(batch), exc)
            for active, member in members:
                if active.seq.finished:  # ended meanwhile (its own step, run earlier)
                    continue
                try:
                    run([member])
                except Exception as alone:
                    if is_device_fault(alone):
                        raise
                    failed.append((active, alone))
        for active, error in failed:
            log.warning("sequence failed: %s: %s", type(error).__name__, error)
            self._release(active)
            self._emit_finished(active.seq, "error", error=f"{type(error).__name__}: {error}")

    def _plan_prefill(self) -> list[tuple[_Active, int]]:
        """How many prompt tokens each prefilling sequence gets this step.

        Shortest prompts first, so a short request is not queued behind a long one; the oldest
        prompt always gets a quarter of the budget, so a long one is never starved.
        """
        if not self._prefilling:
            return []
        oldest, *others = self._prefilling
        guard = min(_remaining(oldest), max(1, self._prefill_chunk // 4))
        left = self._prefill_chunk - guard
        plan = []
        for active in sorted(others, key=_remaining):
            take = min(_remaining(active), left)
            if take == 0:
                break
            plan.append((active, take))
            left -= take
        plan.append((oldest, min(_remaining(oldest), guard + left)))
        return plan

    def _admit(self) -> _Active | None:
        """Take the next valid waiting sequence into a free staging row, if one is free and its
        KV fits; preempted sequences come first."""
        if self._preempted and self.running < self._max_running:
            active = self._preempted[0]
            if not self._fits(_holds(active)):
                return None
            self._preempted.pop(0)
            self._stage(active)
            self._prefilling.append(active)
            return active
        while self._waiting and self.running < self._max_running:
            seq = self._waiting.popleft()
            try:
                sampler = Sampler.resolve(seq.params, self._defaults)
                problem = self._refuse(seq, sampler)
                if problem is not None:
                    self._emit_finished(seq, "error", error=problem)
                    continue
                if not self._fits(len(seq.prompt_ids) + 1):
                    self._waiting.appendleft(seq)  # KV budget full: wait for one to leave
                    return None
                active = self._start(seq, sampler)
            except Exception as exc:
                if is_device_fault(exc):
                    raise
                self._emit_finished(seq, "error", error=f"{type(exc).__name__}: {exc}")
                continue
            self._prefilling.append(active)
            return active
        return None

    def _start(self, seq: Sequence, sampler: Sampler) -> _Active:
        """The engine-side state of a new sequence, staged with any kept prefix."""
        self._admitted += 1
        active = _Active(
            seq=seq,
            sampler=sampler,
            generator=sampler.generator(self._device),
            detokenizer=Detokenizer(self._tokenizer, seq.prompt_ids),
            # A grammar decides where constrained output ends: a stop string inside it would cut
            # the JSON short and call that a clean stop (docs/architecture.md).
            stops=StopMatcher(
                seq.params.stop if seq.params.grammar is None else (),
                keep=seq.params.include_stop,
            ),
            order=self._admitted,
            matcher=seq.params.grammar.matcher() if seq.params.grammar is not None else None,
        )
        self._stage(active)
        return active

    def _stage(self, active: _Active) -> None:
        """Give the sequence a free staging row, started with a kept prefix's KV if one matches;
        at least one token is left to prefill."""
        taken = {a.row for a in self._prefilling}
        active.row = min(set(range(self._max_running)) - taken)
        active.kv_length = 0
        tokens = _feed(active)
        hit = self._prefixes.lookup(tokens)
        if hit is None:
            return
        kv, shared = hit
        reuse = min(shared, len(tokens) - 1)
        if reuse > 0:
            stage = self._runner.stage(active.row)
            stage.reserve(1, reuse)
            stage.write_row(0, kv, reuse)
            active.kv_length = reuse
            if not active.seq.output_ids:  # usage reports what the prompt reused
                active.seq.cached_tokens = reuse

    def _fits(self, tokens: int) -> bool:
        """Whether a sequence holding `tokens` joins the running ones within the KV budget."""
        holding = [_holds(a) for a in self._live()]
        return kv_budget.admits(holding, tokens, self._kv_budget)

    def _make_room(self) -> None:
        """Preempt the newest sequences while the running ones' KV overruns the budget."""
        live = self._by_age()
        leaving = kv_budget.preemptions([_holds(a) for a in live], self._kv_budget)
        for active in reversed(live[len(live) - leaving :]):
            log.info(
                "KV budget of %s tokens full: preempting a sequence of %d tokens",
                self._kv_budget,
                _holds(active),
            )
            self._keep_prefix(active)
            self._release(active)
            self._preempted.append(active)
            self._preemptions += 1
        self._preempted.sort(key=lambda a: a.order)

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
        if not all(0 <= token < self._vocab for token in seq.prompt_ids):
            return f"token ids must lie in [0, {self._vocab})"
        return None

    def _decode(self) -> None:
        """One batched forward: every decoding sequence feeds its pending token."""
        self._make_room()
        self._decoding.reband()
        batch = list(self._decoding)
        if not batch:
            return
        try:
            self._decode_rows(batch)
        except Exception as exc:
            if is_device_fault(exc):
                raise
            self._isolate(batch, self._decode_rows, exc)

    def _decode_rows(self, batch: list[_Active]) -> None:
        """Decode batch rows (all of them, or one while isolating a failure)."""
        segments = self._decoding.segments(batch)
        logits = self._runner.decode(
            [
                (band, first, [a.pending for a in rows], [a.kv_length for a in rows])
                for band, first, rows in segments
            ]
        )
        samplers = [a.sampler for a in batch]
        scores = raw_logprobs(logits, samplers)
        apply_bitmask(logits, [a.matcher for a in batch])
        tokens = sample(
            logits, samplers, [a.generator for a in batch], _recent(batch), _outputs(batch)
        )
        for active in batch:
            active.kv_length += 1
        picked = picked_logprobs(scores, samplers, tokens)
        # Accepting may finish sequences and move rows: all rows are decoded by then.
        for active, token, logprob in zip(batch, tokens, picked, strict=True):
            self._accept(active, token, logprob)

    # -- tokens, text and endings ------------------------------------------------------------

    def _accept(self, active: _Active, token: int, logprob: TokenLogprob | None) -> None:
        """Record a sampled token, emit the text it completes, finish the sequence if it ends."""
        seq = active.seq
        seq.output_ids.append(token)
        active.pending = token
        count = len(seq.output_ids)
        if active.matcher is not None and (refused := active.matcher.advance(token)) is not None:
            self._release(active)  # the mask allowed it: a grammar engine fault, this one's only
            self._emit_finished(seq, "error", error=f"grammar: {refused}")
            return
        reason: Literal["stop", "length"] | None = None
        text = ""
        if self._ends(active, token, count):
            reason = "stop"
        else:
            written = active.detokenizer.add(token)
            active.shown.wrote(written, logprob)
            text = active.stops.feed(written)
            if active.stops.matched is not None or (active.matcher and active.matcher.done):
                reason = "stop"
        if reason is None and (
            count >= active.sampler.max_tokens
            or len(seq.prompt_ids) + count >= self._context_length
        ):
            reason = "length"
        if reason is not None and active.stops.matched is None:
            rest = active.detokenizer.flush()
            active.shown.wrote(rest)
            text += active.stops.feed(rest)
            text += active.stops.flush()
            if active.stops.matched is not None:
                reason = "stop"
        if text:
            seq.emit(TextDelta(text, count, seq.cached_tokens, active.shown.show(text)))
        if reason is not None:
            self._finish(active, reason)

    def _ends(self, active: _Active, token: int, count: int) -> bool:
        """Whether `token`, the count-th, ends the output as end of sequence does (its text not
        shown): EOS unless ignore_eos, or a stop_token_ids id; neither before min_tokens."""
        params = active.seq.params
        ends = not params.ignore_eos if token in self._eos else token in params.stop_token_ids
        return ends and count > params.min_tokens

    def _finish(self, active: _Active, reason: Literal["stop", "length", "cancelled"]) -> None:
        self._keep_prefix(active)
        self._release(active)
        self._emit_finished(active.seq, reason, stop_sequence=active.stops.matched)

    def _keep_prefix(self, active: _Active) -> None:
        """Leave the sequence's KV in the prefix cache, for prompts that start the same way."""
        if active in self._prefilling:
            cache, row = self._runner.stage(active.row), 0
        else:
            cache, row = self._runner.band(active.band), active.row
        kept = (active.seq.prompt_ids + active.seq.output_ids)[: active.kv_length]
        self._prefixes.store(kept, lambda n: cache.read_row(row, n))

    def _queue_followers(self, seq: Sequence) -> None:
        """A leader's prompt is in (or it ended): its followers are admitted next."""
        self._waiting.extendleft(reversed(seq.followers))
        seq.followers = []

    def _release(self, active: _Active) -> None:
        """Free the sequence's row; a band's decoding rows stay contiguous from row 0."""
        if active in self._prefilling:
            self._prefilling.remove(active)
            self._runner.unstage(active.row)
        else:
            self._decoding.leave(active)

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
        self._queue_followers(seq)  # they still run (or, being cancelled too, are dropped)
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


def _feed(active: _Active) -> list[int]:
    """The tokens to put in the cache before decoding: the prompt, and for a sequence resumed
    after preemption what it generated up to the pending token."""
    return active.seq.prompt_ids + active.seq.output_ids[:-1]


def _remaining(active: _Active) -> int:
    """Tokens to prefill not yet in the cache."""
    return len(_feed(active)) - active.kv_length


def _holds(active: _Active) -> int:
    """KV tokens the sequence holds once its next token is in: prompt plus generated so far."""
    return len(active.seq.prompt_ids) + max(len(active.seq.output_ids), 1)


def _outputs(batch: list[_Active]) -> list[list[int]]:
    """Each row's output so far for its presence and frequency penalties; empty without one."""
    return [a.seq.output_ids if a.sampler.counts_output else [] for a in batch]


def _recent(batch: list[_Active]) -> list[list[int]]:
    """Each row's recent tokens for its repetition penalty; empty for rows without one."""
    return [
        recent_tokens(a.seq.prompt_ids, a.seq.output_ids)
        if a.sampler.repetition_penalty != 1.0
        else []
        for a in batch
    ]
