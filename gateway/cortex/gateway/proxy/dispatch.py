"""Sending a call to a replica: pick one, load one when none is ready, and retry a call that
fails before its first byte on another replica.

Whoever takes a replica slot holds the function that gives it back (`Slot.release`, KubeAI's
`AwaitBestAddress` idea): a plain call gives it back when the neuron has answered, a stream when
the proxy closes its `Upstream`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager, AsyncExitStack, ExitStack
from typing import TypeVar

from cortex.core.client import NeuronAnswer, NeuronClient
from cortex.core.completion_limit import CLAMPED_HEADER
from cortex.core.errors import (
    AnswerTimeout,
    ClientGone,
    CortexError,
    DeviceUnhealthy,
    ModelNotFound,
    NeuronUnavailable,
    NeuronUnreachable,
    Overloaded,
    QueueTimeout,
    ShuttingDown,
)
from cortex.core.neuron_wire import WireStream
from cortex.gateway.auth import ANONYMOUS
from cortex.gateway.dialects.dialect import (
    Chat,
    Completion,
    Embedding,
    NeuronCall,
    StreamCall,
    Tokenize,
)
from cortex.gateway.proxy.balancer import Candidate, pick
from cortex.gateway.proxy.exchange import Exchange
from cortex.gateway.registry import Fleet
from cortex.gateway.replicas import ColdStart, Replicas

log = logging.getLogger(__name__)

T = TypeVar("T")

# How often a request waiting for a cold load checks that its client is still there.
DISCONNECT_POLL_INTERVAL = 0.25
# A neuron's answer headers that its client sees too.
REPORTED_HEADERS = (CLAMPED_HEADER,)
# Retry-After when every replica already holds all the requests it admits.
BUSY_RETRY_AFTER = 1.0


# Failures that say "this replica, not this request": another replica may well succeed.
_RETRYABLE = (NeuronUnavailable, DeviceUnhealthy, Overloaded, ModelNotFound, ShuttingDown)
# What an unknown upstream code with these statuses means: a proxy or server in the way.
_GATEWAY_STATUSES = (502, 503, 504)


def retryable(err: CortexError) -> bool:
    """Only failures another replica could fix. A request-caused error (4xx) or one whose code
    says the request itself failed (500: the generation broke) would fail on every replica, and
    retrying it carries one bad request across the fleet. A queue timeout is not retried either:
    the request has waited a neuron's whole queue timeout already, and each further try would add
    another, past what a stream waits before its 200 (`Patience.admission`)."""
    if isinstance(err, QueueTimeout):
        return False
    if isinstance(err, _RETRYABLE):
        return True
    return type(err) is CortexError and err.status in _GATEWAY_STATUSES


def principal_of(exchange: Exchange) -> str:
    """Whose share of a neuron's slots the call uses: the key's owner, else the client's address."""
    if exchange.principal is ANONYMOUS and exchange.client:
        return exchange.client
    return exchange.principal.name


def note_failure(fleet: Fleet, neuron: str, err: CortexError) -> None:
    """What a failure says of the neuron's health. A busy neuron (Overloaded, a queue timeout, a
    wait for one of our connections) is healthy; one that cannot be reached, or is going away,
    is skipped at once; other unavailability counts towards unhealthy."""
    if isinstance(err, NeuronUnreachable | ShuttingDown):
        fleet.mark_suspect(neuron, err.message)
    elif isinstance(err, NeuronUnavailable):
        fleet.note_failure(neuron, err.message)


class Slot:
    """One call's place on a replica until `release()`, which only its holder calls, once. An
    admitted call (one the neuron's admission counts) is counted in the fleet's in-flight numbers,
    which routing and `Fleet.full` read; any other (a count of tokens) only keeps the neuron's
    client open meanwhile."""

    def __init__(self, fleet: Fleet, neuron: str, model: str, *, admitted: bool = True) -> None:
        self.fleet, self.neuron, self.model = fleet, neuron, model
        handle = fleet[neuron]
        self.client: NeuronClient = handle.client
        self._calling = ExitStack()
        if admitted:
            fleet.begin(neuron, model)
            self._calling.callback(fleet.end, neuron, model)
        else:
            self._calling.enter_context(fleet.calling(handle))

    def release(self) -> None:
        self._calling.close()  # once: a closed stack has nothing left to undo

    def failed(self, err: CortexError) -> None:
        note_failure(self.fleet, self.neuron, err)


