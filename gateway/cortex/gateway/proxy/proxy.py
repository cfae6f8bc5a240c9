"""The proxy: one client request, from its authorisation to its last byte.

`Proxy.serve` resolves the model, authorises the caller and reserves the request's worst case
from its budget; the response it returns then dispatches (dispatch.py: a replica, a cold load,
retries before the first byte), relays the neuron's answer through the request's dialect, and
settles: usage, metrics and the reservation, in one `finally`, however the request ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from cortex.core.catalogue import ModelSpec
from cortex.core.client import NeuronAnswer
from cortex.core.completion_limit import CompletionPolicy
from cortex.core.errors import ClientGone, CortexError, ModelNotFound, NeuronUnavailable
from cortex.core.protocol.errors import error_headers
from cortex.core.protocol.openai import Usage
from cortex.core.shutdown import Drain
from cortex.gateway.auth import Authenticator, Principal, unseen
from cortex.gateway.budget import check_output_limit, completion_reserve, prompt_estimate
from cortex.gateway.catalogue import Catalogue
from cortex.gateway.dialects.dialect import (
    Chat,
    ClientRequest,
    Completion,
    Dialect,
    ReplyStream,
    Surface,
)
from cortex.gateway.dialects.openai import has_token
from cortex.gateway.ledger import Ledger, Reservation
from cortex.gateway.proxy.dispatch import Dispatcher, Upstream
from cortex.gateway.proxy.exchange import Accounting, Exchange
from cortex.gateway.proxy.relay import upstream_events
from cortex.gateway.replicas import Replicas

log = logging.getLogger(__name__)

STREAM_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
# A stream opening within this (seconds) is not watched for its client leaving: a ready replica
# answers in milliseconds, and the watch would cost every stream a task.
UNWATCHED_OPEN = 0.05


def unexpected(exc: Exception, where: str) -> CortexError:
    """What the client is told of a failure that is no domain error (a bug): a 500, logged."""
    if isinstance(exc, CortexError):
        return exc
    log.error("unhandled error on %s", where, exc_info=exc)
    return CortexError(f"internal error: {type(exc).__name__}")


@dataclass(frozen=True)
class Patience:
    """How long a stream waits before its first byte (the gateway's Tuning)."""

    keepalive_interval: float  # between keep-alives while a stream waits for a cold load
    # How long a stream to a model with a ready replica waits, before its 200, for the neuron
    # to admit it, so that "busy" comes as a 429 status, not an error event after a 200.
    admission: float


class Proxy:
    """Serves every inference request: one owner of its reservation, its replica slot (through
    the upstream it opens) and its accounting."""

    def __init__(
        self,
        *,
        catalogue: Catalogue,
        auth: Authenticator,
        ledger: Ledger,
        replicas: Replicas,
        dispatcher: Dispatcher,
        accounting: Accounting,
        drain: Drain,
        patience: Patience,
        load_timeout: float,
        strict_max_tokens: bool | None = None,
    ) -> None:
        self.catalogue, self.auth, self.ledger = catalogue, auth, ledger
        self.replicas, self.dispatcher, self.accounting = replicas, dispatcher, accounting
        self.drain, self.patience, self.load_timeout = drain, patience, load_timeout
        # The gateway's word on a max_tokens beyond the context, under each model's own.
        self.strict_max_tokens = strict_max_tokens

    def serve(self, request: Request, dialect: Dialect, asked: ClientRequest) -> Response:
        """The answer to `asked`: refused here, or a response that owns the call from then on.
        A refusal before the model is known (draining, an unknown model) is raised for the
        error handler; one after (not allowed, over budget) is answered and counted under it."""
        if self.drain.draining:
            raise self.drain.refusal("the gateway")
        principal: Principal = request.state.principal
        spec = self._resolve(principal, asked.model)
        try:
            exchange = self._begin(request, dialect, asked, spec)
        except CortexError as err:
            self.accounting.refused(spec.id, dialect.surface, principal.name, err)
            return _error_response(dialect, err)
        return _Proxied(self, exchange, dialect, asked)

    def _resolve(self, principal: Principal, model: str) -> ModelSpec:
        try:
            return self.catalogue.resolve(model)
        except ModelNotFound:
            raise unseen(principal, self.catalogue.specs(), model) from None

    def _begin(
        self, request: Request, dialect: Dialect, asked: ClientRequest, spec: ModelSpec
    ) -> Exchange:
        """Check the caller may use the model, and reserve the request's worst case from their
        budget (the reservation last: nothing may fail between it and its owner)."""
        principal: Principal = request.state.principal
        self.auth.authorize(principal, spec)
        strict = (
            self.strict_max_tokens if spec.strict_max_tokens is None else spec.strict_max_tokens
        )
        prompt = completion = 0
        if asked.budgeted is not None:
            if strict:
                check_output_limit(spec, asked.budgeted)
            prompt = prompt_estimate(asked.budgeted)
            completion = completion_reserve(
                asked.budgeted,
                embedding=spec.kind == "embedding",
                context=spec.context,
                cap=spec.max_output_tokens,
            )
        exchange = Exchange(
            model=spec.id,
            surface=dialect.surface,
            principal=principal,
            deadline=time.monotonic() + self.load_timeout,
            affinity=asked.affinity,
            client=request.client.host if request.client else None,
            # A stream's client leaving cancels the response itself; polling receive()
            # meanwhile would race the server's own disconnect listener.
            disconnected=None if asked.stream else request.is_disconnected,
            cost=spec.cost,
            completion=CompletionPolicy(strict, spec.max_output_tokens),
            reservation=self.ledger.reserve(principal, prompt + completion, time.time()),
            prompt_estimate=prompt,
            completion_reserve=completion,
        )
        exchange.reported.update(_budget_headers(dialect.surface, exchange.reservation))
        return exchange

    async def run(
        self,
        exchange: Exchange,
        dialect: Dialect,
        asked: ClientRequest,
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        """Dispatch, answer or relay, then settle, in the one `finally` that ends every call;
        the answer's last byte goes out after it, so a client that has read it finds the call
        settled."""
        outcome = _Outcome()
        try:
            if asked.stream:
                last: ASGIApp = await self._stream(exchange, asked, outcome, receive, send)
            else:
                reply = await self.dispatcher.ask(exchange, asked.neuron_call(exchange.model))
                body, outcome.answered = asked.answer(reply.body)
                last = _answer(body, reply, exchange.reported)
        except Exception as exc:
            err = outcome.error = asked.client_error(unexpected(exc, scope.get("path", "?")))
            # After a stream's start nothing more can be said: the server closes the connection.
            last = _nothing if outcome.started else _error_response(dialect, err)
        except asyncio.CancelledError:
            # Only the server cancels a call (its shutdown, once the grace has run out): the
            # call is cut short, never an ok.
            outcome.error = outcome.error or self.drain.refusal("the gateway")
            raise
        finally:
            self.accounting.finish(exchange, usage=outcome.usage(), error=outcome.error)
        await last(scope, receive, send)

    async def _stream(
        self,
        exchange: Exchange,
        asked: ClientRequest,
        outcome: _Outcome,
        receive: Receive,
        send: Send,
    ) -> ASGIApp:
        """A streamed answer, all but its end (returned, to send once the call is settled).
        Failures before the upstream opens are HTTP errors when they come quickly; once
        keep-alives have begun they become the dialect's error events."""
        call = asked.neuron_call(exchange.model)
        if not isinstance(call, Chat | Completion):
            raise TypeError(f"{type(call).__name__} does not stream")
        reply = asked.reply_stream()
        opening = asyncio.create_task(self.dispatcher.open(exchange, call))
        left: asyncio.Task[None] | None = None
        try:
            # A ready replica only needs admitting: wait for it without keep-alives, so a
            # refusal is a status, not an error event after a 200. A cold load gets keep-alives.
            patience = self.patience.keepalive_interval
            if self.replicas.ready(exchange.model):
                patience = max(patience, self.patience.admission)
            done, _ = await asyncio.wait({opening}, timeout=min(patience, UNWATCHED_OPEN))
            if not done:
                # Until the answer begins nobody else reads receive(): a client that leaves while
                # its request waits for admission would otherwise keep its place in the queue.
                left = asyncio.create_task(_departure(receive))
                either: set[asyncio.Task[Any]] = {opening, left}
                done, _ = await asyncio.wait(
                    either,
                    timeout=max(0.0, patience - UNWATCHED_OPEN),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if left in done:
                    raise ClientGone("client left before its stream began")
                await _stopped(left)  # from here _send_all listens for the client
            headers = STREAM_HEADERS
            if opening in done:
                opening.result()  # a quick failure raises here: an HTTP error, not an event
                # What the neuron reported (a clamped max_tokens) can only travel with a start
                # that waited for it: a stream sending keep-alives has no headers left to send.
                headers = [*headers, *_encoded(exchange.reported)]
            outcome.started = True
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            frames = self._relay(exchange, opening, reply, outcome)
            stayed = await _send_all(frames, receive, send, self.drain)
            if not stayed and outcome.error is None:
                outcome.error = ClientGone("client left mid-stream")
            elif self.drain.over and not outcome.ended:  # cut: the shutdown's grace ran out
                err = outcome.error = self.drain.refusal("the gateway")
                with contextlib.suppress(OSError):
                    frame = b"".join(reply.fail(err))
                    await send({"type": "http.response.body", "body": frame, "more_body": True})
        finally:
            if left is not None:
                await _stopped(left)
            await _close(opening)
        return _end_of_stream if stayed else _nothing

    async def _relay(
        self,
        exchange: Exchange,
        opening: asyncio.Task[Upstream],
        reply: ReplyStream,
        outcome: _Outcome,
    ) -> AsyncGenerator[bytes]:
        """Keep-alives until the upstream opens, then its events in the client's dialect; a
        failure becomes the dialect's error events, and ends the stream."""
        while not opening.done():
            await asyncio.wait({opening}, timeout=self.patience.keepalive_interval)
            if not opening.done():
                yield reply.keepalive()
        try:
            upstream = opening.result()
            outcome.relayed = reply
            # What arrived together goes out together: one write to the client, not one per
            # event (a neuron's tokens come one by one; a burst is one chunk, and one send).
            async for batch in upstream_events(upstream):
                frames: list[bytes] = []
                for event, payload in batch:
                    if exchange.first_token is None and payload is not None and has_token(payload):
                        self.accounting.first_token(exchange)
                    frames += reply.feed(event, payload)
                if frames:
                    yield b"".join(frames)
            outcome.ended = True
            if closing := b"".join(reply.finish()):
                yield closing
        except Exception as exc:  # the neuron's failure, garbage from it, or a bug of ours
            if isinstance(exc, ValueError):
                err: CortexError = NeuronUnavailable(f"bad stream: {exc}")
            else:
                err = unexpected(exc, "a stream's relay")
            outcome.error, outcome.ended = err, True
            if failing := b"".join(reply.fail(err)):
                yield failing


def _budget_headers(surface: Surface, reservation: Reservation | None) -> dict[str, str]:
    """A budgeted key's limit and what is left of it (this request's worst case held), under
    the names each API's own clients read (docs/security.md, "Token budgets")."""
    if reservation is None or reservation.limit is None or reservation.remaining is None:
        return {}
    names = (
        ("anthropic-ratelimit-tokens-limit", "anthropic-ratelimit-tokens-remaining")
        if surface == "anthropic"
        else ("x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens")
    )
    return dict(zip(names, (str(reservation.limit), str(reservation.remaining)), strict=True))


def _error_response(dialect: Dialect, err: CortexError) -> Response:
    """An error answered before any byte, in the dialect's envelope and status."""
    status = dialect.error_status(err)
    return JSONResponse(dialect.error_body(err), status_code=status, headers=error_headers(err))


def _answer(body: dict[str, Any], reply: NeuronAnswer, headers: dict[str, str]) -> Response:
    """A plain answer. One the dialect passed on as the neuron gave it goes out in the neuron's
    own bytes: encoding again what was just decoded would change nothing but the cost."""
    if body is reply.body and reply.raw is not None:
        return Response(reply.raw, media_type="application/json", headers=headers)
    return JSONResponse(body, headers=headers)


def _encoded(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]


class _Outcome:
    """How a call went, as its `finally` settles it."""

    def __init__(self) -> None:
        self.started = False  # the stream's status is sent: errors can only be events now
        self.error: CortexError | None = None
        self.answered: Usage | None = None  # a plain answer's usage
        self.relayed: ReplyStream | None = None  # a stream that opened, and counts its usage
        self.ended = False  # the stream's last frames are made: finished, or failed

    def usage(self) -> Usage | None:
        return self.relayed.usage() if self.relayed is not None else self.answered


async def _send_all(
    frames: AsyncGenerator[bytes], receive: Receive, send: Send, drain: Drain
) -> bool:
    """Send every frame as it comes; False when the client left first. Its leaving cancels the
    relay (and so the neuron's stream), as starlette's StreamingResponse does; so does the
    shutdown's grace running out (`Drain.cuttable`)."""
    left = False
    async with anyio.create_task_group() as group:

        async def watch() -> None:
            nonlocal left
            while (await receive())["type"] != "http.disconnect":
                pass
            left = True
            group.cancel_scope.cancel()

        group.start_soon(watch)
        try:
            with drain.cuttable(group.cancel_scope.cancel):
                async for frame in frames:
                    await send({"type": "http.response.body", "body": frame, "more_body": True})
        except OSError:  # ASGI 2.4 servers say so when the client is gone
            left = True
        finally:
            with anyio.CancelScope(shield=True):
                await frames.aclose()
        group.cancel_scope.cancel()
    return not left


async def _departure(receive: Receive) -> None:
    """Returns when the client disconnects (the request's body was read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _stopped(task: asyncio.Task[None]) -> None:
    """Cancel the task and wait until it has stopped (our own cancellation still propagates)."""
    task.cancel()
    await asyncio.wait({task})
    if not task.cancelled():
        task.exception()  # retrieved: a receive() that failed says nothing more than a leave


async def _end_of_stream(scope: Scope, receive: Receive, send: Send) -> None:
    with contextlib.suppress(OSError):
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _nothing(scope: Scope, receive: Receive, send: Send) -> None:
    """A stream whose client left ends without a word."""


class _Proxied(Response):
    """The response of a call the proxy has taken on: serving it runs the call. The server serves
    a route's response in the same task, right after the route returns it, so the reservation
    taken in `Proxy.serve` has its owner, and its `finally`, at once."""

    def __init__(
        self, proxy: Proxy, exchange: Exchange, dialect: Dialect, asked: ClientRequest
    ) -> None:
        self._proxy, self._exchange, self._dialect, self._asked = proxy, exchange, dialect, asked
        self.background = None  # what FastAPI looks for on a returned response

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._proxy.run(self._exchange, self._dialect, self._asked, scope, receive, send)


async def _close(opening: asyncio.Task[Upstream]) -> None:
    """Give the replica back: cancel an open still under way, or close the opened upstream.
    Shielded: this runs while the client's disconnect is cancelling us, and must still finish."""
    if not opening.done():
        opening.cancel()
        return
    if opening.cancelled() or opening.exception() is not None:
        return
    with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
        await opening.result().aclose()
