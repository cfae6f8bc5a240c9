"""Token budgets of API keys: a balance, or a rolling window. Pure: time is an argument."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

# A spent balance never refills on its own (an operator raises it); clients are told to wait long.
BALANCE_RETRY_AFTER = 3600.0


@dataclass
class TokenBudget:
    """`limit` tokens in total (window None) or within any `window` seconds."""

    limit: int
    window: float | None = None
    spent: int = 0
    _charges: deque[tuple[float, int]] = field(default_factory=deque)

    def used(self, now: float) -> int:
        if self.window is None:
            return self.spent
        self._expire(now)
        return sum(tokens for _, tokens in self._charges)

    def remaining(self, now: float) -> int:
        return max(0, self.limit - self.used(now))

    def retry_after(self, now: float) -> float | None:
        """Seconds until some budget is back; None while some remains."""
        if self.remaining(now) > 0:
            return None
        if self.window is None:
            return BALANCE_RETRY_AFTER
        # The budget reopens once enough of the oldest charges leave the window.
        excess = self.used(now) - self.limit
        for at, tokens in self._charges:
            excess -= tokens
            if excess < 0:
                return max(0.0, at + self.window - now)
        return 0.0

    def charge(self, tokens: int, now: float) -> None:
        if tokens <= 0:
            return
        self.spent += tokens
        if self.window is not None:
            self._charges.append((now, tokens))
            self._expire(now)

    def _expire(self, now: float) -> None:
        assert self.window is not None
        while self._charges and self._charges[0][0] <= now - self.window:
            self._charges.popleft()
