"""Graceful shutdown under uvicorn, as Kubernetes rolling updates need it (docs/architecture.md).

On the first SIGTERM (or SIGINT) a server starts draining: the app refuses new work with 503
`shutting_down` and Retry-After (it asks `Drain.draining`), readiness fails, and the requests
already in flight (streams included) may finish for up to the grace period. When it runs out,
the streams still open are cut (`Drain.cuttable`): each ends itself with its API's error event,
so a client reads why its stream stopped; then the servers exit. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from contextlib import contextmanager
from types import FrameType
from typing import Any

import uvicorn

from cortex.core.errors import ShuttingDown

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# What a refused client is told to wait: long enough for another replica to take the request.
SHUTDOWN_RETRY_AFTER = 2.0
# How often the drain looks at the requests still in flight.
_DRAIN_POLL = 0.05
# What uvicorn gives connections still open once the drain has ended (the grace ran out).
_CLOSE_TIMEOUT = 1
# The exit signals the servers took, for `exit_as_signalled` once the process has cleaned up.
_received: list[int] = []


class Drain:
    """Whether a process is shutting down, and the requests it still serves."""

    def __init__(self, grace: float, *, on_begin: Callable[[], None] | None = None) -> None:
        self.grace = grace
        self.draining = False
        self.over = False  # the grace ran out: what still runs is being cut
        self.active = 0
        self._cuts: set[Callable[[], None]] = set()
        self.servers: list[uvicorn.Server] = []
        self._on_begin = on_begin
        self._task: asyncio.Task[None] | None = None

    def refusal(self, what: str) -> ShuttingDown:
        return ShuttingDown(f"{what} is shutting down", retry_after=SHUTDOWN_RETRY_AFTER)

    @contextmanager
    def cuttable(self, cut: Callable[[], None]) -> Iterator[None]:
        """While the body runs, `cut` is called if the grace runs out: a stream stops relaying
        and ends with its last word before the server cancels it."""
        self._cuts.add(cut)
        try:
            yield
        finally:
            self._cuts.discard(cut)

    def begin(self) -> None:
        """Stop taking work; exit the servers once the in-flight requests are done (or the grace
        has run out). Runs on the event loop."""
        if self.draining:
            return
        self.draining = True
        if self._on_begin is not None:
            self._on_begin()
        log.warning("shutting down: draining %d requests (grace %.0fs)", self.active, self.grace)
        self._task = asyncio.get_running_loop().create_task(self._finish())

    async def _finish(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.grace
        while self.active > 0 and loop.time() < deadline:
            await asyncio.sleep(_DRAIN_POLL)
        if self.active:
            log.warning("grace period over: %d requests cut short", self.active)
            self.over = True
            for cut in list(self._cuts):
                cut()
        # The servers give what is still open a moment (their graceful-shutdown timeout) to end.
        for server in self.servers:
            server.should_exit = True


class DrainGate:
    """ASGI middleware counting the HTTP requests in flight (a stream until its end) for a Drain."""

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.drain.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.active -= 1


class GracefulServer(uvicorn.Server):
    """A uvicorn server whose first exit signal drains `drain` instead of stopping at once."""

    def __init__(self, config: uvicorn.Config, drain: Drain) -> None:
        if config.timeout_graceful_shutdown is None:
            config.timeout_graceful_shutdown = _CLOSE_TIMEOUT
        super().__init__(config)
        self.drain = drain
        drain.servers.append(self)
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[object] | None = None) -> None:  # type: ignore[override]
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)  # type: ignore[arg-type]

    async def shutdown(self, sockets: list[Any] | None = None) -> None:
        await super().shutdown(sockets)
        # uvicorn re-raises the signals it took as soon as this server stops, which ended the
        # process before the code after it ran (`cortex up` never stopped its neuron): they are
        # kept for `exit_as_signalled` instead.
        _received.extend(self._captured_signals)
        self._captured_signals.clear()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain.draining or self._loop is None:
            super().handle_exit(sig, frame)
            return
        self._captured_signals.append(sig)  # re-raised by uvicorn once it has stopped cleanly
        # A signal handler runs between two bytecodes of the loop's own thread: hand over.
        self._loop.call_soon_threadsafe(self.drain.begin)


class SilentServer(uvicorn.Server):
    """A uvicorn server that leaves the exit signals to the process's other servers, which stop
    it (the neuron inside `cortex up`)."""

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def exit_as_signalled() -> None:
    """End the process as the exit signal the servers took would have, now that it has cleaned
    up: SIGTERM's default action, or KeyboardInterrupt for Ctrl-C. No signal: nothing."""
    for sig in dict.fromkeys(reversed(_received)):
        default = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
        signal.signal(sig, default)
        signal.raise_signal(sig)
