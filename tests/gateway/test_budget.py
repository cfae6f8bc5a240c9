"""Token budgets (pure): admission against spend plus open reservations, the wait until budget is
back, and a request's worst case."""

from __future__ import annotations

from pathlib import Path

from cortex.gateway.budget import (
    BALANCE_RETRY_AFTER,
    RESERVED_RETRY_AFTER,
    UNBOUNDED_COMPLETION,
    Budget,
    completion_reserve,
    prompt_estimate,
    retry_after,
)
from cortex.gateway.ledger import SqliteSpendStore


def test_a_balance_admits_while_spend_and_reservations_are_under_it() -> None:
    balance = Budget(limit=100)
    assert retry_after(balance, used=60, reserved=39, charges=[], now=0) is None
    # Reservations of requests in flight hold the rest: back soon, when they settle.
    assert retry_after(balance, used=60, reserved=40, charges=[], now=0) == RESERVED_RETRY_AFTER
    assert retry_after(balance, used=100, reserved=0, charges=[], now=0) == BALANCE_RETRY_AFTER


def test_a_window_reopens_as_old_charges_expire() -> None:
    window = Budget(limit=100, window=60)
    charges = [(0.0, 50), (10.0, 30), (20.0, 40)]  # 120 in the window: over
    # Dropping the charge at t=0 leaves 70 < 100: open again when it leaves the window at t=60.
    assert retry_after(window, 120, 0, charges, now=20) == 40
    # With 25 reserved, dropping 50 leaves 95 < 100 as well; 35 more reserved needs two to go.
    assert retry_after(window, 120, 25, charges, now=20) == 40
    assert retry_after(window, 120, 35, charges, now=20) == 50
    assert window.since(100) == 40 and Budget(5).since(100) < -1e300


def test_the_worst_case_is_the_body_over_four_plus_the_completion_limit() -> None:
    chat = {"model": "m", "messages": [{"role": "user", "content": "x" * 400}], "max_tokens": 7}
    assert 100 < prompt_estimate(chat) < 130  # 400 bytes of text, plus the JSON around them
    assert completion_reserve(chat, embedding=False, context=None) == 7
    responses = {"model": "m", "input": "hi", "max_output_tokens": 9}
    assert completion_reserve(responses, embedding=True, context=None) == 0  # no completion
    assert completion_reserve(responses, embedding=False, context=None) == 9
    unbounded = {"model": "m", "prompt": "hi"}
    assert completion_reserve(unbounded, embedding=False, context=None) == UNBOUNDED_COMPLETION
    assert completion_reserve(unbounded, embedding=False, context=2048) == 2048


def test_spend_outlives_the_store(tmp_path: Path) -> None:
    path = tmp_path / "state" / "gateway.sqlite3"
    store = SqliteSpendStore(path)
    store.record("carol", 30, at=10)
    store.record("carol", 12, at=70)
    store.record("dave", 5, at=70)
    store.close()
    reopened = SqliteSpendStore(path)
    assert reopened.spent("carol", since=float("-inf")) == 42
    assert reopened.spent("carol", since=10) == 12  # a window starting at 10 excludes t=10
    assert reopened.charges("carol", since=0) == [(10.0, 30), (70.0, 12)]
    assert reopened.spent("nobody", since=0) == 0


def test_the_reserve_covers_whichever_completion_limit_the_neuron_obeys() -> None:
    """Chat obeys max_completion_tokens over max_tokens, Responses max_output_tokens: a small
    max_tokens beside a large one of those must not reserve the small one."""
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}

    def reserved_output(body: dict[str, object], context: int | None = None) -> int:
        return completion_reserve(body, embedding=False, context=context)

    for name in ("max_completion_tokens", "max_output_tokens"):
        body = {**base, "max_tokens": 1, name: 50_000}
        assert reserved_output(body) == 50_000
        assert reserved_output({**body, name: 3}) == 3
        assert reserved_output(body, context=8192) == 8192
