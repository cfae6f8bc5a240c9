"""Token budgets (pure): balance and rolling window, with the wait until budget is back."""

from __future__ import annotations

from cortex.gateway.budget import BALANCE_RETRY_AFTER, TokenBudget


def test_balance_is_spent_once() -> None:
    budget = TokenBudget(limit=100)
    budget.charge(60, now=0)
    assert budget.remaining(now=0) == 40 and budget.retry_after(now=0) is None
    budget.charge(60, now=10**6)
    assert budget.remaining(now=10**9) == 0
    assert budget.retry_after(now=10**9) == BALANCE_RETRY_AFTER


def test_window_reopens_as_old_charges_expire() -> None:
    budget = TokenBudget(limit=100, window=60)
    budget.charge(50, now=0)
    budget.charge(30, now=10)
    budget.charge(40, now=20)  # 120 in the window: over
    assert budget.remaining(now=20) == 0
    # Dropping the charge at t=0 leaves 70 < 100: open again when it leaves the window at t=60.
    assert budget.retry_after(now=20) == 40
    assert budget.remaining(now=59.9) == 0
    assert budget.remaining(now=60) == 30
    assert budget.remaining(now=75) == 60
    assert budget.remaining(now=200) == 100


def test_zero_and_negative_charges_change_nothing() -> None:
    budget = TokenBudget(limit=10, window=5)
    budget.charge(0, now=1)
    budget.charge(-3, now=1)
    assert budget.used(now=1) == 0
