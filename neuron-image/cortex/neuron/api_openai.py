"""OpenAI-compatible routes of a neuron: chat, completions, embeddings, models."""

from __future__ import annotations

import base64
import json
import struct
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from cortex.core.errors import CortexError, InvalidRequest
from cortex.core.protocol.openai import (
    CONTEXT_FULL,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    ChunkChoice,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Delta,
    DeltaFunctionCall,
    DeltaToolCall,
    Embedding,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    FunctionCall,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    ResponseMessage,
    TokenizeRequest,
    TokenizeResponse,
    ToolCall,
    Usage,
    new_id,
)
from cortex.neuron.api_lifecycle import runtime_of
from cortex.neuron.constraints import chat_constraint, forced_tools, response_format_grammar
from cortex.neuron.generation import Finished, TokenLogprob
from cortex.neuron.logprobs import Tokens, chat_logprobs, completion_logprobs
from cortex.neuron.prompts import PromptPool, require_unicode
from cortex.neuron.serving import (
    Generation,
    completion_limit,
    constrain,
    failure,
    principal_of,
    sampling,
    until_disconnect,
    usage,
)
from cortex.neuron.sse import DONE, EventStreamResponse, sse_data, sse_error
from cortex.neuron.tools import ParsedToolCall, ToolCallStream, forced_calls, parse_tool_calls

if TYPE_CHECKING:
    from cortex.neuron.replica import ServedModel

router = APIRouter()
MAX_EMBEDDING_INPUTS = 2048


def _served(request: Request, model: str, kind: str) -> ServedModel:
    served = runtime_of(request).served(model)
    if served.kind != kind:
        what = "an embedding model; use /v1/embeddings"
        if served.kind != "embedding":
            what = f"a {served.kind} model; use /v1/chat/completions"
        raise InvalidRequest(f"model {served.id!r} is {what}", param="model")
    request.state.model = served.id
    return served


def prompts_of(request: Request) -> PromptPool:
    pool: PromptPool = request.app.state.prompts
    return pool


def _message(message: ChatMessage, index: int, model: str) -> dict[str, Any]:
    """An OpenAI message as the chat template takes it: plain-text content, tool fields kept."""
    role = {"developer": "system", "function": "tool"}.get(message.role, message.role)
    out: dict[str, Any] = {"role": role, "content": _text(message, index, model)}
    if message.name:
        out["name"] = message.name
    if message.tool_calls:
        out["tool_calls"] = [call.model_dump(mode="json") for call in message.tool_calls]
    if message.tool_call_id:
        out["tool_call_id"] = message.tool_call_id
    return out


def _text(message: ChatMessage, index: int, model: str) -> str:
    """The message's text parts (and an assistant's refusals) joined; any other part is refused rather than silently dropped
    (a model answering about an image it never saw is worse than a 400)."""
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    texts = []
    for j, part in enumerate(message.content):
        where, kind = f"messages.{index}.content.{j}", part.get("type")
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif (
            kind == "refusal"
            and message.role == "assistant"
            and isinstance(part.get("refusal"), str)
        ):
            texts.append(part["refusal"])  # what the assistant said, as the Responses API reads it
        elif kind == "text":
            raise InvalidRequest(f"{where}.text: a text part needs its text", param=f"{where}.text")
        elif kind in ("image_url", "image", "input_image"):
            raise InvalidRequest(
                f"model {model!r} reads text only: it cannot take the image in {where}",
                param=where,
            )
        else:
            raise InvalidRequest(
                f"content part {where} of type {kind!r} is not supported: send text parts",
                param=where,
            )
    return "".join(texts)


