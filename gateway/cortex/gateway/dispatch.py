"""Sending a call to a replica: pick one, load one when none is ready, and retry a
request that fails before its first byte on another replica."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AsyncExitStack
from typing import Any, TypeVar

import httpx

from cortex.core.client import transport_error
from cortex.core.completion_limit import CLAMPED_HEADER, STRICT_HEADER
from cortex.core.errors import (
    CortexError,
    DeviceUnhealthy,
    ModelNotFound,
    NeuronUnavailable,
    NeuronUnreachable,
    Overloaded,
    ShuttingDown,
)
from cortex.gateway.auth import ANONYMOUS
from cortex.gateway.call import Call
from cortex.gateway.fleet import Fleet
from cortex.gateway.replicas import ColdStart, Replicas
from cortex.gateway.router import Candidate, pick

log = logging.getLogger(__name__)

T = TypeVar("T")

# How often a request waiting for a cold load checks that its client is still there.
DISCONNECT_POLL_INTERVAL = 0.25
# Who a neuron's admission shares its running slots between (docs/architecture.md).
PRINCIPAL_HEADER = "x-cortex-principal"
# A neuron's answer headers that its client sees too.
REPORTED_HEADERS = (CLAMPED_HEADER,)
# Retry-After when every replica already holds all the requests it admits.
BUSY_RETRY_AFTER = 1.0


class ClientGone(CortexError):
    """The client disconnected before its answer was ready (nginx's 499)."""

    status, code, kind = 499, "client_closed_request", "invalid_request_error"


# Failures that say "this replica, not this request": another replica may well succeed.
_RETRYABLE = (NeuronUnavailable, DeviceUnhealthy, Overloaded, ModelNotFound, ShuttingDown)
# What an unknown upstream code with these statuses means: a proxy or server in the way.
_GATEWAY_STATUSES = (502, 503, 504)


def retryable(err: CortexError) -> bool:
    """Only failures another replica could fix. A request-caused error (4xx) or one whose code
    says the request itself failed (500: the generation broke) would fail on every replica, and
    retrying it carries one bad request across the fleet."""
    if isinstance(err, _RETRYABLE):
        return True
    return type(err) is CortexError and err.status in _GATEWAY_STATUSES


def _stream_error(neuron: str, exc: httpx.HTTPError, when: str) -> CortexError:
    """A stream's transport failure, as a client may read it (the neuron's name, no address)."""
    if isinstance(exc, httpx.TransportError):
        err = transport_error(neuron, exc)
        err.message = f"{err.message} {when}"
        return err
    return NeuronUnavailable(f"neuron {neuron} failed {when} ({type(exc).__name__})")


def principal_of(call: Call) -> str:
    """Whose share of a neuron's slots the call uses: the key's owner, else the client's address."""
    if call.principal is ANONYMOUS and call.client:
        return call.client
    return call.principal.name


def _headers(call: Call) -> dict[str, str]:
    """What the neuron is told beside the body: whose slots, and how strict about max_tokens."""
    headers = {PRINCIPAL_HEADER: principal_of(call)}
    if call.strict_max_tokens is not None:
        headers[STRICT_HEADER] = "true" if call.strict_max_tokens else "false"
    return headers


def reported(headers: Mapping[str, str]) -> dict[str, str]:
    """The headers of a neuron's answer that its client sees too."""
    return {name: headers[name] for name in REPORTED_HEADERS if name in headers}


class Upstream:
    """A neuron's stream whose first bytes have arrived; closing it closes the neuron's response."""

    def __init__(
        self,
        neuron: str,
        first: bytes,
        rest: AsyncIterator[bytes],
        stack: AsyncExitStack,
        on_close: Callable[[], None],
        on_failure: Callable[[CortexError], None] = lambda _: None,
    ) -> None:
        self.neuron = neuron
        self._first: bytes | None = first
        self._rest = rest
        self._stack = stack
        self._on_close = on_close
        self._on_failure = on_failure
        self._closed = False

    async def chunks(self) -> AsyncIterator[bytes]:
        """The raw bytes, as they come; transport failures raise NeuronUnavailable."""
        if self._first is not None:
            first, self._first = self._first, None
            yield first
        try:
            async for chunk in self._rest:
                yield chunk
        except httpx.HTTPError as exc:
            # A cut stream counts against the neuron, but need not mean it is gone: only a
            # failure to connect makes it suspect at once.
            kind = type(exc).__name__
            err = NeuronUnavailable(f"neuron {self.neuron} failed mid-stream ({kind})")
            self._on_failure(err)
            raise err from exc

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._stack.aclose()
        finally:
            self._on_close()


class Dispatcher:
    """Routes calls to replicas with failover before the first byte."""

    def __init__(
        self,
        fleet: Fleet,
        placer: Replicas,
        ondemand: ColdStart,
        *,
        affinity_slack: int,
        max_attempts: int = 3,
    ) -> None:
        self.fleet, self.placer, self.ondemand = fleet, placer, ondemand
        self.affinity_slack = affinity_slack
        self.max_attempts = max_attempts
        self._turn = itertools.count()

    async def post(self, call: Call, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """A non-streamed inference call; returns the neuron's JSON answer."""

        async def attempt(neuron: str) -> dict[str, Any]:
            self.fleet.begin(neuron, call.model)
            try:
                posting = self.fleet[neuron].client.post_answer(path, body, headers=_headers(call))
                answer = await self._watching(call, posting, f"{neuron} was answering")
                call.reported = reported(answer.headers)
                return answer.body
            finally:
                self.fleet.end(neuron, call.model)

        return await self._with_retries(call, attempt)

    async def open_stream(self, call: Call, path: str, body: dict[str, Any]) -> Upstream:
        """A streamed inference call, returned once its first bytes are in (so it can still fail
        over); the caller must `aclose()` it."""

        async def attempt(neuron: str) -> Upstream:
            self.fleet.begin(neuron, call.model)
            try:
                return await self._open(neuron, call, path, body)
            except BaseException:
                self.fleet.end(neuron, call.model)
                raise

        return await self._with_retries(call, attempt)

    async def _open(self, neuron: str, call: Call, path: str, body: dict[str, Any]) -> Upstream:
        stack = AsyncExitStack()
        try:
            opening = self.fleet[neuron].client.stream(path, body, headers=_headers(call))
            response = await stack.enter_async_context(opening)
            call.reported = reported(response.headers)
            rest = response.aiter_bytes()
            first = await anext(rest)
        except StopAsyncIteration:
            await stack.aclose()
            raise NeuronUnavailable(
                f"neuron {neuron} ended the stream before its first byte"
            ) from None
        except httpx.HTTPError as exc:
            await stack.aclose()
            raise _stream_error(neuron, exc, "before the first byte") from exc
        except BaseException:
            await stack.aclose()
            raise
        model = call.model
        return Upstream(
            neuron,
            first,
            rest,
            stack,
            on_close=lambda: self.fleet.end(neuron, model),
            on_failure=lambda err: self._note(neuron, err),
        )

    async def _with_retries(self, call: Call, attempt: Callable[[str], Awaitable[T]]) -> T:
        tried: set[str] = set()
        last: CortexError | None = None
        for _ in range(self.max_attempts):
            try:
                neuron = await self._choose(call, tried)
            except NeuronUnavailable:
                if last is None:
                    raise
                break  # no other replica, nor a neuron to load one on: the first-hand reason
            if neuron is None:
                break
            call.neuron = neuron
            try:
                return await attempt(neuron)
            except CortexError as err:
                if not retryable(err):
                    raise
                log.info("%s on %s failed before its first byte: %s", call.model, neuron, err)
                tried.add(neuron)
                last = err
                await self._after_failure(neuron, err)
        if last is None or isinstance(last, ModelNotFound):
            raise NeuronUnavailable(f"no replica of {call.model!r} could take the request")
        raise last

    async def _after_failure(self, neuron: str, err: CortexError) -> None:
        self._note(neuron, err)
        if isinstance(err, ModelNotFound):
            await self.fleet.refresh(neuron)  # our picture of it was stale: the model is gone

    def _note(self, neuron: str, err: CortexError) -> None:
        """What a failure says of the neuron's health. A busy neuron (Overloaded, a queue
        timeout, a wait for one of our connections) is healthy; one that cannot be reached, or
        is going away, is skipped at once; other unavailability counts towards unhealthy."""
        if isinstance(err, NeuronUnreachable | ShuttingDown):
            self.fleet.mark_suspect(neuron, err.message)
        elif isinstance(err, NeuronUnavailable):
            self.fleet.note_failure(neuron, err.message)

    async def _watching(self, call: Call, work: Awaitable[T], doing: str) -> T:
        """Await `work`, giving it up when the client of a plain answer disconnects meanwhile:
        its handler is not cancelled by the server, so without this a neuron would go on
        generating (and a load go on) for nobody."""
        task = asyncio.ensure_future(work)
        if call.disconnected is None:
            return await task  # a stream's own cancellation reaches us
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_INTERVAL)
                if done:
                    return task.result()
                if await call.disconnected():
                    raise ClientGone(f"client left while {doing}")
        finally:
            if not task.done():
                task.cancel()

    async def _choose(self, call: Call, tried: set[str]) -> str | None:
        """The next replica to try; loads one when the model has none ready anywhere."""
        ready = self.placer.ready(call.model)
        candidates = [name for name in ready if name not in tried]
        roomy = [name for name in candidates if not self.fleet.full(name, call.model)]
        if candidates and not roomy:
            raise Overloaded(
                f"model {call.model!r} is busy: every replica has all the requests it admits",
                retry_after=BUSY_RETRY_AFTER,
            )
        candidates = roomy
        if not candidates:
            if ready:
                return None  # every replica had its chance
            timeout = call.deadline - time.monotonic()
            ensured = self.ondemand.ensure(call.model, timeout=timeout)
            await self._watching(call, ensured, f"{call.model!r} was loading")
            candidates = [
                name
                for name in self.placer.ready(call.model)
                if name not in tried and not self.fleet.full(name, call.model)
            ]
            if not candidates:
                return None
        return pick(
            [Candidate(n, self.fleet[n].in_flight[call.model]) for n in candidates],
            affinity=call.affinity,
            slack=self.affinity_slack,
            turn=next(self._turn),
        )
