"""One client request on its way through the gateway, and what its end is recorded as."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from cortex.core.catalogue import ModelCost
from cortex.core.completion_limit import CompletionPolicy
from cortex.core.errors import CortexError
from cortex.core.protocol.openai import Usage
from cortex.core.request_context import request_id
from cortex.gateway.auth import Principal
from cortex.gateway.dialects.dialect import Surface
from cortex.gateway.ledger import Reservation
from cortex.gateway.metrics import NO_NEURON, GatewayMetrics

log = logging.getLogger(__name__)
usage_logger = logging.getLogger("cortex.usage")


@dataclass
class Exchange:
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
    # Set for plain (non-streamed) answers, whose handler is not cancelled when the client goes.
    disconnected: Callable[[], Awaitable[bool]] | None = None
    reservation: Reservation | None = None  # the caller's budget held for this request
    prompt_estimate: int = 0  # the prompt's tokens as reserved (budget.py)
    completion_reserve: int = 0  # the most output it may be charged, as reserved (budget.py)
    # A neuron took the call on (its stream opened, or it was answering when the client left):
    # the prompt was read, whether or not its count ever reaches us.
    taken: bool = False
    # The neuron took it and sent nothing by [gateway] request_timeout: how much it generated
    # (it may go on) is not known.
    unanswered: bool = False
    cost: ModelCost | None = None  # the model's prices, for the spend counters
    # How the neuron fits max_tokens: strict or clamped, and the model's output limit.
    completion: CompletionPolicy = field(default_factory=CompletionPolicy)
    # What the neuron reported in headers that the client sees too (completion_limit.py).
    reported: dict[str, str] = field(default_factory=dict)

    def token_arrived(self) -> float | None:
        """Mark the first token; returns time to first token the first time, else None."""
        if self.first_token is not None:
            return None
        self.first_token = time.monotonic()
        return self.first_token - self.started


class Accounting:
    """Records how each call ended: metrics, its budget reservation settled, and with
    `usage_log` a line for it under the cortex.usage logger."""

    def __init__(
        self,
        metrics: GatewayMetrics,
        clock: Callable[[], float] = time.time,
        *,
        usage_log: bool = False,
    ) -> None:
        self.metrics, self.clock, self.usage_log = metrics, clock, usage_log

    def first_token(self, exchange: Exchange) -> None:
        ttft = exchange.token_arrived()
        if ttft is not None:
            self.metrics.ttft.labels(exchange.model, exchange.neuron or NO_NEURON).observe(ttft)

    def finish(
        self, exchange: Exchange, *, usage: Usage | None = None, error: CortexError | None = None
    ) -> None:
        """The call's end: counted, timed, its usage and spend recorded, its reservation settled.
        The proxy calls it once per call, in the `finally` that owns the call."""
        now = time.monotonic()
        usage = charged(exchange, usage)
        m = self.metrics
        labels = (exchange.model, exchange.neuron or NO_NEURON)
        m.requests.labels(*labels, exchange.surface).inc()
        m.duration.labels(*labels, exchange.surface).observe(now - exchange.started)
        if error is not None:
            m.errors.labels(*labels, exchange.surface, error.code).inc()
            if error.status >= 500:  # ours or a neuron's; a refusal or a client's leaving is not
                _log_failure(exchange, error)
        if exchange.reservation is not None:
            used = usage.prompt_tokens + usage.completion_tokens if usage else 0
            exchange.reservation.settle(used, self.clock())
        if self.usage_log:
            _log_usage(exchange, usage, error, now)
        if usage is None:
            return
        m.prompt_tokens.labels(*labels).inc(usage.prompt_tokens)
        m.completion_tokens.labels(*labels).inc(usage.completion_tokens)
        key = exchange.principal.name
        m.key_tokens.labels(key, "prompt").inc(usage.prompt_tokens)
        m.key_tokens.labels(key, "completion").inc(usage.completion_tokens)
        if exchange.cost is not None:
            self.spend(exchange, usage, exchange.cost)
        # Streamed: rate after the first token (prefill excluded); otherwise over the whole call.
        since = exchange.first_token if exchange.first_token is not None else exchange.started
        tokens = usage.completion_tokens - (1 if exchange.first_token is not None else 0)
        if tokens > 0 and now > since:
            m.tokens_per_second.labels(*labels).observe(tokens / (now - since))

    def refused(self, model: str, surface: Surface, key: str, err: CortexError) -> None:
        """A call refused before dispatch once its model was known (a model the key may not
        use, a spent budget, the key's max_in_flight): counted under that model."""
        self.metrics.requests.labels(model, NO_NEURON, surface).inc()
        self.metrics.errors.labels(model, NO_NEURON, surface, err.code).inc()
        if self.usage_log:
            _usage_line(key, surface, err.code, model=model)

    def spend(self, exchange: Exchange, usage: Usage, cost: ModelCost) -> None:
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
                spend = self.metrics.spend.labels(exchange.principal.name, exchange.model, kind)
                spend.inc(micro_dollars / 1e6)


def charged(exchange: Exchange, usage: Usage | None) -> Usage | None:
    """What a call counts as: the neuron's usage; for a call a neuron took on that ends without
    the prompt's count (its client left, its stream was cut before the usage came), the prompt's
    estimate and the output relayed; for one it never answered in time, its whole reservation:
    the prompt's estimate and the most output it asked for (docs/security.md, "Token budgets")."""
    if not exchange.taken or not exchange.prompt_estimate:
        return usage
    if exchange.unanswered:
        completion = exchange.completion_reserve
    elif usage is not None and usage.prompt_tokens:
        return usage
    else:
        completion = usage.completion_tokens if usage else 0
    prompt = exchange.prompt_estimate
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


def _log_usage(
    exchange: Exchange, usage: Usage | None, error: CortexError | None, now: float
) -> None:
    """One line per call: who, what, where, how it ended, what it used; never the content. With
    --log-format json the fields are the entry's `usage` object as well."""
    ttft = exchange.first_token - exchange.started if exchange.first_token is not None else None
    _usage_line(
        exchange.principal.name,
        exchange.surface,
        error.code if error is not None else "ok",
        model=exchange.model,
        neuron=exchange.neuron or "-",
        prompt_tokens=usage.prompt_tokens if usage else 0,
        completion_tokens=usage.completion_tokens if usage else 0,
        duration_ms=round((now - exchange.started) * 1000, 1),
        ttft_ms=round(ttft * 1000, 1) if ttft is not None else None,
    )


def _log_failure(exchange: Exchange, error: CortexError) -> None:
    """One line per failed call: what failed, where, why, and the request's id to find it by."""
    log.warning(
        "%s call to %s on %s failed: %d %s: %s (request %s)",
        exchange.surface,
        exchange.model,
        exchange.neuron or "no neuron",
        error.status,
        error.code,
        error.message,
        request_id.get() or "-",
    )


def log_refusal(key: str, surface: str, code: str) -> None:
    """The usage line of a call refused before dispatch (a model the key may not use, a spent
    budget): who asked, through which API, and why not."""
    _usage_line(key, surface, code)


def _usage_line(
    key: str,
    surface: str,
    outcome: str,
    *,
    model: str = "-",
    neuron: str = "-",
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
    duration_ms: float | None = None,
    ttft_ms: float | None = None,
) -> None:
    fields = {
        "key": key,
        "model": model,
        "neuron": neuron,
        "surface": surface,
        "outcome": outcome,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "duration_ms": duration_ms,
        "ttft_ms": ttft_ms,
    }
    usage_logger.info(" ".join(f"{k}={v}" for k, v in fields.items()), extra={"usage": fields})
