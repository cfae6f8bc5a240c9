"""Token budgets of API keys: a balance, or a rolling window. Pure: spend and time are arguments.

A request reserves its worst case (an upper bound of its prompt, and its completion limit) before
it is dispatched and settles its real usage after (gateway/ledger.py). Open reservations count as
spent, so concurrent requests cannot all pass a check made before any of them was charged; a key
may start a request while its spend plus its open reservations is under the limit, so it
overshoots by at most one request's reservation.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cortex.core.catalogue import ModelSpec
from cortex.core.errors import InvalidRequest

# A spent balance never refills on its own (an operator raises it); clients are told to wait long.
BALANCE_RETRY_AFTER = 3600.0
# The rest of the budget is held by requests in flight; it comes back when they settle.
RESERVED_RETRY_AFTER = 1.0
# The prompt's reserve is a bound, not a guess: a byte-level BPE or SentencePiece token (with byte
# fallback) covers at least one byte of text, so a prompt has at most as many tokens as its UTF-8
# bytes (English text has about a quarter as many). The body's JSON punctuation and field names
# more than pay for the chat template's role markers; this pays for its fixed part (SmolLM2's
# default system prompt and markers: 30 tokens).
TEMPLATE_TOKENS = 64
# Reserved for a completion that sets no limit, when the model's context is not known either.
UNBOUNDED_COMPLETION = 4096
_COMPLETION_LIMITS = ("max_tokens", "max_completion_tokens", "max_output_tokens")

Charge = tuple[float, int]  # (unix time, tokens)

# A window's spend is kept in at most this many periods of it (by both spend stores, so their
# size stays bounded): a charge counts until its period ends, and a Retry-After errs long by at
# most one period (6 minutes for a day).
WINDOW_PERIODS = 240
MIN_PERIOD = 10.0  # seconds


@dataclass(frozen=True)
class Budget:
    """`limit` tokens in total (window None) or within any `window` seconds."""

    limit: int
    window: float | None = None

    def since(self, now: float) -> float:
        """The earliest charge that still counts."""
        return -math.inf if self.window is None else now - self.window


def period_end(at: float, window: float) -> float:
    """When a charge made at `at` leaves the record of a key with this window: the end of its
    period, in whole seconds and never before `at`."""
    period = max(MIN_PERIOD, window / WINDOW_PERIODS)
    return float(math.ceil(math.ceil(at / period) * period))


def retry_after(
    budget: Budget, used: int, reserved: int, charges: Sequence[Charge], now: float
) -> float | None:
    """None while the key may start a request; else seconds until it may. `used` is the spend
    since budget.since(now); `charges` (oldest first) are read only for a window over its limit."""
    if used + reserved < budget.limit:
        return None
    if used < budget.limit:
        return RESERVED_RETRY_AFTER
    if budget.window is None:
        return BALANCE_RETRY_AFTER
    # The budget reopens once enough of the oldest charges leave the window.
    excess = used + reserved - budget.limit
    for at, tokens in charges:
        excess -= tokens
        if excess < 0:
            return max(0.0, at + budget.window - now)
    return RESERVED_RETRY_AFTER


def check_output_limit(spec: ModelSpec, body: Mapping[str, Any]) -> None:
    """Where max_tokens is strict, a request may not ask for more output than the model's
    `max_output_tokens` (the seed's `limit.output`); refused here, before anything is reserved."""
    if spec.max_output_tokens is None:
        return
    for name in _COMPLETION_LIMITS:
        value = body.get(name)
        if isinstance(value, int) and value > spec.max_output_tokens:
            raise InvalidRequest(
                f"{name} {value} is more than model {spec.id!r} allows "
                f"({spec.max_output_tokens} output tokens)",
                param=name,
            )


def prompt_estimate(body: Mapping[str, Any]) -> int:
    """The most tokens the request's prompt may be: the UTF-8 bytes of its body as JSON, plus
    TEMPLATE_TOKENS. Reserved, and charged for a prompt the neuron read but never counted to us
    (its client left first: docs/security.md, "Token budgets")."""
    return len(json.dumps(body, ensure_ascii=False).encode()) + TEMPLATE_TOKENS


def completion_reserve(
    body: Mapping[str, Any], *, embedding: bool, context: int | None, cap: int | None = None
) -> int:
    """The most output a request may be charged: its completion limit, which the model's
    context and output limit `cap` bound (the neuron fits max_tokens to both), or the context
    or UNBOUNDED_COMPLETION when the request sets none, once per choice it asks for (OpenAI's
    `n`); nothing for an embedding. Of several limits the largest: which one the neuron obeys
    depends on the API (chat prefers max_completion_tokens, Responses has max_output_tokens),
    and the reserve must cover it."""
    if embedding:
        return 0
    limits = [
        limit
        for name in _COMPLETION_LIMITS
        if isinstance(limit := body.get(name), int) and not isinstance(limit, bool) and limit >= 0
    ]
    if not limits:
        return (cap or context or UNBOUNDED_COMPLETION) * _choices(body)
    bounds = [b for b in (context, cap) if b is not None]
    return min([max(limits), *bounds]) * _choices(body)


def _choices(body: Mapping[str, Any]) -> int:
    """The choices a request asks for (OpenAI's `n`; validated before, so at most MAX_CHOICES)."""
    n = body.get("n")
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 1 else 1
