"""One client request on its way through the gateway, and what its end is recorded as."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cortex.core.catalogue import ModelCost
from cortex.core.errors import CortexError
from cortex.core.protocol.openai import Usage
from cortex.gateway.auth import Principal
from cortex.gateway.ledger import Reservation
from cortex.gateway.metrics import NO_NEURON, GatewayMetrics

Surface = Literal["openai", "anthropic", "responses"]


@dataclass
class Call:
    """A request for one model: who asked, through which API, where it went, how it went."""

    model: str
    surface: Surface
    principal: Principal
    deadline: float  # monotonic: the latest an on-demand load may keep the request waiting
    affinity: str | None = None
    client: str | None = None  # the client's address: its fair-share key when auth is off
    started: float = field(default_factory=time.monotonic)
    neuron: str | None = None
    first_token: float | None = None
    finished: bool = False
    # Set for plain (non-streamed) answers, whose handler is not cancelled when the client goes.
    disconnected: Callable[[], Awaitable[bool]] | None = None
    reservation: Reservation | None = None  # the caller's budget held for this call
    cost: ModelCost | None = None  # the model's prices, for the spend counters
    # A max_tokens beyond the context: a 400 (True), clamped (False), the neuron's choice (None).
    strict_max_tokens: bool | None = None
    # What the neuron reported in headers that the client sees too (completion_limit.py).
    reported: dict[str, str] = field(default_factory=dict)

    def token_arrived(self) -> float | None:
        """Mark the first token; returns time to first token the first time, else None."""
        if self.first_token is not None:
            return None
        self.first_token = time.monotonic()
        return self.first_token - self.started


class Accounting:
    """Records how each call ended, once: metrics, and its budget reservation settled."""

    def __init__(self, metrics: GatewayMetrics, clock: Callable[[], float] = time.time) -> None:
        self.metrics, self.clock = metrics, clock

    def first_token(self, call: Call) -> None:
        ttft = call.token_arrived()
        if ttft is not None:
            self.metrics.ttft.labels(call.model, call.neuron or NO_NEURON).observe(ttft)

    def finish(
        self, call: Call, *, usage: Usage | None = None, error: CortexError | None = None
    ) -> None:
        if call.finished:
            return
        call.finished = True
        now = time.monotonic()
        m = self.metrics
        labels = (call.model, call.neuron or NO_NEURON)
        m.requests.labels(*labels, call.surface).inc()
        m.duration.labels(*labels, call.surface).observe(now - call.started)
        if error is not None:
            m.errors.labels(*labels, call.surface, error.code).inc()
        if call.reservation is not None:
            used = usage.prompt_tokens + usage.completion_tokens if usage else 0
            call.reservation.settle(used, self.clock())
        if usage is None:
            return
        m.prompt_tokens.labels(*labels).inc(usage.prompt_tokens)
        m.completion_tokens.labels(*labels).inc(usage.completion_tokens)
        if call.cost is not None:
            self.spend(call, usage, call.cost)
        # Streamed: rate after the first token (prefill excluded); otherwise over the whole call.
        since = call.first_token if call.first_token is not None else call.started
        tokens = usage.completion_tokens - (1 if call.first_token is not None else 0)
        if tokens > 0 and now > since:
            m.tokens_per_second.labels(*labels).observe(tokens / (now - since))

    def spend(self, call: Call, usage: Usage, cost: ModelCost) -> None:
        """Dollars by key and model, at the model's per-million-token prices."""
        details = usage.prompt_tokens_details
        cached = details.cached_tokens if details is not None else 0
        by_kind = {
            "input": (usage.prompt_tokens - cached) * cost.input,
            "cache_read": cached * cost.cache_read,
            "output": usage.completion_tokens * cost.output,
        }
        for kind, micro_dollars in by_kind.items():
            if micro_dollars > 0:
                spend = self.metrics.spend.labels(call.principal.name, call.model, kind)
                spend.inc(micro_dollars / 1e6)


class CallScope:
    """ASGI middleware holding the one `finally` that ends every call, and so settles its budget
    reservation, however the request ends: answered, failed, or abandoned by its client."""

    def __init__(self, app: ASGIApp, accounting: Callable[[], Accounting]) -> None:
        self.app, self.accounting = app, accounting

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_reported(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = _with_reported(message, scope)
            await send(message)

        try:
            await self.app(scope, receive, send_reported)
        finally:
            # Gateway.begin keeps the call on request.state, which is this scope's "state".
            call = scope.get("state", {}).get("call")
            if isinstance(call, Call):
                self.accounting().finish(call)


def _with_reported(start: Message, scope: Scope) -> Message:
    """The response's start with the headers the call's neuron reported (a clamped max_tokens),
    when it answered before the response began (a stream still loading its model has not)."""
    call = scope.get("state", {}).get("call")
    if not isinstance(call, Call) or not call.reported:
        return start
    extra = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in call.reported.items()]
    return {**start, "headers": [*start.get("headers", []), *extra]}
