"""One request's generation as the API serves it: admission before the first byte, limits checked,
metrics recorded once, and the engine's sequence cancelled when the client leaves."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
from fastapi import Request

from cortex.core.client import PRINCIPAL_HEADER  # the gateway sends the key's name under it
from cortex.core.completion_limit import (
    OUTPUT_CAP_HEADER,
    STRICT_HEADER,
    CompletionLimit,
    fit_max_tokens,
    parse_cap,
    parse_strict,
)
from cortex.core.config import ConfigError, NeuronSection
from cortex.core.errors import (
    ClientGone,
    CortexError,
    GenerationFailed,
    InvalidRequest,
)
from cortex.core.protocol.openai import PromptTokensDetails, SamplingFields, Usage
from cortex.neuron.api_lifecycle import bears, runtime_of
from cortex.neuron.generation import (
    Finished,
    GenerationEvent,
    SamplingParams,
    TextDelta,
    TokenLogprob,
)
from cortex.neuron.grammar import GrammarError, GrammarSpec
from cortex.neuron.metrics import NeuronMetrics

if TYPE_CHECKING:
    from cortex.neuron.replica import ServedModel

log = logging.getLogger(__name__)
T = TypeVar("T")


def completion_limit(
    request: Request,
    served: ServedModel,
    requested: int | None,
    prompt_tokens: int,
    *,
    prompt_param: str,
) -> CompletionLimit:
    """The request's max_tokens fitted to what its prompt leaves of the context (and to the
    gateway's output limit for the model): clamped (and logged), or a 400 where the model, the
    gateway or this neuron is strict about it."""
    section = runtime_of(request).config.neuron
    if prompt_tokens == 0:
        raise InvalidRequest("the prompt is empty", param=prompt_param)
    # An absurd max_tokens is a mistake to name, not a size to clamp (Claude Code's 32,000 is not).
    if requested is not None and requested > section.max_tokens_limit:
        raise InvalidRequest(
            f"max_tokens is {requested}; this neuron accepts at most {section.max_tokens_limit}",
            param="max_tokens",
        )
    limit = fit_max_tokens(
        requested,
        prompt_tokens,
        served.context_length,
        strict=strict_max_tokens(request, served, section),
        prompt_param=prompt_param,
        cap=parse_cap(request.headers.get(OUTPUT_CAP_HEADER)),
    )
    if limit.clamped:
        log.debug(
            "%s: max_tokens %s clamped to %s (%d prompt tokens, context %d)",
            served.id,
            limit.requested,
            limit.granted,
            prompt_tokens,
            served.context_length,
        )
    return limit


def strict_max_tokens(request: Request, served: ServedModel, section: NeuronSection) -> bool:
    """Whether an oversized max_tokens is a 400: the gateway's word for this request, else the
    model's catalogue entry, else this neuron's setting."""
    said = parse_strict(request.headers.get(STRICT_HEADER))
    if said is not None:
        return said
    if served.strict_max_tokens is not None:
        return served.strict_max_tokens
    return section.strict_max_tokens


def sampling(
    body: SamplingFields, limit: CompletionLimit, vocab: int, logprobs: int | None = None
) -> SamplingParams:
    """The request's sampling fields, with the max_tokens it was granted and the `logprobs`
    alternatives it asked for; a 400 for a logit bias on a token the model does not have
    (`vocab` of them)."""
    bias = body.logit_bias or {}
    outside = sorted(token for token in bias if not 0 <= token < vocab)
    if outside:
        raise InvalidRequest(
            f"logit_bias names token {outside[0]}; this model's token ids run from 0 to {vocab - 1}",
            param="logit_bias",
        )
    return SamplingParams(
        max_tokens=limit.granted,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        min_p=body.min_p,
        repetition_penalty=body.repetition_penalty,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        logit_bias=tuple(bias.items()),
        logprobs=logprobs,
        seed=body.seed,
        stop=tuple(body.stop_list()),
        min_tokens=body.min_tokens or 0,
        ignore_eos=bool(body.ignore_eos),
        stop_token_ids=tuple(body.stop_token_ids or ()),
        include_stop=bool(body.include_stop_str_in_output),
    )


async def constrain(
    served: ServedModel,
    params: SamplingParams,
    constraint: tuple[GrammarSpec, str] | None,
    metrics: NeuronMetrics,
) -> SamplingParams:
    """`params` with the compiled grammar of `constraint` (spec, kind); a 400 if it cannot be."""
    if constraint is None:
        return params
    spec, kind = constraint
    try:
        grammar, seconds = await served.compile_grammar(spec)
    except GrammarError as exc:
        param = "tools" if kind == "tool_call" else "response_format"
        raise InvalidRequest(f"cannot enforce this {param}: {exc}", param=param) from exc
    if seconds is not None:
        metrics.grammar_compile.labels(served.id).observe(seconds)
    metrics.constrained.labels(served.id, kind).inc()
    return dataclasses.replace(params, grammar=grammar)


def usage(finished: Sequence[Finished]) -> Usage:
    """A request's usage, as OpenAI reports `n` choices: the prompt once (its cached part as
    choice 0 read it: the others take theirs from it), the output of every choice summed."""
    first = finished[0]
    details = (
        PromptTokensDetails(cached_tokens=first.cached_tokens) if first.cached_tokens else None
    )
    completion = sum(f.completion_tokens for f in finished)
    return Usage(
        prompt_tokens=first.prompt_tokens,
        completion_tokens=completion,
        total_tokens=first.prompt_tokens + completion,
        prompt_tokens_details=details,
    )


def failure(finished: Finished) -> CortexError | None:
    """The error a generation that ended badly is reported as; None when it ended normally."""
    if finished.reason == "error":
        return GenerationFailed(f"generation failed: {finished.error or 'unknown error'}")
    if finished.reason == "cancelled":
        err = CortexError(f"generation cancelled: {finished.error or 'by the neuron'}")
        err.status, err.code = 503, "generation_cancelled"
        return err
    return None


def principal_of(request: Request, section: NeuronSection) -> str:
    """Whose share of the slots a request uses: the gateway's word for it when the gateway is
    trusted (no admin token set, or the request carries it), else the client's address."""
    named = request.headers.get(PRINCIPAL_HEADER)
    if named and (section.admin_token or section.admin_token_file):
        try:
            token = section.admin_secret()
        except ConfigError:
            token = None  # the token file is gone: trust no one's word for it
        trusted = token is not None and bears(request.headers.get("authorization"), token)
        named = named if trusted else None
    if named:
        return named[:200]
    return request.client.host if request.client else "anonymous"


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (and raising ClientGone) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise ClientGone("the client disconnected")
    return task.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Generation:
    """A generation being served, of `n` choices: its events, first-token time, and its metrics
    recorded once (the prompt once, the output of every choice)."""

    def __init__(
        self,
        served: ServedModel,
        prompt_ids: list[int],
        params: SamplingParams,
        metrics: NeuronMetrics,
        principal: str = "anonymous",
        n: int = 1,
    ) -> None:
        self.model = served.id
        self.n = n
        self.prompt_tokens = len(prompt_ids)
        self._events: Any = served.generate(prompt_ids, params, principal, n)
        self._metrics = metrics
        self._started = time.perf_counter()
        self._pending: GenerationEvent | None = None
        self._admitted = False
        self._closed = False
        self._first_token_at: float | None = None
        self._completion_tokens = [0] * n
        self._cached_tokens = 0  # of the prompt, from the prefix cache: choice 0's, which read it
        self.finished: list[Finished | None] = [None] * n
        # Each choice's, of its text so far, when they were asked for.
        self.logprobs: list[list[TokenLogprob]] = [[] for _ in range(n)]

    @property
    def completion_tokens(self) -> int:
        """Generated so far, all choices together."""
        return sum(self._completion_tokens)

    @property
    def cached_tokens(self) -> int:
        return self._cached_tokens

    async def start(self) -> None:
        """Wait for admission and the first event, so refusals, and a generation that ended
        badly before its first token, are answered with their status before any byte."""
        self._pending = await self._next_event()
        self._admitted = True
        err = failure(self._pending) if isinstance(self._pending, Finished) else None
        if err is not None:
            raise err

    async def next(self) -> GenerationEvent | None:
        """The next event of any choice; None once every choice has finished."""
        if self._pending is not None:
            event, self._pending = self._pending, None
            return event
        if all(self.finished):
            return None
        return await self._next_event()

    async def _next_event(self) -> GenerationEvent:
        try:
            event: GenerationEvent = await anext(self._events)
        except StopAsyncIteration:
            choice = next((i for i, f in enumerate(self.finished) if f is None), 0)
            event = Finished(
                "error",
                self.prompt_tokens,
                self._completion_tokens[choice],
                error="generation ended without finishing",
                choice=choice,
            )
        self._completion_tokens[event.choice] = event.completion_tokens
        if event.choice == 0:
            self._cached_tokens = event.cached_tokens
        if isinstance(event, TextDelta):
            if self._first_token_at is None and event.text:
                self._first_token_at = time.perf_counter()
            self.logprobs[event.choice].extend(event.logprobs)
        else:
            self.finished[event.choice] = event
        return event

    async def collect(self) -> list[tuple[str, Finished]]:
        """Each choice's text and Finished event (non-streaming answers); at the first choice
        that fails, that one's."""
        parts: list[list[str]] = [[] for _ in range(self.n)]
        while (event := await self.next()) is not None:
            if isinstance(event, Finished) and failure(event) is not None:
                return [("".join(parts[event.choice]), event)]
            if isinstance(event, TextDelta):
                parts[event.choice].append(event.text)
        return [("".join(text), done) for text, done in zip(parts, self.finished, strict=True)]  # type: ignore[misc]

    async def close(self) -> None:
        """Stop the generation if it still runs (even while being cancelled); record metrics."""
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            await self._events.aclose()
        if not self._admitted:
            return
        first = self._first_token_at
        self._metrics.observe_generation(
            self.model,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            cached_tokens=self.cached_tokens,
            ttft=first - self._started if first is not None else None,
            decode_seconds=time.perf_counter() - first if first is not None else None,
        )