def reported(headers: Mapping[str, str]) -> dict[str, str]:
    """The headers of a neuron's answer that its client sees too."""
    return {name: headers[name] for name in REPORTED_HEADERS if name in headers}


class Upstream:
    """A neuron's stream whose first bytes have arrived; closing it closes the neuron's response
    and gives the slot back."""

    def __init__(
        self, slot: Slot, first: bytes, rest: AsyncIterator[bytes], stack: AsyncExitStack
    ) -> None:
        self.slot = slot
        self.neuron = slot.neuron
        self._first: bytes | None = first
        self._rest = rest
        self._stack = stack
        self._closed = False

    async def chunks(self) -> AsyncIterator[bytes]:
        """The raw bytes, as they come; transport failures raise NeuronUnavailable."""
        if self._first is not None:
            first, self._first = self._first, None
            yield first
        try:
            async for chunk in self._rest:
                yield chunk
        except CortexError as exc:  # the transport's, as NeuronClient words it
            # A cut stream counts against the neuron, but need not mean it is gone: only a
            # failure to connect makes it suspect at once.
            kind = type(exc.__cause__ or exc).__name__
            err = NeuronUnavailable(f"neuron {self.neuron} failed mid-stream ({kind})")
            self.slot.failed(err)
            raise err from exc

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._stack.aclose()
        finally:
            self.slot.release()


async def _answer(client: NeuronClient, call: NeuronCall, exchange: Exchange) -> NeuronAnswer:
    """A neuron's whole answer to `call`, through the NeuronClient method that serves it."""
    principal, limits = principal_of(exchange), exchange.completion
    match call:
        case Chat(body):
            return await client.chat(body, principal=principal, completion=limits)
        case Completion(body):
            return await client.complete(body, principal=principal, completion=limits)
        case Embedding(body):
            return await client.embed(body, principal=principal)
        case Tokenize(request):
            counted = await client.tokenize(request, principal=principal)
            return NeuronAnswer(counted.model_dump(), {})


def _opening(
    client: NeuronClient, call: StreamCall, exchange: Exchange
) -> AbstractAsyncContextManager[WireStream]:
    principal, limits = principal_of(exchange), exchange.completion
    if isinstance(call, Chat):
        return client.stream_chat(call.body, principal=principal, completion=limits)
    return client.stream_complete(call.body, principal=principal, completion=limits)