def _chars(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> int:
    """Characters the rendered prompt holds at least: message texts and tool definitions."""
    text = sum(len(m["content"]) for m in messages)
    return text + (len(json.dumps(tools)) if tools else 0)


def _chunk(model: BaseModel) -> bytes:
    data = model.model_dump(mode="json", exclude_none=True)
    for choice in data.get("choices", []):
        choice.setdefault("finish_reason", None)
    return sse_data(data)


async def _start(request: Request, generation: Generation) -> None:
    """Admission and first event, abandoned if the client leaves while it waits."""
    try:
        await until_disconnect(request, generation.start())
    except BaseException:
        await generation.close()
        raise


async def _finish(request: Request, generation: Generation) -> list[tuple[str, Finished]]:
    """Every choice's text and ending; the error of the first choice that failed."""
    try:
        answers = await until_disconnect(request, generation.collect())
    finally:
        await generation.close()
    for _, finished in answers:
        err = failure(finished)
        if err is not None:
            raise err
    return answers


def finish_reason(called: bool, finished: Finished) -> str:
    """`tool_calls` when the output made calls, unless the token limit cut it: then `length`,
    as OpenAI reports a truncated answer whatever it held."""
    if called and finished.reason != "length":
        return "tool_calls"
    return finished.reason


def context_full(finished: Finished, context: int | None) -> dict[str, bool]:
    """The choice's CONTEXT_FULL field when a `length` finish filled the context window, not
    max_tokens (a max_tokens clamped to the room left ends the same way)."""
    total = finished.prompt_tokens + finished.completion_tokens
    if finished.reason == "length" and context is not None and total >= context:
        return {CONTEXT_FULL: True}
    return {}


def _tool_call(call: ParsedToolCall) -> ToolCall:
    return ToolCall(id=call.id, function=FunctionCall(name=call.name, arguments=call.arguments))


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    served = _served(request, body.model, "chat")
    offered = [t.model_dump(mode="json", exclude_none=True) for t in body.tools or []]
    constraint = chat_constraint(
        offered or None, body.tool_choice, body.parallel_tool_calls, body.response_format
    )
    tools = body.offered_tools()
    messages = [_message(m, i, served.id) for i, m in enumerate(body.messages)]
    pool = prompts_of(request)
    pool.check_size(_chars(messages, tools), served.context_length, "messages")
    continued, opened = bool(body.continue_final_message), body.generation_prompt()
    prompt = await pool.run(
        lambda: served.render_chat(
            messages, tools, continue_final=continued, generation_prompt=opened
        ),
        "messages",
    )
    section = runtime_of(request).config.neuron
    limit = completion_limit(
        request, served, body.token_limit(), len(prompt), prompt_param="messages"
    )
    asked = body.logprobs_asked()
    params = sampling(body, limit, served.vocab_size, asked)
    metrics = request.app.state.metrics
    params = await constrain(served, params, constraint, metrics)
    generation = Generation(
        served, prompt, params, metrics, principal_of(request, section), body.n or 1
    )
    names = {t["function"]["name"] for t in tools} if tools else None
    most_calls = 1 if body.parallel_tool_calls is False else None
    # Forced calls: the grammar allows nothing but call blocks, so the output is calls, one of
    # them perhaps cut short by the token limit, never content.
    forced = None
    if constraint is not None and constraint[1] == "tool_call":
        forced = {t["function"]["name"] for t in forced_tools(offered, body.tool_choice) or []}
    await _start(request, generation)
    if body.stream:
        options = body.stream_options
        include_usage = bool(options and options.include_usage)
        continuous = bool(options and options.continuous_usage_stats)
        return EventStreamResponse(
            _chat_stream(
                generation,
                names,
                most_calls,
                forced,
                include_usage,
                continuous,
                served if asked is not None else None,
                served.context_length,
            ),
            headers=limit.headers(),
            on_close=generation.close,
        )
    answers = await _finish(request, generation)
    choices = []
    for index, (text, finished) in enumerate(answers):
        content: str | None = text
        calls: list[ParsedToolCall] = []
        if forced is not None:
            content, calls = None, forced_calls(text, forced)[:most_calls]
        elif names is not None:
            parsed = parse_tool_calls(text, names)
            content, calls = parsed.content, parsed.tool_calls[:most_calls]
        message = ResponseMessage(
            content=content, tool_calls=[_tool_call(c) for c in calls] or None
        )
        scored = generation.logprobs[index]
        choices.append(
            ChatChoice(
                index=index,
                message=message,
                finish_reason=finish_reason(bool(calls), finished),  # type: ignore[arg-type]
                stop_reason=finished.stop_sequence,
                logprobs=chat_logprobs(served, scored) if asked is not None else None,
                **context_full(finished, served.context_length),
            )
        )
    answer = ChatCompletion(model=served.id, choices=choices, usage=usage([f for _, f in answers]))
    return JSONResponse(answer.model_dump(mode="json"), headers=limit.headers())


class _ChoiceCalls:
    """One streamed choice's tool calls: parsed as its text comes, or (forced) held to its end."""

    def __init__(self, tool_names: set[str] | None, forced: set[str] | None) -> None:
        self.parser = (
            ToolCallStream(tool_names) if tool_names is not None and forced is None else None
        )
        self.forced = forced
        self.held: list[str] = []  # a forced answer's text
        self.sent = 0  # calls sent

    def feed(self, text: str) -> list[str | ParsedToolCall]:
        if self.forced is not None:
            self.held.append(text)
            return []
        return list(self.parser.feed(text)) if self.parser else [text]

    def close(self) -> list[str | ParsedToolCall]:
        rest = forced_calls("".join(self.held), self.forced) if self.forced is not None else []
        return [*rest, *(self.parser.close() if self.parser else [])]


async def _chat_stream(
    generation: Generation,
    tool_names: set[str] | None,
    most_calls: int | None,
    forced: set[str] | None,
    include_usage: bool,
    continuous: bool,
    tokens: Tokens | None = None,
    context: int | None = None,
) -> AsyncIterator[bytes]:
    """Role chunks, content (and tool call) deltas, a finish chunk per choice, the usage chunk,
    [DONE]; each chunk names its choice (`index`), as the choices' tokens come.

    Calls past `most_calls` (parallel_tool_calls false) are dropped. A forced call (`forced`:
    the tools it may name) comes whole at the end, cut or not (tools.forced_calls). With
    `tokens`, each content delta carries the logprobs of the tokens it completes (a request with
    logprobs has no tools: one delta per event)."""
    base = ChatCompletionChunk(
        id=new_id("chatcmpl"), created=int(time.time()), model=generation.model, choices=[]
    )
    calls = [_ChoiceCalls(tool_names, forced) for _ in range(generation.n)]
    counts = [0] * generation.n  # each choice's tokens so far, as its chunks went out

    def so_far() -> Usage | None:
        """vLLM's continuous_usage_stats: usage up to this chunk, on every chunk."""
        if not continuous:
            return None
        prompt, cached = generation.prompt_tokens, generation.cached_tokens
        return Usage(
            prompt_tokens=prompt,
            completion_tokens=sum(counts),
            total_tokens=prompt + sum(counts),
            # from the first chunk on, so a translated stream's opening event can report it
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached) if cached else None,
        )

    def chunk(choice: ChunkChoice) -> bytes:
        return _chunk(base.model_copy(update={"choices": [choice], "usage": so_far()}))

    def delta(
        index: int, piece: str | ParsedToolCall, logprobs: Sequence[TokenLogprob] = ()
    ) -> bytes | None:
        state = calls[index]
        if isinstance(piece, str):
            out = Delta(content=piece)
        elif most_calls is not None and state.sent >= most_calls:
            return None
        else:
            function = DeltaFunctionCall(name=piece.name, arguments=piece.arguments)
            call = DeltaToolCall(index=state.sent, id=piece.id, type="function", function=function)
            out, state.sent = Delta(tool_calls=[call]), state.sent + 1
        scored = chat_logprobs(tokens, logprobs) if tokens is not None else None
        return chunk(ChunkChoice(index=index, delta=out, logprobs=scored))

    def end(finished: Finished) -> Iterator[bytes]:
        index = finished.choice
        for piece in calls[index].close():
            if frame := delta(index, piece):
                yield frame
        counts[index] = finished.completion_tokens
        yield chunk(
            ChunkChoice(
                index=index,
                delta=Delta(),
                finish_reason=finish_reason(calls[index].sent > 0, finished),  # type: ignore[arg-type]
                stop_reason=finished.stop_sequence,
                **context_full(finished, context),
            )
        )

    try:
        for index in range(generation.n):
            yield chunk(ChunkChoice(index=index, delta=Delta(role="assistant", content="")))
        while (event := await generation.next()) is not None:
            if isinstance(event, Finished):
                if (err := failure(event)) is not None:
                    yield sse_error(err)
                    return
                for frame in end(event):
                    yield frame
                continue
            counts[event.choice] = event.completion_tokens
            for i, piece in enumerate(calls[event.choice].feed(event.text)):
                if out := delta(event.choice, piece, event.logprobs if i == 0 else ()):
                    yield out
        for frame in _closing(generation, base, include_usage):
            yield frame
    except Exception as exc:  # the headers are sent: only an error event can tell the client
        yield sse_error(exc if isinstance(exc, CortexError) else CortexError(repr(exc)))
    finally:
        await generation.close()


def _closing(generation: Generation, base: BaseModel, include_usage: bool) -> Iterator[bytes]:
    """A stream's frames once every choice has finished: the usage chunk when asked (the
    request's totals), [DONE]."""
    if include_usage:
        finished = [f for f in generation.finished if f is not None]
        yield _chunk(base.model_copy(update={"usage": usage(finished)}))
    yield DONE


async def _completion_prompt(
    request: Request, served: ServedModel, prompt: str | list[str] | list[int]
) -> tuple[str, list[int]]:
    if not isinstance(prompt, str) and all(isinstance(p, int) for p in prompt):
        ids = [int(p) for p in prompt]
        if len(ids) >= served.context_length:  # refused by `sampling`, before the vocabulary scan
            return "", ids
        if not all(0 <= token < served.vocab_size for token in ids):
            raise InvalidRequest(
                f"token ids must lie in [0, {served.vocab_size}), the model's vocabulary",
                param="prompt",
            )
        return "", ids
    if not isinstance(prompt, str) and len(prompt) != 1:
        raise InvalidRequest("send one prompt per request", param="prompt")
    text = prompt if isinstance(prompt, str) else str(prompt[0])
    pool = prompts_of(request)
    pool.check_size(len(text), served.context_length, "prompt")
    return text, await pool.run(lambda: served.encode(text), "prompt")


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    served = _served(request, body.model, "chat")
    pool = prompts_of(request)
    if body.messages:
        messages = [_message(m, i, served.id) for i, m in enumerate(body.messages)]
        tools = body.tools or None
        continued = bool(body.continue_final_message)
        pool.check_size(_chars(messages, tools), served.context_length, "messages")
        ids = await pool.run(
            lambda: served.render_chat(messages, tools, continue_final=continued), "messages"
        )
    elif body.prompt is not None:
        text = body.prompt
        pool.check_size(len(text), served.context_length, "prompt")
        ids = await pool.run(lambda: served.encode(text), "prompt")
    else:
        raise InvalidRequest("send messages or prompt", param="messages")
    return TokenizeResponse(model=served.id, count=len(ids), max_model_len=served.context_length)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    served = _served(request, body.model, "chat")
    if body.suffix:
        raise InvalidRequest("suffix (fill-in-the-middle) is not supported", param="suffix")
    text, ids = await _completion_prompt(request, served, body.prompt)
    if body.echo and not text:
        raise InvalidRequest("echo needs a text prompt", param="echo")
    section = runtime_of(request).config.neuron
    limit = completion_limit(request, served, body.max_tokens, len(ids), prompt_param="prompt")
    params = sampling(body, limit, served.vocab_size, body.logprobs)
    metrics = request.app.state.metrics
    spec = response_format_grammar(body.response_format)
    kind = str((body.response_format or {}).get("type"))
    params = await constrain(served, params, (spec, kind) if spec else None, metrics)
    generation = Generation(
        served, ids, params, metrics, principal_of(request, section), body.n or 1
    )
    await _start(request, generation)
    echo = text if body.echo else ""
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        scored = (served, body.logprobs) if body.logprobs is not None else None
        return EventStreamResponse(
            _completion_stream(generation, echo, include_usage, scored),
            headers=limit.headers(),
            on_close=generation.close,
        )
    answers = await _finish(request, generation)
    choices = [
        CompletionChoice(
            index=index,
            text=echo + output,
            finish_reason=finished.reason,  # type: ignore[arg-type]
            stop_reason=finished.stop_sequence,
            logprobs=completion_logprobs(
                served, generation.logprobs[index], len(echo), body.logprobs
            )
            if body.logprobs is not None
            else None,
        )
        for index, (output, finished) in enumerate(answers)
    ]
    answer = Completion(model=served.id, choices=choices, usage=usage([f for _, f in answers]))
    return JSONResponse(answer.model_dump(mode="json"), headers=limit.headers())