class Dispatcher:
    """Routes calls to replicas with failover before the first byte."""

    def __init__(
        self,
        fleet: Fleet,
        replicas: Replicas,
        cold_start: ColdStart,
        *,
        affinity_slack: int,
        max_attempts: int = 3,
    ) -> None:
        self.fleet, self.replicas, self.cold_start = fleet, replicas, cold_start
        self.affinity_slack = affinity_slack
        self.max_attempts = max_attempts
        self._turn = itertools.count()

    async def ask(self, exchange: Exchange, call: NeuronCall) -> NeuronAnswer:
        """A plain (non-streamed) call; returns the neuron's JSON answer."""

        async def attempt(slot: Slot) -> NeuronAnswer:
            try:
                answer = _answer(slot.client, call, exchange)
                answered = await self._watching(exchange, answer, f"{slot.neuron} was answering")
                exchange.reported.update(reported(answered.headers))
            except ClientGone:
                exchange.taken = True  # the neuron was reading the prompt, or answering it
                raise
            except AnswerTimeout:
                exchange.taken = exchange.unanswered = True  # it may be generating still
                raise
            finally:
                slot.release()
            exchange.taken = True
            return answered

        # The neuron's /tokenize takes no admission slot: a count of tokens is not refused as
        # busy, nor counted against the requests the replica admits.
        admitted = not isinstance(call, Tokenize)
        return await self._with_retries(exchange, attempt, admitted=admitted)

    async def open(self, exchange: Exchange, call: StreamCall) -> Upstream:
        """A streamed call, returned once its first bytes are in (so it can still fail over);
        its holder must `aclose()` it, which gives the slot back."""

        async def attempt(slot: Slot) -> Upstream:
            try:
                return await self._open(slot, call, exchange)
            except BaseException:
                slot.release()
                raise

        return await self._with_retries(exchange, attempt)

    async def _open(self, slot: Slot, call: StreamCall, exchange: Exchange) -> Upstream:
        stack = AsyncExitStack()
        neuron = slot.neuron
        try:
            stream = await stack.enter_async_context(_opening(slot.client, call, exchange))
            exchange.reported.update(reported(stream.headers))
            rest = stream.chunks()
            try:
                first = await anext(rest)
            except CortexError as err:  # the transport's: say when it failed
                err.message = f"{err.message} before the first byte"
                raise
        except AnswerTimeout:
            exchange.taken = exchange.unanswered = True  # it may be generating still
            await stack.aclose()
            raise
        except StopAsyncIteration:
            await stack.aclose()
            raise NeuronUnavailable(
                f"neuron {neuron} ended the stream before its first byte"
            ) from None
        except BaseException:
            await stack.aclose()
            raise
        exchange.taken = True
        return Upstream(slot, first, rest, stack)

    async def _with_retries(
        self,
        exchange: Exchange,
        attempt: Callable[[Slot], Awaitable[T]],
        *,
        admitted: bool = True,
    ) -> T:
        tried: set[str] = set()
        last: CortexError | None = None
        for _ in range(self.max_attempts):
            try:
                neuron = await self._choose(exchange, tried, admitted=admitted)
            except NeuronUnavailable:
                if last is None:
                    raise
                break  # no other replica, nor a neuron to load one on: the first-hand reason
            if neuron is None:
                break
            exchange.neuron = neuron
            try:
                return await attempt(Slot(self.fleet, neuron, exchange.model, admitted=admitted))
            except CortexError as err:
                if not retryable(err):
                    raise
                log.info("%s on %s failed before its first byte: %s", exchange.model, neuron, err)
                tried.add(neuron)
                last = err
                note_failure(self.fleet, neuron, err)
                if isinstance(err, ModelNotFound):
                    await self.fleet.refresh(neuron)  # our picture was stale: the model is gone
        if last is None or isinstance(last, ModelNotFound):
            raise NeuronUnavailable(f"no replica of {exchange.model!r} could take the request")
        raise last

    async def _watching(self, exchange: Exchange, work: Awaitable[T], doing: str) -> T:
        """Await `work`, giving it up when the client of a plain answer disconnects meanwhile:
        its handler is not cancelled by the server, so without this a neuron would go on
        generating (and a load go on) for nobody. The work runs in this task and a timer looks
        at the client now and then: a quick answer costs one timer, no task of its own."""
        disconnected = exchange.disconnected
        if disconnected is None:
            return await work  # a stream's own cancellation reaches us
        loop = asyncio.get_running_loop()
        waiting = asyncio.current_task()
        assert waiting is not None
        state = {"waiting": True, "gone": False}
        looks: set[asyncio.Task[None]] = set()
        timer: asyncio.TimerHandle

        async def look() -> None:
            nonlocal timer
            if not await disconnected():
                timer = loop.call_later(DISCONNECT_POLL_INTERVAL, start_look)
            elif state["waiting"]:  # not yet answered: the cancel can only land on `work`
                state["gone"] = True
                waiting.cancel()

        def start_look() -> None:
            task = loop.create_task(look())
            looks.add(task)
            task.add_done_callback(looks.discard)

        timer = loop.call_later(DISCONNECT_POLL_INTERVAL, start_look)
        try:
            return await work
        except asyncio.CancelledError:
            if not state["gone"]:
                raise
            waiting.uncancel()
            raise ClientGone(f"client left while {doing}") from None
        finally:
            state["waiting"] = False
            timer.cancel()
            for task in looks:
                task.cancel()

    async def _choose(
        self, exchange: Exchange, tried: set[str], *, admitted: bool = True
    ) -> str | None:
        """The next replica to try; loads one when the model has none ready anywhere. A call
        the neuron does not admit (`admitted` False) goes to a full replica too."""
        model = exchange.model

        def roomy(names: list[str]) -> list[str]:
            return [n for n in names if not (admitted and self.fleet.full(n, model))]

        ready = self.replicas.ready(model)
        candidates = [name for name in ready if name not in tried]
        room = roomy(candidates)
        if candidates and not room:
            raise Overloaded(
                f"model {model!r} is busy: every replica has all the requests it admits",
                retry_after=BUSY_RETRY_AFTER,
            )
        candidates = room
        if not candidates:
            if ready:
                return None  # every replica had its chance
            timeout = exchange.deadline - time.monotonic()
            ensured = self.cold_start.ensure(model, timeout=timeout)
            await self._watching(exchange, ensured, f"{model!r} was loading")
            candidates = roomy([name for name in self.replicas.ready(model) if name not in tried])
            if not candidates:
                return None
        return pick(
            [Candidate(n, self.fleet[n].in_flight[model]) for n in candidates],
            affinity=exchange.affinity,
            slack=self.affinity_slack,
            turn=next(self._turn),
        )