async def _completion_stream(
    generation: Generation,
    echo: str,
    include_usage: bool,
    scored: tuple[Tokens, int] | None = None,
) -> AsyncIterator[bytes]:
    """Text chunks, each naming its choice (`index`); with `scored` (the model's tokens,
    alternatives per token), each carries the logprobs of the tokens it completes, offsets
    counted from the start of the choice's text."""
    base = Completion(model=generation.model, choices=[])

    def chunk(
        index: int, text: str, reason: str | None = None, logprobs: Sequence[TokenLogprob] = ()
    ) -> bytes:
        lists = None
        if scored is not None and reason is None:
            lists = completion_logprobs(scored[0], logprobs, len(echo), scored[1])
        choice = CompletionChoice(index=index, text=text, finish_reason=reason, logprobs=lists)  # type: ignore[arg-type]
        return _chunk(base.model_copy(update={"choices": [choice]}))

    try:
        if echo:
            for index in range(generation.n):
                yield chunk(index, echo)
        while (event := await generation.next()) is not None:
            if isinstance(event, Finished):
                if (err := failure(event)) is not None:
                    yield sse_error(err)
                    return
                yield chunk(event.choice, "", event.reason)
            elif event.text:
                yield chunk(event.choice, event.text, logprobs=event.logprobs)
        for frame in _closing(generation, base, include_usage):
            yield frame
    except Exception as exc:  # the headers are sent: only an error event can tell the client
        yield sse_error(exc if isinstance(exc, CortexError) else CortexError(repr(exc)))
    finally:
        await generation.close()


def _texts(value: str | list[str] | list[int] | list[list[int]]) -> list[str]:
    texts = [value] if isinstance(value, str) else value
    if not texts:
        raise InvalidRequest("input must not be empty", param="input")
    if not all(isinstance(t, str) for t in texts):
        raise InvalidRequest("token-id input is not supported; send text", param="input")
    if len(texts) > MAX_EMBEDDING_INPUTS:
        raise InvalidRequest(f"at most {MAX_EMBEDDING_INPUTS} inputs per request", param="input")
    if any(not t for t in texts):
        raise InvalidRequest("input strings must not be empty", param="input")
    for text in texts:
        require_unicode(str(text), "input")
    return [str(t) for t in texts]


def _vector(values: list[float], encoding: str) -> list[float] | str:
    if encoding == "float":
        return values
    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode("ascii")


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request) -> Response:
    """Inputs longer than the model's context are truncated, as sentence-transformers does."""
    served = _served(request, body.model, "embedding")
    texts = _texts(body.input)
    principal = principal_of(request, runtime_of(request).config.neuron)
    vectors, tokens = await until_disconnect(request, served.embed(texts, principal))
    if body.dimensions is not None and vectors and body.dimensions != len(vectors[0]):
        raise InvalidRequest(
            f"model {served.id!r} has {len(vectors[0])} dimensions; it cannot return "
            f"{body.dimensions}",
            param="dimensions",
        )
    request.app.state.metrics.prompt_tokens.labels(served.id).inc(tokens)
    answer = EmbeddingResponse(
        model=served.id,
        data=[
            Embedding(index=i, embedding=_vector(v, body.encoding_format))
            for i, v in enumerate(vectors)
        ],
        usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens),
    )
    return JSONResponse(answer.model_dump(mode="json"))


@router.get("/v1/models")
async def list_models(request: Request) -> JSONResponse:
    runtime = runtime_of(request)
    cards = [
        ModelCard.model_validate(
            {
                "id": m.id,
                "created": int(m.loaded_at or 0),
                "owned_by": runtime.config.neuron.name,
                "kind": m.kind,
                "state": m.state.value,
                "context_length": m.context_length,
            }
        )
        for m in runtime.listing().loaded
    ]
    return JSONResponse(ModelList(data=cards).model_dump(mode="json"))
